"""Multi-member tiled ensembles through the CLI: training, calibration, evaluation, kill-and-resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import assert_ok, assert_user_error, cli, read_json, write_config
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
    assert_ok(cli("train", "ens.toml", "--data", "data", "--out", "runs/full", cwd=work))
    return work / "runs" / "full"


def test_every_member_and_tile_location_gets_a_bank(full_run: Path) -> None:
    banks = bank_bytes(full_run)
    assert len(banks) == len(CATEGORIES) * BANKS_PER_CATEGORY
    assert "brick/banks/m1_t2_2.safetensors" in banks
    for category in CATEGORIES:
        calibration = read_json(full_run / category / "calibration.json")
        assert len(calibration["members"]) == 2
        assert all(len(m["per_location"]) == 9 for m in calibration["members"])
        # fused validation scores are normalised: their threshold is a quantile of them
        scores = calibration["validation_fused_scores"]
        assert min(scores) <= calibration["thresholds"]["image"] <= max(scores)


def test_ensemble_evaluates(full_run: Path, work: Path) -> None:
    assert_ok(cli("eval", "runs/full", cwd=work))
    metrics = read_json(full_run / "metrics.json")
    for category in CATEGORIES:
        values = metrics["categories"][category]
        assert all(0.0 <= values[k] <= 1.0 for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max"))
        assert 0.0 <= values["threshold_recall"] <= 1.0


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

    assert_ok(cli("train", "ens.toml", "--data", "data", "--out", "runs/killed", cwd=work))
    assert bank_bytes(killed) == bank_bytes(full_run)
    for category in CATEGORIES:
        assert read_json(killed / category / "calibration.json") == read_json(full_run / category / "calibration.json")
    assert not list(killed.rglob("*.tmp"))


def test_members_trained_separately_then_combined(full_run: Path, work: Path) -> None:
    for member in ("0", "1"):
        assert_ok(cli("train", "ens.toml", "--data", "data", "--out", "runs/split", "--member", member, cwd=work))
    split = work / "runs" / "split"
    assert bank_bytes(split) == bank_bytes(full_run)
    # the second member's run found every bank and calibrated
    assert read_json(split / "gravel" / "calibration.json") == read_json(full_run / "gravel" / "calibration.json")


@pytest.mark.parametrize(
    ("change", "keywords"),
    [
        (
            {"members": [ENSEMBLE["members"][0], {**MEMBER, "layers": ["layer2", "features.denseblock2"]}]},
            ("member 1", "features.denseblock2", "layer3"),
        ),
        ({"tiling": {"tile_size": [128]}}, ("tile size 128x128", "64x64")),
        ({"tiling": {"tile_size": [32], "stride": [0]}}, ("tile stride 0x0",)),
        ({"tiling": {"tile_size": [32], "stride": [48]}}, ("tile stride 48x48",)),
        ({"data": {"image_size": 64, "val_fraction": 0.05}}, ("1 validation images", "calibration needs 2")),
    ],
)
def test_bad_ensembles_fail_before_any_work(work: Path, change: dict, keywords: tuple[str, ...]) -> None:
    name = f"bad_{abs(hash(json.dumps(change, sort_keys=True)))}"
    write_config(work / f"{name}.toml", {**ENSEMBLE, **change})
    proc = cli("train", f"{name}.toml", "--data", "data", "--out", f"runs/{name}", cwd=work)
    assert_user_error(proc, *keywords)
    assert not (work / "runs" / name).exists()
