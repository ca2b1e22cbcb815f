"""The spatial cascade end to end on tiny runs: a 2 x 2 tiled run exported with a single-tile coarse run,
the runtime against the PyTorch computation export calibrates with, the manifest record, and refusals."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.cli import ANSI, describe, run_cli, run_cli_here

MEMBER = {"backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False}
MEMBER = {**MEMBER, "pretrain_embed_dimension": 32, "target_embed_dimension": 16}


def train(root: Path, name: str, tiling: dict, cascade: dict | None = None) -> Path:
    from tilecore.train.config import config_from_dict
    from tilecore.train.fit import train_run

    config = {
        "data": {"root": str(root / "data"), "image_size": 64, "val_fraction": 0.25},
        "members": [MEMBER],
        "tiling": tiling,
        **({"cascade": cascade} if cascade else {}),
    }
    train_run(config_from_dict(config), root / name)
    return root / name


@pytest.fixture(scope="module")
def spatial(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fine run (64 px, 2 x 2 tiles of 32), a coarse run (one tile: the image resized to 32, the fine
    tiles' backbone input, so the two share one graph), the bundle with both and the plain fine bundle.
    A 0.9 target and no margin let the gate skip tiles even on this small calibration set."""
    from tilecore.export.bundle import export_run
    from tilecore.train.synth import build_synth_dataset

    root = tmp_path_factory.mktemp("spatial")
    build_synth_dataset(root / "data", 256, n_train=8, n_test_good=3, n_test_defect=3, categories=("gravel",))
    fine = train(root, "fine", {"tile_size": [32], "stride": [32]}, {"agreement": 0.9, "margin": 0.0})
    coarse = train(root, "coarse", {"input_size": [32]})
    export_run(fine, root / "bundle", coarse=coarse)
    export_run(fine, root / "plain")
    return {"root": root, "fine": fine, "coarse": coarse, "bundle": root / "bundle", "plain": root / "plain"}


def scored_images(spatial: dict[str, Path]) -> list[np.ndarray]:
    from tilecore.runtime.image_io import read_rgb

    return [read_rgb(p) for p in sorted((spatial["root"] / "data" / "gravel" / "test").glob("*/*.png"))]


def models(spatial: dict[str, Path]):
    from tilecore.export.bundle import read_run
    from tilecore.export.coarse import load_model

    return load_model(read_run(spatial["fine"], "gravel")), load_model(read_run(spatial["coarse"], "gravel"))


def test_the_bundle_records_the_coarse_stage_and_shares_its_graph(spatial: dict[str, Path]) -> None:
    from tilecore.export.bundle import read_run
    from tilecore.export.coarse import calibrate_coarse
    from tilecore.runtime.manifest import read_manifest

    manifest = read_manifest(spatial["bundle"])
    coarse = manifest.coarse
    assert coarse is not None and read_manifest(spatial["plain"]).coarse is None
    assert coarse.tiling.grid == (1, 1) and coarse.tiling.backbone_input == (32, 32)
    assert coarse.member.engine == manifest.members[0].engine  # same weights, same input: one graph
    assert sum(name.endswith(".onnx") for name in manifest.files) == 1
    assert coarse.member.banks == ("bank_coarse.faiss",) and "bank_coarse.faiss" in manifest.files
    calibration = json.loads((spatial["coarse"] / "gravel" / "calibration.json").read_text())
    assert coarse.calibration.to_dict() == calibration["members"][0]
    gate = coarse.gate
    assert gate.calibration_images == 2 * 6  # 2 validation images, 5 synthetic defects painted into each
    assert gate.target_agreement == 0.9 and gate.margin == 0.0 and gate.agreement >= 0.9
    assert 0.0 < gate.tile_share < 1.0  # some calibration tiles ran, some did not
    fine = read_run(spatial["fine"], "gravel")
    again = calibrate_coarse(fine, *models(spatial))
    assert again.tile_threshold == pytest.approx(gate.tile_threshold, abs=1e-6)
    assert again.tile_share == gate.tile_share and again.agreement == gate.agreement


