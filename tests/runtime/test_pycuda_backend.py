"""`--device tensorrt-native` and `export --tensorrt` through pycuda where cuda-python is absent: the device's
retained primary context pushed and popped around each call in whichever thread makes it, engines freed
before the context goes, pycuda's failures and a missing libcuda as the one-line backend-missing refusal.
Through a fake `pycuda` package (gpu_fakes.FakePyCuda) put in sys.modules."""

from __future__ import annotations

import re
import shutil
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests import gpu_fakes
from tilecore.export.tensorrt_build import TensorRTBuild, build_engine, check_build_stack
from tilecore.runtime.engines.base import BackendMissing, EngineOptions
from tilecore.runtime.engines.opener import open_engine
from tilecore.runtime.engines.tensorrt import TensorRTEngine
from tilecore.runtime.manifest import read_manifest

A10 = ("NVIDIA Fake A10", 8, 6)
ORIN = ("NVIDIA Fake Orin", 8, 7)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gpu_fakes.tensorrt_bundle(tmp_path_factory.mktemp("pycuda"), gpus=(A10,))


def graph_of(bundle: Path) -> Path:
    return bundle / read_manifest(bundle).members[0].engine


def test_native_engine_runs_through_pycudas_primary_context(bundle: Path, monkeypatch) -> None:
    trt, driver = gpu_fakes.install_pycuda(monkeypatch, gpus=[ORIN, A10])
    bundle_path = graph_of(bundle)
    native = open_engine(bundle_path, EngineOptions("tensorrt-native", gpu_id=1, max_batch=3))
    assert isinstance(native, TensorRTEngine) and native.cuda.name == "pycuda"
    assert native.provider.endswith("on NVIDIA Fake A10 (cuda:1)")
    assert driver.calls["retain_primary_context"] == 1 and driver.retained[1] == 1  # no context of its own
    assert "pycuda.autoinit" not in sys.modules
    tiles = np.random.default_rng(0).normal(size=(7, 3, 32, 32)).astype(np.float32)
    expected = open_engine(bundle_path, EngineOptions("cpu")).run(tiles)
    np.testing.assert_allclose(native.run(tiles), expected, rtol=1e-5, atol=1e-6)
    assert driver.thread_stack() == []  # popped again: the caller's own context stack is left as it was
    with ThreadPoolExecutor(2) as pool:  # threads with no context of their own push it themselves
        for got in pool.map(native.run, [tiles, tiles[:2]]):
            np.testing.assert_allclose(got, expected[: len(got)], rtol=1e-5, atol=1e-6)
    assert driver.calls["push"] == driver.calls["pop"]
    with ThreadPoolExecutor(1) as pool:
        pool.submit(native.close).result()  # the fake raises if the context went before the engine
    assert driver.retained[1] == 0 and trt.engines == [] and driver.core.buffers == {}


def test_cuda_python_wins_when_both_bindings_import(bundle: Path, monkeypatch) -> None:
    _, cudart = gpu_fakes.install(monkeypatch, gpus=[A10])
    core = gpu_fakes.FakeGpus([A10])
    driver = gpu_fakes.FakePyCuda(core)
    package = types.ModuleType("pycuda")
    package.__path__, package.driver = [], driver
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    native = open_engine(graph_of(bundle), EngineOptions("tensorrt-native"))
    assert native.cuda.name == "cuda-python" and cudart.calls["cudaMalloc"] == 2
    assert sum(driver.calls.values()) == 0  # never imported into use


