"""`tilecore train --ray` and `tilecore eval --ray` on a real two-node Ray cluster (tests.ray_cluster) give the
files a local run gives, byte for byte, also when a worker is killed in the middle of a bank.

The config is the demo's (the defaults: one tf_efficientnet_lite0 member with its real ImageNet weights, 256
px, untiled), on a smaller synthetic dataset of the demo's three categories; a second, tiled two-member
config sends more tasks than the cluster has slots (banks per tile location, calibrations queued behind
them)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import faiss
import pytest
import torch

from tests.cli import describe, run_cli, run_cli_here, toml_text
from tests.ray_cluster import kill_first_task
from tilecore.train.synth import build_synth_dataset

DEMO_CATEGORIES = ("brick", "grass", "gravel")
TILED = {
    "data": {"image_size": 64, "val_fraction": 0.25},
    "members": [
        {"backbone": "resnet18", "layers": ["layer2", "layer3"], "pretrained": False,
         "pretrain_embed_dimension": 32, "target_embed_dimension": 16},
        {"backbone": "resnet18", "layers": ["layer1", "layer2"], "pretrained": False,
         "pretrain_embed_dimension": 32, "target_embed_dimension": 16},
    ],
    "tiling": {"tile_size": [32], "stride": [32]},
}  # fmt: skip
VARYING = {"metadata.json"}  # timings, memory, where the work ran: everything else must match byte for byte
EVAL_FILES = ("metrics.json", "test_scores.json")  # eval's, compared in their own test


def run_files(run: Path) -> dict[str, bytes]:
    """What `train` wrote into `run`, by relative path."""
    files = [p for p in sorted(run.rglob("*")) if p.is_file() and p.name not in EVAL_FILES]
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


def assert_same_run(local: Path, remote: Path) -> None:
    a, b = run_files(local), run_files(remote)
    assert sorted(a) == sorted(b)
    differing = [name for name in a if a[name] != b[name] and name not in VARYING]
    assert not differing, differing


def ok(proc) -> None:
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray_train")
    build_synth_dataset(root / "data", 256, n_train=10, n_test_good=2, n_test_defect=3, categories=DEMO_CATEGORIES)
    (root / "demo.toml").write_text(toml_text({"data": {"val_fraction": 0.2}}))
    (root / "tiled.toml").write_text(toml_text(TILED))
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """This process computes with one torch thread, as each Ray task does (ray.num_cpus 1): a backbone's
    float sums depend on the thread count, so only runs with the same count can match byte for byte."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(3)  # as another caller may leave it: each kNN job sets it to torch's count again
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_demo(work: Path) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_thread
    faiss.omp_set_num_threads(3)
    try:
        ok(run_cli_here("train", "demo.toml", "--data", "data", "--out", "runs/local", cwd=work))
        ok(run_cli_here("eval", "runs/local", cwd=work))
    finally:
        torch.set_num_threads(before)
    return work / "runs" / "local"


def test_ray_training_of_the_demo_config_equals_the_local_run(work: Path, local_demo: Path, ray_cluster: str) -> None:
    ok(run_cli_here("train", "demo.toml", "--data", "data", "--out", "runs/ray", "--ray", ray_cluster, cwd=work))
    assert_same_run(local_demo, work / "runs" / "ray")
    metadata = json.loads((work / "runs" / "ray" / "metadata.json").read_text())
    assert metadata["execution"]["executor"] == "ray" and metadata["execution"]["nodes"] == 2
    assert json.loads((local_demo / "metadata.json").read_text())["execution"] == {
        "executor": "local",
        "torch_threads": 1,
    }


def test_ray_eval_writes_the_local_scores_and_metrics(work: Path, local_demo: Path, ray_cluster: str) -> None:
    remote = work / "runs" / "ray_eval"
    shutil.copytree(local_demo, remote, ignore=shutil.ignore_patterns(*EVAL_FILES))  # the same trained run
    ok(run_cli_here("eval", str(remote), "--ray", ray_cluster, cwd=work))
    for category in DEMO_CATEGORIES:
        name = f"{category}/test_scores.json"
        assert (remote / name).read_bytes() == (local_demo / name).read_bytes()

    def without_times(report: dict) -> dict:
        for metrics in report["categories"].values():
            metrics.pop("eval_seconds")
        return report

    a, b = (json.loads((run / "metrics.json").read_text()) for run in (local_demo, remote))
    assert without_times(a) == without_times(b)
    assert list(b["categories"]) == list(DEMO_CATEGORIES)  # in the run's order, not the order tasks finished


def test_a_killed_worker_costs_only_its_task(work: Path, local_demo: Path, ray_cluster: str) -> None:
    """A separate driver process trains through the cluster; a worker running a bank is SIGKILLed mid-task;
    Ray reruns that task and the run ends with the local run's files."""
    import subprocess
    import sys

    out = work / "runs" / "killed"
    args = ["train", "demo.toml", "--data", "data", "--out", str(out), "--ray", ray_cluster]
    driver = subprocess.Popen([sys.executable, "-m", "tilecore.cli", *args], cwd=work, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        kill_first_task("bank_task")
        stdout, stderr = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, stderr
    assert_same_run(local_demo, out)


def test_tiled_ensemble_through_ray_equals_local(work: Path, ray_cluster: str, one_thread: None) -> None:
    ok(run_cli_here("train", "tiled.toml", "--data", "data", "--out", "runs/tiled_local", cwd=work))
    ok(run_cli("train", "tiled.toml", "--data", "data", "--out", "runs/tiled_ray", "--ray", ray_cluster, cwd=work))
    assert len(list((work / "runs" / "tiled_ray").glob("*/banks/*.safetensors"))) == 3 * 2 * 4
    assert_same_run(work / "runs" / "tiled_local", work / "runs" / "tiled_ray")


def test_bad_or_unreachable_cluster_is_one_line(work: Path) -> None:
    from tests.cli import assert_one_line_refusal

    proc = run_cli("train", "demo.toml", "--data", "data", "--out", "runs/nowhere", "--ray", "nowhere", cwd=work)
    assert_one_line_refusal(proc, r"--ray 'nowhere': expected auto")
    assert not (work / "runs" / "nowhere").exists()
    proc = run_cli("eval", "runs/nowhere", "--ray", "127.0.0.1:9", cwd=work)  # the run is checked first
    assert_one_line_refusal(proc, r"run runs/nowhere: folder not found")
    local_demo_config = work / "demo.toml"
    proc = run_cli("train", local_demo_config, "--out", "runs/nowhere", "--ray", "127.0.0.1:9", cwd=work)
    assert_one_line_refusal(proc, r"--ray 127.0.0.1:9: no Ray cluster reachable")
    assert not (work / "runs" / "nowhere").exists()