def test_the_runtime_equals_the_pytorch_computation_and_off_equals_the_plain_bundle(spatial: dict[str, Path]) -> None:
    from tilecore.export.coarse import spatial_predict
    from tilecore.runtime.manifest import read_manifest
    from tilecore.runtime.predictor import Predictor

    images = scored_images(spatial)
    threshold = read_manifest(spatial["bundle"]).coarse.gate.tile_threshold
    scores, maps, tiles_run = spatial_predict(*models(spatial), images, threshold)
    results = Predictor(spatial["bundle"], device="cpu", max_batch=8).predict_batch(images)
    assert [r.tiles_run for r in results] == tiles_run.tolist()
    assert 0 < sum(tiles_run) < 4 * len(images)  # the gate skipped some test tiles and ran others
    np.testing.assert_allclose([r.score for r in results], scores, atol=1e-4)
    np.testing.assert_allclose(np.stack([r.anomaly_map for r in results]), maps, atol=1e-4)
    off = Predictor(spatial["bundle"], device="cpu", cascade=False).predict_batch(images)
    plain = Predictor(spatial["plain"], device="cpu").predict_batch(images)
    assert all(r.tiles_run is None for r in off)
    assert [r.score for r in off] == [r.score for r in plain]
    assert [r.score for r in results] != [r.score for r in plain]  # the skipped tiles changed something


def test_with_no_threshold_every_tile_runs_and_the_result_is_the_full_ensembles(
    spatial: dict[str, Path], tmp_path: Path
) -> None:
    from tilecore.export.coarse import spatial_predict
    from tilecore.runtime.manifest import read_manifest, write_manifest
    from tilecore.runtime.predictor import Predictor

    images = scored_images(spatial)
    fine, coarse = models(spatial)
    scores, maps, tiles_run = spatial_predict(fine, coarse, images, -math.inf)
    full_scores, full_maps = fine.predict(images)
    np.testing.assert_array_equal(scores, full_scores)
    np.testing.assert_array_equal(maps, full_maps)
    bundle = tmp_path / "every-tile"
    shutil.copytree(spatial["bundle"], bundle)
    manifest = read_manifest(bundle)
    gate = replace(manifest.coarse.gate, tile_threshold=-math.inf)
    write_manifest(bundle, replace(manifest, coarse=replace(manifest.coarse, gate=gate)))
    assert json.loads((bundle / "manifest.json").read_text())["coarse"]["tile_threshold"] is None
    results = Predictor(bundle, device="cpu").predict_batch(images)
    plain = Predictor(spatial["plain"], device="cpu").predict_batch(images)
    assert [r.tiles_run for r in results] == [4] * len(images) == tiles_run.tolist()
    np.testing.assert_allclose([r.score for r in results], [r.score for r in plain], rtol=0, atol=1e-6)


def test_run_records_tiles_run_and_info_shows_the_coarse_stage(spatial: dict[str, Path]) -> None:
    from tilecore.runtime.bundle_info import bundle_info, info_lines

    images = str(spatial["root"] / "data" / "gravel" / "test" / "*" / "*.png")
    out = spatial["root"] / "predictions"
    proc = run_cli_here("run", spatial["bundle"], images, "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(line["tiles_run"] in range(5) for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles_run"] == sum(line["tiles_run"] for line in lines)
    proc = run_cli_here("run", spatial["bundle"], images, "--out", out, "--device", "cpu", "--cascade", "off",
                        "--overwrite")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and not any("tiles_run" in line for line in lines)
    coarse_lines = [line for line in info_lines(bundle_info(spatial["bundle"])) if line.startswith("coarse ")]
    assert len(coarse_lines) == 1 and "picks the tiles" in coarse_lines[0] and "--cascade off" in coarse_lines[0]


def test_bench_counts_the_fine_tiles_the_coarse_stage_let_run(spatial: dict[str, Path]) -> None:
    from tilecore.bench.measure import cascade_figures
    from tilecore.bench.protocol import QUICK
    from tilecore.runtime.predictor import Predictor

    images = scored_images(spatial)
    predictor = Predictor(spatial["bundle"], device="cpu")
    ran = sum(r.tiles_run for r in predictor.predict_batch(images))
    figures = cascade_figures(predictor, images, 4, QUICK)
    coarse, fine = figures["stages"]  # the coarse stage, then the fine member on the tiles it picked
    assert coarse["images"] == fine["images"] == len(images)
    assert coarse["fine_tiles_skipped"] == 4 * len(images) - ran and fine["tiles"] == ran
    assert figures["fine_tiles_run_share"] == round(ran / (4 * len(images)), 4)
    assert predictor.coarse is not None and figures["speedup"] > 0  # the full-ensemble pass left it on


