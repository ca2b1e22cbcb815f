"""One Predictor shared by 4 threads gives exactly the single-threaded results, on every backend: ONNX
Runtime, OpenVINO (one stream and two) and the native TensorRT engine through the GPU fakes, whose execution
context raises when two threads are inside it at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests import gpu_fakes
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.predictor import Predictor, Result

THREADS, PER_THREAD = 4, 25
A10, ORIN = ("NVIDIA Fake A10", 8, 6), ("NVIDIA Fake Orin", 8, 7)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run exported once with a (fake-built) TensorRT engine beside its ONNX graph: one bundle for all."""
    return gpu_fakes.tensorrt_bundle(tmp_path_factory.mktemp("threads"), gpus=(A10,))


@pytest.fixture(scope="module")
def images(bundle: Path) -> list[np.ndarray]:
    """THREADS * PER_THREAD distinct images: each thread scores its own, so a result landing in the wrong
    thread (or built from another call's embeddings) differs from the single-threaded one."""
    paths = sorted((bundle.parent / "data" / "gravel").glob("**/*.png"))
    bases = [read_rgb(p) for p in paths]
    return [np.roll(bases[i % len(bases)], 7 * i, axis=1) for i in range(THREADS * PER_THREAD)]


def score_in_threads(predictor: Predictor, images: list[np.ndarray]) -> list[Result]:
    """Each of THREADS threads scores its slice, one image per call (the most calls, the most collisions)."""
    start = threading.Barrier(THREADS)

    def work(offset: int) -> list[Result]:
        start.wait()
        return [predictor.predict(image) for image in images[offset : offset + PER_THREAD]]

    with ThreadPoolExecutor(THREADS) as pool:
        slices = list(pool.map(work, range(0, len(images), PER_THREAD)))
    return [result for part in slices for result in part]


def assert_same_results(threaded: list[Result], single: list[Result]) -> None:
    assert len(threaded) == len(single)
    wrong = [i for i, (t, s) in enumerate(zip(threaded, single, strict=True)) if t.score != s.score]
    assert not wrong, f"{len(wrong)} of {len(single)} scores differ from single-threaded ones, e.g. image {wrong[0]}"
    for t, s in zip(threaded, single, strict=True):
        assert t.label == s.label
        np.testing.assert_array_equal(t.anomaly_map, s.anomaly_map)
        np.testing.assert_array_equal(t.mask, s.mask)


@pytest.mark.parametrize(
    ("device", "streams", "provider"),
    [("cpu", 1, "CPUExecutionProvider"), ("openvino", 1, "OpenVINO"), ("openvino", 2, "2 streams")],
)
def test_shared_predictor_gives_single_threaded_results(
    bundle: Path, images: list[np.ndarray], tmp_path: Path, monkeypatch, device: str, streams: int, provider: str
) -> None:
    """OpenVINO is part of the dev install: where it is missing, Predictor raises and this test fails."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # OpenVINO's compiled-model cache
    predictor = Predictor(bundle, device=device, threads=2, streams=streams)
    assert provider in predictor.providers[0]
    single = [predictor.predict(image) for image in images]
    assert_same_results(score_in_threads(predictor, images), single)


def test_shared_native_tensorrt_engine_gives_single_threaded_results(
    bundle: Path, images: list[np.ndarray], monkeypatch
) -> None:
    """On the second GPU: CUDA's current device is per thread, so each call must set it (the fake checks)."""
    trt, _ = gpu_fakes.install(monkeypatch, gpus=[ORIN, A10])
    predictor = Predictor(bundle, device="tensorrt-native", gpu_id=1)
    assert predictor.providers[0].startswith("TensorRT") and "cuda:1" in predictor.providers[0]
    (context,) = trt.contexts
    before = context.entered  # loading may run the engine (a check of its output shape)
    single = [predictor.predict(image) for image in images]
    assert_same_results(score_in_threads(predictor, images), single)
    assert context.entered - before == 2 * len(images)  # every call went through the one context, none overlapped


def test_fake_context_catches_two_threads_at_once(bundle: Path, monkeypatch) -> None:
    """The check the test above relies on: the fake context refuses a second thread while one is inside."""
    trt, _ = gpu_fakes.install(monkeypatch, gpus=[A10])
    predictor = Predictor(bundle, device="tensorrt-native")
    (context,) = trt.contexts
    inside, leave = threading.Event(), threading.Event()
    run = context.engine.session.run

    def slow_run(*args: object) -> list:
        inside.set()
        leave.wait(5)
        return run(*args)

    monkeypatch.setattr(context.engine.session, "run", slow_run, raising=False)
    image = np.zeros((64, 64, 3), np.uint8)
    first = threading.Thread(target=predictor.predict, args=(image,))
    first.start()
    assert inside.wait(5)
    try:
        with pytest.raises(AssertionError, match="two threads in one TensorRT execution context"):
            context.execute_async_v3(next(iter(context.streams)))
    finally:
        leave.set()
        first.join()
