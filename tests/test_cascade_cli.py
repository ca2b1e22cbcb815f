"""The member cascade end to end: trained, evaluated in PyTorch, exported, and run by the lean runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.cli import assert_one_line_refusal, run_cli, run_cli_here

MEMBER = {"backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False}


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A three-member tiny ensemble (random resnet18s of different head sizes), evaluated and exported.
    A zero margin and a 0.9 target let images leave early even on this small calibration set."""
    from tilecore.export.bundle import export_run
    from tilecore.train.config import config_from_dict
    from tilecore.train.evaluate import evaluate_run
    from tilecore.train.fit import train_run
    from tilecore.train.synth import build_synth_dataset

    root = tmp_path_factory.mktemp("cascade")
    build_synth_dataset(root / "data", 256, n_train=16, n_test_good=4, n_test_defect=4, categories=("gravel",))
    config = config_from_dict(
        {
            "data": {"root": str(root / "data"), "image_size": 64, "val_fraction": 0.25},
            "members": [
                {**MEMBER, "pretrain_embed_dimension": 32, "target_embed_dimension": 16},
                {**MEMBER, "pretrain_embed_dimension": 32, "target_embed_dimension": 8},
                {**MEMBER, "pretrain_embed_dimension": 64, "target_embed_dimension": 16},
            ],
            "tiling": {"tile_size": [32], "stride": [32]},
            "cascade": {"margin": 0.0, "agreement": 0.9},
        }
    )
    train_run(config, root / "run")
    evaluate_run(root / "run")
    export_run(root / "run", root / "bundle")
    return {"root": root, "run": root / "run", "bundle": root / "bundle"}


def test_eval_reports_the_cascade_beside_the_full_ensemble(ensemble: dict[str, Path]) -> None:
    metrics = json.loads((ensemble["run"] / "metrics.json").read_text())["categories"]["gravel"]
    cascade = metrics["cascade"]
    assert 0.0 <= cascade["label_agreement"] <= 1.0 and 0.0 <= cascade["image_auroc"] <= 1.0
    assert sum(cascade["exit_shares"]) == pytest.approx(1.0)
    assert cascade["gflops_per_image"] <= cascade["full_gflops_per_image"]
    rows = json.loads((ensemble["run"] / "gravel" / "test_scores.json").read_text())
    assert {row["exit_stage"] for row in rows} <= {1, 2, 3}


def test_the_runtime_cascade_gives_the_pytorch_evaluations_exits_and_scores(ensemble: dict[str, Path]) -> None:
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.predictor import Predictor

    rows = json.loads((ensemble["run"] / "gravel" / "test_scores.json").read_text())
    images = [read_rgb(row["image"]) for row in rows]
    staged = Predictor(ensemble["bundle"], device="cpu").predict_batch(images)
    assert [r.exit_stage for r in staged] == [row["exit_stage"] for row in rows]
    assert len({row["exit_stage"] for row in rows}) > 1  # some images left early, some did not
    np.testing.assert_allclose([r.score for r in staged], [row["cascade_score"] for row in rows], atol=1e-4)
    full = Predictor(ensemble["bundle"], device="cpu", cascade=False).predict_batch(images)
    assert all(r.exit_stage is None for r in full)
    np.testing.assert_allclose([r.score for r in full], [row["score"] for row in rows], atol=1e-4)
    for a, b in zip(staged, full, strict=True):  # the images that ran every stage are the full ensemble's
        if a.exit_stage == 3:
            assert a.score == pytest.approx(b.score, abs=1e-6)


def test_the_bundle_records_the_windows_export_calibrated(ensemble: dict[str, Path], tmp_path: Path) -> None:
    from tilecore.export.bundle import export_run
    from tilecore.runtime.manifest import read_manifest
    from tilecore.train.cascade_fit import fit_cascade, member_gflops
    from tilecore.train.run_dir import load_run_config

    manifest = read_manifest(ensemble["bundle"])
    config = load_run_config(ensemble["run"])
    calibration = json.loads((ensemble["run"] / "gravel" / "calibration.json").read_text())
    assert manifest.cascade == fit_cascade(config, calibration)
    gflops = member_gflops(config)
    assert [gflops[m] for m in manifest.cascade.order] == sorted(gflops)  # cheapest first
    assert manifest.cascade.agreement >= 0.9
    off = export_run(ensemble["run"], tmp_path / "full", cascade="off")
    assert off.cascade is None


def test_run_records_each_images_exit_and_cascade_off_runs_every_member(ensemble: dict[str, Path]) -> None:
    images = str(ensemble["root"] / "data" / "gravel" / "test" / "*" / "*.png")
    out = ensemble["root"] / "predictions"
    proc = run_cli("run", ensemble["bundle"], images, "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cascade"] is True
    assert sum(summary["exits_per_stage"].values()) == summary["images"] == len(lines) == 8
    assert all(line["exit_stage"] in (1, 2, 3) for line in lines)
    proc = run_cli("run", ensemble["bundle"], images, "--out", out, "--device", "cpu", "--cascade", "off",
                   "--overwrite")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and not any("exit_stage" in line for line in lines)
    assert "exits_per_stage" not in json.loads((out / "summary.json").read_text())


