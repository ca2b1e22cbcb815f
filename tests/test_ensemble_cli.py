"""Multi-member tiled ensembles through the CLI: training, calibration, evaluation, kill-and-resume.

The first training run and the killed one are real subprocesses; the other commands go through the same entry
point in this process (run_cli_here), which saves the torch import each subprocess pays."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.cli import assert_one_line_refusal, run_cli, run_cli_here
from tests.test_cli import assert_ok, read_json, write_config
from tests.train.test_metrics import brute_force_f1, pairwise_auroc
from tilecore.runtime.calibration import balanced_f1_threshold
from tilecore.train.synth import build_synth_dataset

CATEGORIES = ("brick", "gravel")
MEMBER = {"backbone": "resnet18", "pretrained": False, "pretrain_embed_dimension": 32, "target_embed_dimension": 16}
ENSEMBLE = {  # two random resnet18 members on a 3 x 3 grid of overlapping tiles (ENS9's geometry at 64 px)
    "data": {"image_size": 64, "val_fraction": 0.25},
    "tiling": {"tile_size": [32], "stride": [16], "image_score": "max"},
    "members": [{**MEMBER, "layers": ["layer2", "layer3"]}, {**MEMBER, "layers": ["layer1", "layer2"]}],
    "fusion": {"rule": "mean"},
}
BANKS_PER_CATEGORY = 2 * 9


def bank_bytes(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("*/banks/*.safetensors"))}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ensemble")
    build_synth_dataset(root / "data", 256, n_train=8, n_test_good=3, n_test_defect=5, categories=CATEGORIES)
    write_config(root / "ens.toml", ENSEMBLE)
    return root


@pytest.fixture(scope="module")
def full_run(work: Path) -> Path:
    assert_ok(run_cli("train", "ens.toml", "--data", "data", "--out", "runs/full", cwd=work))
    return work / "runs" / "full"


def test_every_member_and_tile_location_gets_a_bank(full_run: Path) -> None:
    banks = bank_bytes(full_run)
    assert len(banks) == len(CATEGORIES) * BANKS_PER_CATEGORY
    assert "brick/banks/m1_t2_2.safetensors" in banks
    for category in CATEGORIES:
        calibration = read_json(full_run / category / "calibration.json")
        assert len(calibration["members"]) == 2
        assert all(len(m["per_location"]) == 9 for m in calibration["members"])
        # the validation split holds normal images only, so the threshold separates them from synthetic defects
        # painted into them (balanced F1)
        scores = calibration["validation_fused_scores"]
        assert calibration["validation_images"] == len(scores) == 2  # 8 training images x 0.25
        assert calibration["thresholds"]["image_rule"].startswith("synthetic balanced f1")
        expected = balanced_f1_threshold(scores, calibration["synthetic_fused_scores"])
        assert calibration["thresholds"]["image"] == pytest.approx(expected, rel=1e-9)
        # each member's image scores are standard scores against these very 2 images, i.e. -1 and +1; the
        # mean fusion of two members gives -1, +1 (members agree on the order) or 0, 0 (they disagree)
        fused = sorted(scores)
        assert np.allclose(fused, [-1.0, 1.0], atol=1e-4) or np.allclose(fused, [0.0, 0.0], atol=1e-4), fused


def pixel_truth(full_run: Path, category: str) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """({image: score}, anomaly maps [N, 64, 64], masks [N, 64, 64]) of the test split, scored again here."""
    from tilecore.runtime.image_io import read_mask, read_rgb
    from tilecore.train.data import load_category
    from tilecore.train.ensemble import load_category_model
    from tilecore.train.model import load_embedder
    from tilecore.train.run_dir import load_run_config

    config = load_run_config(full_run)
    data = load_category(config.data.root, category, config.data.format, 0.25, config.data.split_seed)
    embedders = [load_embedder(config, full_run, i) for i in range(len(config.members))]
    model = load_category_model(config, full_run, category, embedders)
    scores, maps = model.predict([read_rgb(s.image) for s in data.test])
    masks = [
        np.zeros((64, 64), bool)
        if s.mask is None
        else cv2.resize(read_mask(s.mask).astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST) > 0
        for s in data.test
    ]
    return {str(s.image): float(v) for s, v in zip(data.test, scores, strict=True)}, maps, np.stack(masks)


def test_ensemble_evaluates(full_run: Path, work: Path) -> None:
    from tilecore.train.metrics import aupro

    assert_ok(run_cli_here("eval", "runs/full", cwd=work))  # a subprocess in tests/test_cli.py
    metrics = read_json(full_run / "metrics.json")
    for category in CATEGORIES:
        values = metrics["categories"][category]
        per_image = read_json(full_run / category / "test_scores.json")
        labels = np.array([r["label"] for r in per_image])
        scores = np.array([r["score"] for r in per_image])
        assert values["test_images"] == len(per_image) == 8 and labels.sum() == 5  # 3 good, 5 defects
        assert values["image_auroc"] == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)
        assert values["f1_max"] == pytest.approx(brute_force_f1(labels, scores), abs=1e-12)
        threshold = read_json(full_run / category / "calibration.json")["thresholds"]["image"]
        flagged = scores >= threshold
        assert values["threshold_recall"] == pytest.approx(flagged[labels == 1].mean(), abs=1e-12)
        assert values["threshold_precision"] == pytest.approx(
            (flagged & (labels == 1)).sum() / max(flagged.sum(), 1), abs=1e-12
        )
        again, maps, masks = pixel_truth(full_run, category)
        assert again == pytest.approx({r["image"]: r["score"] for r in per_image}, rel=1e-5)
        assert values["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
        assert values["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-6)
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert metrics["mean"][key] == pytest.approx(np.mean([metrics["categories"][c][key] for c in CATEGORIES]))


def test_killed_run_resumes_to_the_same_result(full_run: Path, work: Path) -> None:
    command = [sys.executable, "-m", "tilecore.cli", "train", "ens.toml", "--data", "data", "--out", "runs/killed"]
    proc = subprocess.Popen(command, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    banks_dir = work / "runs" / "killed" / "brick" / "banks"
    deadline = time.monotonic() + 120
    while not any(banks_dir.glob("*.safetensors")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = work / "runs" / "killed"
    assert 0 < len(bank_bytes(killed)) < len(CATEGORIES) * BANKS_PER_CATEGORY, "the kill came too late"
    assert not (killed / "gravel" / "calibration.json").exists()

    assert_ok(run_cli_here("train", "ens.toml", "--data", "data", "--out", "runs/killed", cwd=work))
    assert bank_bytes(killed) == bank_bytes(full_run)
    for category in CATEGORIES:
        assert read_json(killed / category / "calibration.json") == read_json(full_run / category / "calibration.json")
    assert not list(killed.rglob("*.tmp"))


def test_members_trained_separately_then_combined(full_run: Path, work: Path) -> None:
    for member in ("0", "1"):
        assert_ok(
            run_cli_here("train", "ens.toml", "--data", "data", "--out", "runs/split", "--member", member, cwd=work)
        )
    split = work / "runs" / "split"
    assert bank_bytes(split) == bank_bytes(full_run)
    # the second member's run found every bank and calibrated
    assert read_json(split / "gravel" / "calibration.json") == read_json(full_run / "gravel" / "calibration.json")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"members": [ENSEMBLE["members"][0], {**MEMBER, "layers": ["layer2", "features.denseblock2"]}]},
            r"member 1.*features\.denseblock2.*layer3",
        ),
        ({"tiling": {"tile_size": [128]}}, r"tile size 128x128: expected 1\.\.image size 64x64"),
        ({"tiling": {"tile_size": [32], "stride": [0]}}, r"tile stride 0x0: expected"),
        ({"tiling": {"tile_size": [32], "stride": [48]}}, r"tile stride 48x48: expected"),
        ({"data": {"image_size": 64, "val_fraction": 0.05}}, r"1 validation images, calibration needs 2"),
    ],
)
def test_bad_ensembles_fail_before_any_work(work: Path, change: dict, message: str) -> None:
    name = f"bad_{abs(hash(json.dumps(change, sort_keys=True)))}"
    write_config(work / f"{name}.toml", {**ENSEMBLE, **change})
    proc = run_cli_here("train", f"{name}.toml", "--data", "data", "--out", f"runs/{name}", cwd=work)
    assert_one_line_refusal(proc, message)
    assert not (work / "runs" / name).exists()