# --- refusals -------------------------------------------------------------------------------------


def edited_copy(run: Path, folder: Path, edit) -> Path:
    """A copy of `run` whose config.json `edit(config)` changed (weights and banks untouched)."""
    shutil.copytree(run, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def assert_export_refusal(proc, pattern: str) -> None:
    """Exit 2, no traceback, and one `error:` line that `pattern` finds; before it, export may have logged the
    stage it was in (`INFO export: read run (1/5)`), as every refusal made inside export_run is."""
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    lines = [line.strip() for line in ANSI.sub("", proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and all(line.startswith("INFO export:") for line in lines if line not in errors)
    assert re.search(pattern, errors[0]), f"{pattern!r} not found in {errors[0]!r}"


def test_a_tiled_coarse_run_is_refused_in_one_line_by_the_cli(spatial: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli("export", spatial["fine"], "--coarse", spatial["fine"], "--out", tmp_path / "b")
    assert_export_refusal(proc, r"--coarse .*fine: 2 x 2 tiles, expected a single-tile run")
    assert not (tmp_path / "b").exists()


def test_coarse_runs_that_do_not_fit_are_refused_in_one_line(spatial: dict[str, Path], tmp_path: Path) -> None:
    two = edited_copy(spatial["coarse"], tmp_path / "two", lambda c: c["members"].append(c["members"][0]))
    other = edited_copy(spatial["coarse"], tmp_path / "other", lambda c: c["data"].update(categories=["screw"]))
    larger = edited_copy(spatial["coarse"], tmp_path / "larger", lambda c: c["data"].update(image_size=128))
    cases = [
        (spatial["fine"], two, r"two: 2 members, expected a single-member run"),
        (spatial["fine"], other, r"other: no category 'gravel' \(the run has \['screw'\]\)"),
        (spatial["fine"], larger, r"larger: image size 128x128, expected the fine run's 64x64"),
        (spatial["coarse"], spatial["coarse"], r"has one tile; a coarse stage gates the tiles of a tiled run"),
    ]
    for fine, coarse, pattern in cases:
        proc = run_cli_here("export", fine, "--coarse", coarse, "--out", tmp_path / "b")
        assert_export_refusal(proc, pattern)
    from tilecore.export.bundle import export_run
    from tilecore.export.tensorrt_build import TensorRTBuild
    from tilecore.runtime.errors import TilecoreError

    with pytest.raises(TilecoreError, match=r"with --tensorrt: the coarse stage runs ONNX engines only"):
        export_run(spatial["fine"], tmp_path / "b", coarse=spatial["coarse"], tensorrt=TensorRTBuild())
    assert not (tmp_path / "b").exists()


def test_the_manifest_refuses_a_coarse_record_that_does_not_fit(spatial: dict[str, Path]) -> None:
    from tilecore.runtime.errors import TilecoreError
    from tilecore.runtime.manifest import Manifest

    raw = json.loads((spatial["bundle"] / "manifest.json").read_text())
    assert Manifest.from_dict(raw).coarse is not None

    def refused(edit, pattern: str) -> None:
        changed = copy.deepcopy(raw)
        edit(changed)
        with pytest.raises(TilecoreError, match=pattern):
            Manifest.from_dict(changed)

    refused(lambda r: r["coarse"].update(tile_threshold="high"), r"coarse\.tile_threshold: expected a finite number")
    refused(lambda r: r["coarse"].update(extra=1), r"coarse\.extra: unexpected field")
    refused(lambda r: r["coarse"].pop("blur_sigma"), r"coarse\.blur_sigma: missing")
    refused(lambda r: r["coarse"].update(tile_share=2.0), r"coarse\.tile_share: expected a finite number")
    refused(lambda r: r["files"].pop("bank_coarse.faiss"), r"coarse\.member\.indexes\[0\]\.file: 'bank_coarse")
    refused(lambda r: r["coarse"]["member"]["banks"].append("bank_coarse.faiss"), r"coarse\.member\.banks")
    refused(lambda r: r["coarse"]["calibration"]["per_location"].append(r["coarse"]["calibration"]["image"]),
            r"coarse\.calibration\.per_location: expected 1 entry")  # fmt: skip

    gate_scores = r"coarse\.gate_scores"
    refused(lambda r: r["coarse"]["gate_scores"]["normal"].pop(), gate_scores + r"\.normal: expected 12 booleans")
    refused(lambda r: r["coarse"]["gate_scores"]["maxima"][0].append(0.0), gate_scores + r"\.maxima: expected lists")
    refused(lambda r: r["coarse"]["gate_scores"]["tile_scores"][0].pop(), gate_scores + r"\.tile_scores: expected per")
    refused(lambda r: r["coarse"]["gate_scores"]["maxima"][0].__setitem__(0, "x"), gate_scores + r"\.maxima: expected")

    def narrow(r: dict) -> None:  # one tile location fewer than the bundle's grid, everywhere
        g = r["coarse"]["gate_scores"]
        g["maxima"] = [row[:-1] for row in g["maxima"]]
        g["tile_scores"] = [[row[:-1] for row in m] for m in g["tile_scores"]]

    refused(narrow, gate_scores + r": expected 1 member\(s\) x 4 tile locations")

    def tiled(r: dict) -> None:
        r["coarse"]["tiling"].update(tile=[32, 32], stride=[32, 32], grid=[2, 2])

    refused(tiled, r"coarse\.tiling: expected one tile over the image_size")

    def untiled(r: dict) -> None:  # the fine bundle itself with one tile
        r["tiling"].update(tile=[64, 64], stride=[64, 64], grid=[1, 1])
        member = r["members"][0]
        member["banks"] = member["banks"][:1]
        member["indexes"] = [x for x in member["indexes"] if x["file"] == member["banks"][0]]
        r["calibration"]["members"][0]["per_location"] = r["calibration"]["members"][0]["per_location"][:1]

    refused(untiled, r"coarse: a coarse stage gates the tiles of a tiled bundle")


def test_calibrate_refits_the_gate_at_the_new_threshold_on_exports_and_the_good_images(
    spatial: dict[str, Path],
) -> None:
    from tilecore.export.coarse import zmaps_of
    from tilecore.runtime.manifest import read_manifest
    from tilecore.runtime.recalibrate import recalibrate
    from tilecore.runtime.spatial import coarse_tile_maxima, fit_gate

    good = spatial["root"] / "data" / "gravel" / "test" / "good"
    out = spatial["root"] / "recalibrated"
    recalibrate(spatial["bundle"], str(good / "*.png"), out, target_fpr=0.34, device="cpu")
    before, after = read_manifest(spatial["bundle"]), read_manifest(out)
    old, new = before.coarse.gate, after.coarse.gate
    assert new.scores == old.scores and new.calibration_images == old.calibration_images + 3
    # the reference: the gate fit on export's images plus the good images scored by the PyTorch models
    from tilecore.runtime.image_io import read_rgb

    images = [read_rgb(p) for p in sorted(good.glob("*.png"))]
    fine, coarse = models(spatial)
    maxima, normal, tiles = old.scores.arrays()
    good_maxima = coarse_tile_maxima(zmaps_of(coarse, images), fine.grid)  # [K, T]
    good_tiles = fine.raw_outputs(images)[0].scores  # [K, T]
    expected = fit_gate(np.concatenate([maxima, good_maxima]), np.concatenate([normal, [True] * 3]),
                        [np.concatenate([tiles[0], good_tiles])], after.thresholds.image, fine.grid,
                        before.postprocess.rule, fine.calibrations, old.target_agreement, old.margin)  # fmt: skip
    if math.isfinite(expected.tile_threshold):
        assert new.tile_threshold == pytest.approx(expected.tile_threshold, abs=1e-3)
    else:
        assert new.tile_threshold == expected.tile_threshold
    assert new.agreement == expected.agreement and new.tile_share == expected.tile_share
