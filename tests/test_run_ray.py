"""`tilecore run --ray ADDRESS`: Ray actors score the batches, the driver writes the same lines a local run writes."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cli import assert_one_line_refusal, describe, run_cli_here
from tests.ray_cluster import kill_first_task, task_processes  # the ray_cluster fixture: tests/conftest.py
from tests.runtime.test_run_stream import FakePredictor, numbered_images, strict_lines, tiny_bundle
from tests.test_run_cli import lines
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.run_stream import BatchScorer, run_stream, timed_batch

TIMING = "timings_ms"  # measured in each process: the one field allowed to differ
COUNTED = ("images", "failed", "anomalous", "resumed", "completed")
# An actor's process is titled ray::BatchWorker, ray::BatchWorker.__init__ while it opens the bundle, and
# ray::BatchWorker.predict_batch while it scores (/proc/PID/cmdline): the prefix finds it in any of these.
ACTOR = "BatchWorker"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def inputs(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images (copies of the tiny dataset's test images) and one unreadable file among them."""
    folder = tmp_path_factory.mktemp("inputs")
    tests = sorted((bundle.parent / "data" / "gravel" / "test").glob("*/*.png"))
    for i in range(12):
        shutil.copy(tests[i % len(tests)], folder / f"{i:02d}_{tests[i % len(tests)].parent.name}.png")
    (folder / "05a_corrupt.png").write_bytes(b"\x89PNG nonsense")
    return folder


def run(bundle: Path, inputs: Path, out: Path, *extra: str) -> list[dict]:
    """`tilecore run` in this process (connected to the test cluster); its records without their timings.

    Default --threads in both runs: the driver's onnxruntime/FAISS and an actor's (OMP_NUM_THREADS=1) agree.
    """
    proc = run_cli_here("run", bundle, inputs, "--out", out, "--device", "cpu", "--batch", "2", *extra)
    assert proc.returncode == 0, describe(proc)
    return [{key: value for key, value in record.items() if key != TIMING} for record in lines(out)]


def counts(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return {key: summary.get(key) for key in COUNTED}


@pytest.fixture(scope="module")
def local(bundle: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("local") / "out"
    return run(bundle, inputs, out), counts(out)


def test_ray_run_writes_the_local_lines(
    bundle: Path, inputs: Path, local: tuple[list[dict], dict], ray_cluster: str, tmp_path: Path
) -> None:
    records, summary = local
    assert len(records) == 13 and [r["input"] for r in records if "error" in r] == [str(inputs / "05a_corrupt.png")]
    out = tmp_path / "out"
    assert run(bundle, inputs, out, "--ray", ray_cluster, "--ray-actors", "2") == records  # same lines, same order
    assert counts(out) == summary and summary["images"] == 12 and summary["failed"] == 1


def test_killed_actor_retries_its_batches(
    bundle: Path, inputs: Path, local: tuple[list[dict], dict], ray_cluster: str, tmp_path: Path
) -> None:
    deadline = time.monotonic() + 30
    while task_processes(ACTOR) and time.monotonic() < deadline:  # an earlier run's actors, on their way out
        time.sleep(0.1)
    killed: list[int | BaseException] = []

    def kill() -> None:
        try:
            killed.append(kill_first_task(ACTOR, timeout_s=60))
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it below
            killed.append(exc)

    killer = threading.Thread(target=kill, daemon=True)
    killer.start()  # kills the first actor process it sees; Ray restarts it and sends its batches again
    out = tmp_path / "out"
    records = run(bundle, inputs, out, "--ray", ray_cluster, "--ray-actors", "2")
    killer.join(timeout=60)
    assert killed and isinstance(killed[0], int), killed
    assert records == local[0] and counts(out) == local[1]


def test_worker_without_the_bundle_is_one_line(ray_cluster: str, tmp_path: Path) -> None:
    import ray

    from tilecore.runtime.ray_run import ray_scorer

    scorer = ray_scorer(ray, tmp_path / "missing", 1, {"device": "cpu"})
    with pytest.raises(TilecoreError, match=r"^--ray: a Ray worker cannot open the bundle \(bundle .*missing"):
        scorer.collect(scorer.submit([np.zeros((64, 64, 3), np.uint8)]))


def test_ray_actors_below_one_is_refused(bundle: Path, inputs: Path, tmp_path: Path) -> None:
    proc = run_cli_here("run", bundle, inputs, "--out", tmp_path / "out", "--ray", "local", "--ray-actors", "0")
    assert_one_line_refusal(proc, r"--ray-actors 0: expected >= 1")
    assert not (tmp_path / "out").exists()
    proc = run_cli_here("run", bundle, inputs, "--out", tmp_path / "out", "--ray", "local", "--ray-gpus", "-1")
    assert_one_line_refusal(proc, r"--ray-gpus -1: expected >= 0")
    assert not (tmp_path / "out").exists()


def test_batches_in_flight_are_written_in_input_order(tmp_path: Path) -> None:
    """A scorer keeping 3 batches in flight (no Ray): records in input order, never more than 3 outstanding,
    and a batch with nothing usable is not submitted."""
    numbered_images(tmp_path / "in", 9)
    (tmp_path / "in" / "004a_empty.png").write_bytes(b"")
    (tmp_path / "in" / "004b_empty.png").write_bytes(b"")
    predictor = FakePredictor()
    outstanding: list[list[np.ndarray]] = []
    most = 0

    def submit(images: list[np.ndarray]) -> object:
        nonlocal most
        outstanding.append(images)
        most = max(most, len(outstanding))
        return images

    def collect(handle: object) -> tuple[list, float]:
        assert handle is outstanding[0], "collected out of submission order"
        return timed_batch(predictor, outstanding.pop(0))

    scorer = BatchScorer(submit, collect, in_flight=3)
    summary = run_stream(predictor, str(tmp_path / "in"), tmp_path / "out", batch_size=2, scorer=scorer)
    names = [Path(r["input"]).name for r in strict_lines(tmp_path / "out" / "results.jsonl")]
    assert names == sorted(p.name for p in (tmp_path / "in").iterdir())
    assert most == 3 and predictor.seen == list(range(1, 10)) and not outstanding
    assert (summary["images"], summary["failed"], summary["completed"]) == (9, 2, True)