def libcuda_missing(monkeypatch, tmp_path: Path) -> None:
    """pycuda installed on a machine without the driver: importing pycuda.driver fails on libcuda.so.1."""
    folder = tmp_path / "pycuda"
    folder.mkdir()
    (folder / "driver.py").write_text(
        "raise ImportError('libcuda.so.1: cannot open shared object file: No such file or directory')\n"
    )
    package = types.ModuleType("pycuda")
    package.__path__ = [str(folder)]
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.delitem(sys.modules, "pycuda.driver", raising=False)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("libcuda", "pycuda is installed but libcuda does not load (libcuda.so.1: cannot open shared object file"),
        ("init", "no usable CUDA GPU or driver (pycuda: cuInit failed: no CUDA-capable device is detected)"),
        ("gpu_id", "--gpu-id 3 requested, this machine has 1 GPU(s)"),
        ("none", "no CUDA binding: the cuda-python package is not installed, nor pycuda"),
    ],
)
def test_pycuda_failures_are_the_backend_missing_refusal(
    bundle: Path, monkeypatch, tmp_path: Path, state: str, message: str
) -> None:
    init_error = "cuInit failed: no CUDA-capable device is detected" if state == "init" else None
    gpu_fakes.install_pycuda(monkeypatch, gpus=[A10], init_error=init_error)
    if state == "libcuda":
        libcuda_missing(monkeypatch, tmp_path)
    if state == "none":
        monkeypatch.setitem(sys.modules, "pycuda", None)
        monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    gpu_id = 3 if state == "gpu_id" else 0
    pattern = rf"^--device tensorrt-native: .*{re.escape(message)}"
    with pytest.raises(BackendMissing, match=pattern) as caught:
        open_engine(graph_of(bundle), EngineOptions("tensorrt-native", gpu_id=gpu_id))
    assert "\n" not in str(caught.value)
    assert not isinstance(open_engine(graph_of(bundle), EngineOptions("auto", gpu_id=gpu_id)), TensorRTEngine)


def test_a_pycuda_error_mid_load_is_a_one_line_refusal(bundle: Path, monkeypatch) -> None:
    _, driver = gpu_fakes.install_pycuda(monkeypatch, gpus=[A10])

    def out_of_memory(size: int) -> None:
        raise gpu_fakes.PyCudaError("cuMemAlloc failed: out of memory")

    monkeypatch.setattr(driver, "mem_alloc", out_of_memory)
    with pytest.raises(BackendMissing, match=r"^CUDA mem_alloc failed \(pycuda\): cuMemAlloc failed: out of memory$"):
        open_engine(graph_of(bundle), EngineOptions("tensorrt-native"))
    assert driver.retained[0] == 0 and driver.thread_stack() == []  # released and popped on the way out


def test_export_builds_with_pycudas_context_pushed(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / graph_of(bundle).name
    shutil.copy(graph_of(bundle), target)
    trt, driver = gpu_fakes.install_pycuda(monkeypatch, gpus=[ORIN, A10])
    build = TensorRTBuild(max_batch=4, gpu_id=1)
    stack = check_build_stack(build)
    assert stack.cuda.name == "pycuda" and stack.gpu.name == "NVIDIA Fake A10"
    record = build_engine(target, build, stack, None)  # the fake builder raises where no context is current
    (call,) = trt.builds
    assert call["device"] == 1 and record.gpu_name == "NVIDIA Fake A10"
    assert driver.thread_stack() == []


def test_pycuda_is_taken_when_cuda_python_is_of_another_cuda_major(monkeypatch) -> None:
    """torch 2.14's cuda-bindings 13 beside a tensorrt-cu12: pycuda (local toolkit) rather than a second CUDA."""
    from tilecore.runtime.engines import gpu_stack

    gpu_fakes.install_pycuda(monkeypatch, gpus=[A10])
    gpu_fakes.install_cuda_python(monkeypatch, gpu_fakes.FakeCudart(gpu_fakes.FakeGpus([A10])))
    monkeypatch.setattr(gpu_stack, "cuda_majors", lambda: ("13", "12"))
    binding = gpu_stack.open_cuda(0, "test")
    assert binding.name == "pycuda"
    binding.close()
    for same in (("12", "12"), ("13", None)):  # the same major, or nothing known: cuda-python
        monkeypatch.setattr(gpu_stack, "cuda_majors", lambda same=same: same)
        assert gpu_stack.open_cuda(0, "test").name == "cuda-python"