def test_a_bad_cascade_option_is_refused_in_one_line(ensemble: dict[str, Path]) -> None:
    proc = run_cli("run", ensemble["bundle"], "x.png", "--cascade", "sometimes")
    assert_one_line_refusal(proc, r"--cascade sometimes: expected auto or off")


def test_info_shows_the_stages(ensemble: dict[str, Path]) -> None:
    from tilecore.runtime.bundle_info import bundle_info, info_lines

    info = bundle_info(ensemble["bundle"])
    lines = info_lines(info)
    assert sum(line.startswith("cascade ") for line in lines) == 3
    assert any("--cascade off" in line for line in lines)
    assert any("order cheapest first; windows refit by tilecore calibrate" in line for line in lines)
    assert info["cascade"]["refittable"] is True and "calibration_scores" not in info["cascade"]


def pytorch_member_scores(run: Path, paths: list[str]) -> np.ndarray:
    """Each member's normalised image scores [M, N] on `paths` from the PyTorch model (the reference)."""
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.merge import member_result
    from tilecore.train.ensemble import load_category_model
    from tilecore.train.model import load_embedder
    from tilecore.train.run_dir import load_run_config

    config = load_run_config(run)
    embedders = [load_embedder(config, run, i) for i in range(len(config.members))]
    model = load_category_model(config, run, "gravel", embedders)
    raw = model.raw_outputs([read_rgb(p) for p in paths])
    pairs = zip(raw, model.calibrations, strict=True)
    return np.stack([member_result(o, model.grid, config.merge_rule(), c)[0] for o, c in pairs])  # [M, N]


def test_calibrate_refits_the_windows_at_the_new_threshold_on_export_and_good_images(ensemble: dict[str, Path]) -> None:
    from tilecore.runtime.cascade import calibrate_cascade
    from tilecore.runtime.manifest import read_manifest
    from tilecore.runtime.recalibrate import recalibrate

    paths = sorted(str(p) for p in (ensemble["root"] / "data" / "gravel" / "test" / "good").glob("*.png"))
    out = ensemble["root"] / "recalibrated"
    outcome = recalibrate(ensemble["bundle"], str(ensemble["root"] / "data" / "gravel" / "test" / "good" / "*.png"),
                          out, target_fpr=0.25, device="cpu")  # fmt: skip
    before, after = read_manifest(ensemble["bundle"]), read_manifest(out)  # loads: every window holds it
    assert outcome.manifest.cascade == after.cascade
    assert after.cascade.calibration_scores == before.cascade.calibration_scores  # export's, kept for the next
    assert after.cascade.calibration_images == before.cascade.calibration_images + len(paths)
    calibration = json.loads((ensemble["run"] / "gravel" / "calibration.json").read_text())
    exported = np.concatenate([calibration["validation_member_scores"], calibration["synthetic_member_scores"]], 1)
    np.testing.assert_allclose(np.asarray(before.cascade.calibration_scores), exported, atol=1e-6)
    # the reference: windows set by calibrate_cascade at the new threshold on export's + PyTorch's good scores
    scores = np.concatenate([exported, pytorch_member_scores(ensemble["run"], paths)], axis=1)
    c = before.cascade
    reference = calibrate_cascade(scores, after.thresholds.image, before.postprocess.rule.fusion,
                                  [list(s.members) for s in c.stages], [s.gflops for s in sorted(
                                      c.stages, key=lambda s: s.members[0])], c.target_agreement, c.margin)  # fmt: skip
    for ref, new in zip(reference.stages[:-1], after.cascade.stages[:-1], strict=True):
        assert new.window == pytest.approx(ref.window, abs=1e-3)
    assert after.cascade.agreement == reference.agreement


def test_calibrate_says_how_the_windows_were_set(ensemble: dict[str, Path]) -> None:
    good = ensemble["root"] / "data" / "gravel" / "test" / "good" / "*.png"
    out = ensemble["root"] / "recalibrated-cli"
    proc = run_cli_here("calibrate", ensemble["bundle"], str(good), "--target-fpr", "0.25", "--out", out,
                        "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    calibration_images = json.loads((out / "manifest.json").read_text())["cascade"]["calibration_images"]
    assert f"cascade windows refit on {calibration_images} images: order [" in proc.stderr


def test_bench_counts_each_stages_images_and_tiles_and_times_the_full_ensemble_too(ensemble: dict[str, Path]) -> None:
    from tilecore.bench.measure import cascade_figures
    from tilecore.bench.protocol import QUICK
    from tilecore.runtime.image_io import read_rgb
    from tilecore.runtime.predictor import Predictor

    rows = json.loads((ensemble["run"] / "gravel" / "test_scores.json").read_text())
    images = [read_rgb(row["image"]) for row in rows]
    predictor = Predictor(ensemble["bundle"], device="cpu")
    figures = cascade_figures(predictor, images, 4, QUICK)
    stages = figures["stages"]
    assert [s["images"] for s in stages] == [sum(row["exit_stage"] >= k for row in rows) for k in (1, 2, 3)]
    assert [s["exits"] for s in stages] == [sum(row["exit_stage"] == k for row in rows) for k in (1, 2, 3)]
    assert all(s["tiles"] == s["images"] * predictor.grid.count for s in stages)  # one member per stage
    assert len(figures["images_per_second"]["full"]) == 2 and figures["speedup"] > 0
    assert predictor.cascade is not None  # measuring the full ensemble left the cascade on
