"""The GPU path of the runtime on a CPU machine: engine records and the compatibility check, the fallback
order, the native TensorRT backend's data path through fake tensorrt / cuda modules, FAISS on GPU through
a fake faiss, and (marked `gpu`, skipped here) the same checks on a real GPU."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests import gpu_fakes
from tilecore.export.bundle import export_run
from tilecore.export.tensorrt_build import TensorRTBuild
from tilecore.runtime import knn_gpu as knn_gpu_module
from tilecore.runtime.engines import opener as opener_module
from tilecore.runtime.engines.base import BackendMissing, EngineOptions
from tilecore.runtime.engines.onnx_runtime import choose_providers
from tilecore.runtime.engines.opener import open_engine
from tilecore.runtime.engines.table import AUTO_ORDER
from tilecore.runtime.engines.tensorrt import TensorRTEngine
from tilecore.runtime.engines.tensorrt_plans import (
    EngineRecord,
    GpuInfo,
    Profile,
    check_compatible,
    choose_record,
    engine_file_name,
)
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.knn import BankScorer
from tilecore.runtime.knn_gpu import place_on_device
from tilecore.runtime.manifest import QdqCalibration, read_manifest, write_manifest
from tilecore.runtime.predictor import Predictor

A10 = ("NVIDIA Fake A10", 8, 6)
ORIN = ("NVIDIA Fake Orin", 8, 7)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny run exported twice: with an fp32 TensorRT engine (built by the fake on A10) and without."""
    root = tmp_path_factory.mktemp("trt_runtime")
    run = gpu_fakes.tiny_run(root)
    with pytest.MonkeyPatch.context() as patch:
        gpu_fakes.install(patch, gpus=[A10])
        export_run(run, root / "trt", tensorrt=TensorRTBuild(max_batch=4))
    export_run(run, root / "plain")
    return {"trt": root / "trt", "plain": root / "plain", "data": root / "data"}


def onnx_of(bundle: Path) -> Path:
    return bundle / read_manifest(bundle).members[0].engine


def sample_images(bundles: dict) -> list[np.ndarray]:
    return [read_rgb(p) for p in sorted((bundles["data"] / "gravel" / "test").glob("*/*.png"))]


def record(**changes: object) -> EngineRecord:
    base = EngineRecord(
        onnx="backbone_ab.onnx",
        engine="backbone_ab.nvidia-a10-sm86.engine",
        tensorrt_version="10.8.0.43",
        gpu_name="NVIDIA A10",
        compute_capability="8.6",
        precision="fp16",
        profile=Profile("images", (1, 3, 64, 64), (8, 3, 64, 64), (8, 3, 64, 64)),
        output_name="embeddings",
        workspace_gb=2.0,
    )
    return EngineRecord(**{**base.__dict__, **changes})


def test_compatibility_check_names_the_mismatch() -> None:
    a10 = GpuInfo(0, "NVIDIA A10", "8.6")
    assert check_compatible(record(), "10.8.0.43", a10) is None
    reason = check_compatible(record(), "10.9.0.34", a10)
    assert "TensorRT 10.8.0.43" in reason and "TensorRT 10.9.0.34" in reason
    reason = check_compatible(record(), "10.8.0.43", GpuInfo(0, "Orin", "8.7"))
    assert "NVIDIA A10 (8.6)" in reason and "Orin (8.7)" in reason
    reason = check_compatible(record(), "10.8.0.43", GpuInfo(1, "NVIDIA A10G", "8.6"))
    assert "NVIDIA A10G" in reason and "rebuild" in reason
    orin = record(gpu_name="Orin", compute_capability="8.7", engine="backbone_ab.orin-sm87.engine")
    assert choose_record([record(), orin], "10.8.0.43", GpuInfo(0, "Orin", "8.7"), "auto") == (orin, "")
    chosen, reason = choose_record([record()], "10.8.0.43", GpuInfo(0, "Orin", "8.7"), "auto")
    assert chosen is None and "Orin (8.7)" in reason


def test_record_round_trips_and_names_its_gpu() -> None:
    original = record(int8_calibration=QdqCalibration("onnxruntime static quantization", 64, 0.01))
    assert EngineRecord.from_dict(json.loads(json.dumps(original.to_dict()))) == original
    gpu = GpuInfo(0, "NVIDIA Jetson AGX Orin", "8.7")
    assert engine_file_name("backbone_ab.onnx", gpu) == "backbone_ab.nvidia-jetson-agx-orin-sm87.engine"


def test_auto_walks_the_fallback_order(monkeypatch) -> None:
    tried = []

    def fake_backend(path: Path, options: EngineOptions, device: str, graph: object = None) -> object:
        tried.append(device)
        if device != "cpu":
            raise BackendMissing(f"--device {device}: absent in this test")
        return types.SimpleNamespace(provider="CPUExecutionProvider", max_batch=options.max_batch)

    monkeypatch.setattr(opener_module, "open_backend", fake_backend)
    assert open_engine(Path("backbone_x.onnx"), EngineOptions("auto")).provider == "CPUExecutionProvider"
    assert tried == list(AUTO_ORDER) and AUTO_ORDER[:3] == ("tensorrt-native", "tensorrt", "cuda")
    with pytest.raises(BackendMissing, match="^--device tensorrt-native: absent in this test$"):
        open_engine(Path("backbone_x.onnx"), EngineOptions("tensorrt-native"))  # asked by name: no fallback


def test_native_engine_matches_onnx_runtime_without_per_batch_allocation(bundles: dict, monkeypatch) -> None:
    trt, cudart = gpu_fakes.install(monkeypatch, gpus=[A10])
    path = onnx_of(bundles["trt"])
    native = open_engine(path, EngineOptions("tensorrt-native", max_batch=3))
    assert isinstance(native, TensorRTEngine) and native.max_batch == 3
    assert native.provider == f"TensorRT {trt.__version__} fp32 on NVIDIA Fake A10 (cuda:0)"
    cpu = open_engine(path, EngineOptions("cpu"))
    tiles = np.random.default_rng(0).normal(size=(7, 3, 32, 32)).astype(np.float32)
    allocations = dict(cudart.calls)
    first = native.run(tiles)
    np.testing.assert_allclose(first, cpu.run(tiles), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(native.run(tiles[:2]), first[:2])
    (context,) = trt.contexts
    assert context.shapes_set[1:] == [(3, 3, 32, 32), (3, 3, 32, 32), (1, 3, 32, 32), (2, 3, 32, 32)]
    assert context.streams == {native.stream} and cudart.calls["cudaStreamCreate"] == 1
    for call in ("cudaMalloc", "cudaMallocHost"):
        assert cudart.calls[call] == allocations[call] == 2  # input + output, allocated once
    assert cudart.calls["cudaMemcpyHostToDevice"] == cudart.calls["cudaMemcpyDeviceToHost"] == 4
    native.close()
    assert cudart.buffers == {} and cudart.streams == set()
    with pytest.raises(TilecoreError, match=r"engine .*: used after close\(\)"):
        native.run(tiles)  # freed buffers are never touched
    wide = open_engine(path, EngineOptions("tensorrt-native", max_batch=64))
    assert wide.max_batch == 4  # the engine's profile caps the batch


def test_profile_comes_from_the_manifest_and_must_match_the_engine(bundles: dict, tmp_path: Path, monkeypatch) -> None:
    gpu_fakes.install(monkeypatch, gpus=[A10])
    bundle = tmp_path / "b"
    shutil.copytree(bundles["trt"], bundle)
    manifest = read_manifest(bundle)
    (entry,) = manifest.tensorrt
    assert entry.profile == Profile("images", (1, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32))
    stale = replace(entry, profile=replace(entry.profile, max=(8, 3, 32, 32)))  # no longer describes its engine
    write_manifest(bundle, replace(manifest, tensorrt=(stale,)))
    with pytest.raises(TilecoreError, match="profile .* differs from its manifest record"):
        open_engine(onnx_of(bundle), EngineOptions("tensorrt-native"))


@pytest.mark.parametrize(
    ("fakes", "reason"),
    [
        ({"gpus": [ORIN]}, "this GPU is NVIDIA Fake Orin (8.7)"),
        ({"gpus": [A10], "version": "10.98.0.1"}, "this is TensorRT 10.98.0.1"),
    ],
)
def test_mismatch_falls_back_with_one_warning(bundles: dict, monkeypatch, caplog, fakes: dict, reason: str) -> None:
    gpu_fakes.install(monkeypatch, **fakes)
    images = sample_images(bundles)
    with caplog.at_level(logging.WARNING, logger="tilecore"):
        predictor = Predictor(bundles["trt"], device="auto")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "tilecore"]
    assert len(warnings) == 1 and reason in warnings[0] and "\n" not in warnings[0]
    assert not any("TensorRT" in p for p in predictor.providers)
    expected = [r.score for r in Predictor(bundles["trt"], device="cpu").predict_batch(images)]
    np.testing.assert_allclose([r.score for r in predictor.predict_batch(images)], expected, rtol=1e-4)
    with pytest.raises(BackendMissing, match=reason.replace("(", r"\(").replace(")", r"\)")):
        Predictor(bundles["trt"], device="tensorrt-native")


def test_auto_runs_the_native_engine_on_the_chosen_gpu(bundles: dict, monkeypatch) -> None:
    trt, cudart = gpu_fakes.install(monkeypatch, gpus=[ORIN, A10])
    images = sample_images(bundles)
    predictor = Predictor(bundles["trt"], device="auto", gpu_id=1)
    assert predictor.providers == [f"TensorRT {trt.__version__} fp32 on NVIDIA Fake A10 (cuda:1)"]
    assert cudart.device == 1
    expected = [r.score for r in Predictor(bundles["trt"], device="cpu").predict_batch(images)]
    np.testing.assert_allclose([r.score for r in predictor.predict_batch(images)], expected, rtol=1e-5)
    assert not any("TensorRT" in p for p in Predictor(bundles["trt"], device="auto", gpu_id=0).providers)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"tensorrt": None}, "the tensorrt Python package is not installed"),
        ({"cuda.bindings": None, "cuda.bindings.runtime": None}, "the cuda-python package is not installed"),
        ({"driver_error": gpu_fakes.CudaErr.cudaErrorNoDevice}, "no usable CUDA GPU or driver (cudaErrorNoDevice)"),
        ({"gpu_id": 2}, "--gpu-id 2 requested, this machine has 1 GPU(s)"),
        ({"bundle": "plain"}, "the bundle has no TensorRT engine for backbone_"),
    ],
)
def test_missing_pieces_are_named_and_auto_falls_back(bundles: dict, monkeypatch, state: dict, message: str) -> None:
    gpu_fakes.install(monkeypatch, **({"driver_error": state["driver_error"]} if "driver_error" in state else {}))
    for module in ("tensorrt", "cuda.bindings", "cuda.bindings.runtime"):
        if module in state:
            monkeypatch.setitem(sys.modules, module, None)
    path = onnx_of(bundles[state.get("bundle", "trt")])
    gpu_id = state.get("gpu_id", 0)
    with pytest.raises(BackendMissing, match=f"^--device tensorrt-native: .*{re.escape(message)}") as caught:
        open_engine(path, EngineOptions("tensorrt-native", gpu_id=gpu_id))
    assert "\n" not in str(caught.value)
    assert not isinstance(open_engine(path, EngineOptions("auto", gpu_id=gpu_id)), TensorRTEngine)


def test_tensorrt_execution_provider_options(tmp_path: Path) -> None:
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    (trt_name, trt_options), (cuda_name, cuda_options), cpu = choose_providers("tensorrt", available, tmp_path, 2)
    assert (trt_name, cuda_name, cpu) == tuple(available)
    assert trt_options["device_id"] == 2 and cuda_options == {"device_id": 2}
    assert trt_options["trt_engine_cache_enable"] and trt_options["trt_engine_cache_path"] == str(tmp_path)
    assert trt_options["trt_timing_cache_enable"] and trt_options["trt_timing_cache_path"] == str(tmp_path)
    assert trt_options["trt_fp16_enable"] is False
    (_, no_cache), *_ = choose_providers("tensorrt", available, None)
    assert no_cache["trt_engine_cache_enable"] is False and no_cache["trt_timing_cache_enable"] is False
    with pytest.raises(BackendMissing, match="no TensorrtExecutionProvider"):
        choose_providers("tensorrt", ["CPUExecutionProvider"], tmp_path)


def test_tensorrt_ep_caches_plans_per_graph_outside_the_bundle(bundles: dict, tmp_path: Path, monkeypatch) -> None:
    """The EP's plans go to <user cache>/trt_ep/<graph sha256>, never into the (maybe read-only) bundle."""
    from tilecore.runtime.artifacts import sha256_file

    fake_ort = gpu_fakes.install_ort(monkeypatch, loads={"TensorrtExecutionProvider", "CUDAExecutionProvider"})

    class Sessions:  # the provider lists the sessions were asked for, the CPU probe's left out
        def __getitem__(self, index: int) -> list:
            return [s.asked for s in fake_ort.sessions if len(s.asked) > 1][index]

    sessions = Sessions()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home"))
    graph = onnx_of(bundles["plain"])
    open_engine(graph, EngineOptions("tensorrt"))
    folder = tmp_path / "home" / "tilecore" / "trt_ep" / sha256_file(graph)
    (_, trt_options), *_ = sessions[-1]
    assert trt_options["trt_engine_cache_path"] == trt_options["trt_timing_cache_path"] == str(folder)
    assert folder.is_dir() and not (bundles["plain"] / "trt_cache").exists()
    open_engine(graph, EngineOptions("tensorrt", cache_dir=tmp_path / "mine"))
    assert sessions[-1][0][1]["trt_engine_cache_path"] == str(tmp_path / "mine" / sha256_file(graph))
    (tmp_path / "file").write_text("")  # a cache folder that cannot be made: no cache, not a failure
    open_engine(graph, EngineOptions("tensorrt", cache_dir=tmp_path / "file"))
    assert sessions[-1][0][1]["trt_engine_cache_enable"] is False
    assert "trt_engine_cache_path" not in sessions[-1][0][1]


def test_faiss_indexes_share_one_bounded_gpu_resource(monkeypatch) -> None:
    resources, moved = [], []

    class Resources:
        def __init__(self) -> None:
            resources.append(self)
            self.busy = threading.Lock()  # FAISS's GPU resources serve one thread at a time

        def setTempMemory(self, size: int) -> None:  # noqa: N802 - FAISS's name
            self.temp = size

    class GpuIndex:
        def __init__(self, res: Resources, index: object) -> None:
            self.res, self.cpu, self.d = res, index, index.d

        def search(self, queries: np.ndarray, k: int) -> tuple:
            if not self.res.busy.acquire(blocking=False):
                raise AssertionError("two threads on one FAISS GPU resource at once")
            try:
                time.sleep(0.001)  # a GPU search takes a while: room for a second thread to collide
                return self.cpu.search(queries, k)
            finally:
                self.res.busy.release()

    def to_gpu(res: Resources, device: int, index: object) -> GpuIndex:
        if index is hnsw.index:
            raise RuntimeError("not implemented on GPU")  # what FAISS says for HNSW
        moved.append((res, device, index))
        return GpuIndex(res, index)

    fake = types.SimpleNamespace(StandardGpuResources=Resources, get_num_gpus=lambda: 2, index_cpu_to_gpu=to_gpu)
    monkeypatch.setattr(knn_gpu_module, "faiss", fake)
    banks = [BankScorer.from_bank(np.eye(4, dtype=np.float32) * (i + 1)) for i in range(3)]
    hnsw = BankScorer.from_bank(np.eye(4, dtype=np.float32))
    cpu_index = hnsw.index
    scorers = [banks[0], banks[1], banks[2], banks[0], hnsw]  # a stacked bank serves two locations
    queries = np.random.default_rng(0).normal(size=(12, 1, 2, 2, 4)).astype(np.float32)  # [call][B, h, w, D]
    single = [[bank.score(q)[1] for q in queries] for bank in banks]
    assert place_on_device(scorers, "auto", gpu_id=1) == "cuda:1"
    assert len(resources) == 1 and 0 < resources[0].temp <= 512 * 2**20
    assert len(moved) == 3 and {device for _, device, _ in moved} == {1}
    assert scorers[0].index is scorers[3].index and scorers[0].index.index.cpu is moved[0][2]
    assert scorers[0].index.d == 4  # the rest of the index's interface passes through
    assert hnsw.index is cpu_index  # no GPU version: kept on the CPU instead of failing the load

    def work(bank: BankScorer) -> list[np.ndarray]:  # 4 threads, each searching all three GPU indexes
        return [bank.score(q)[1] for q in queries]

    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(work, [b for b in banks for _ in range(4)]))
    for i, bank_scores in enumerate(threaded):
        np.testing.assert_array_equal(np.array(bank_scores), np.array(single[i // 4]))
    assert place_on_device(scorers, "cpu", gpu_id=0) == "cpu"
    assert place_on_device(scorers, "auto", gpu_id=2) == "cpu"  # no such GPU: stays on the CPU


@pytest.fixture(scope="module")
def reduced_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny run with an fp16 plan only, and with an int8 plan beside an fp32 one (built by the fake on A10)."""
    from tilecore.export.bundle import file_checksums
    from tilecore.export.tensorrt_build import build_engine, check_build_stack

    root = tmp_path_factory.mktemp("trt_reduced")
    run = gpu_fakes.tiny_run(root)
    with pytest.MonkeyPatch.context() as patch:
        gpu_fakes.install(patch, gpus=[A10])
        export_run(run, root / "fp16", tensorrt=TensorRTBuild(fp16=True, max_batch=4))
        export_run(run, root / "int8", tensorrt=TensorRTBuild(int8=True, max_batch=4, calibration_tiles=16))
        manifest = read_manifest(root / "int8")
        fp32 = TensorRTBuild(max_batch=4)
        extra = build_engine(root / "int8" / manifest.tensorrt[0].onnx, fp32, check_build_stack(fp32), None)
        both = replace(manifest, tensorrt=(*manifest.tensorrt, extra), files=file_checksums(root / "int8"))
        write_manifest(root / "int8", both)
    return {"fp16": root / "fp16", "int8": root / "int8"}


def test_record_is_chosen_by_the_precision_asked_for() -> None:
    a10 = GpuInfo(0, "NVIDIA A10", "8.6")
    fp16, fp32 = record(), record(precision="fp32", engine="backbone_ab.nvidia-a10-sm86.fp32.engine")
    int8 = record(precision="int8", engine="backbone_ab.nvidia-a10-sm86.int8.engine")
    records = [fp16, fp32, int8]
    assert choose_record(records, "10.8.0.43", a10, "fp32") == (fp32, "")
    assert choose_record(records, "10.8.0.43", a10, "int8") == (int8, "")
    assert choose_record(records, "10.8.0.43", a10, "auto") == (int8, "")  # the fastest the bundle has
    assert choose_record([fp32, fp16], "10.8.0.43", a10, "auto") == (fp16, "")
    chosen, reason = choose_record([fp16], "10.8.0.43", a10, "fp32")
    assert chosen is None and reason == (
        "--precision fp32: the bundle has no fp32 TensorRT engine for backbone_ab.onnx (it has: fp16)"
    )
    chosen, reason = choose_record([fp16, fp32], "10.8.0.43", a10, "int8")
    assert chosen is None and reason.endswith("/int8 TensorRT engine for backbone_ab.onnx (it has: fp16, fp32)")


def test_native_backend_loads_the_engine_of_the_precision_asked_for(reduced_bundles: dict, monkeypatch) -> None:
    """fp32 never loads a reduced plan; int8 finds the int8 plan; --recheck's fp32 pass runs the fp32 plan."""
    trt, _ = gpu_fakes.install(monkeypatch, gpus=[A10])
    version = trt.__version__
    with pytest.raises(BackendMissing, match=r"^--device tensorrt-native: --precision fp32: the bundle has no fp32 "
                                             r"TensorRT engine for backbone_\w+\.onnx \(it has: fp16\)$"):  # fmt: skip
        Predictor(reduced_bundles["fp16"], device="tensorrt-native")
    auto = Predictor(reduced_bundles["fp16"], device="tensorrt-native", precision="auto")
    assert auto.providers == [f"TensorRT {version} fp16 on NVIDIA Fake A10 (cuda:0)"]
    fallback = Predictor(reduced_bundles["fp16"], device="auto")  # no fp32 plan: auto runs the fp32 graph instead
    assert not any("TensorRT" in p for p in fallback.providers)

    int8 = Predictor(reduced_bundles["int8"], device="tensorrt-native", precision="int8", recheck=1e9)
    assert int8.providers == [f"TensorRT {version} int8 on NVIDIA Fake A10 (cuda:0)"]
    (fp32_engine,) = int8.fp32_engines.values()
    assert fp32_engine.provider == f"TensorRT {version} fp32 on NVIDIA Fake A10 (cuda:0)"
    with pytest.raises(BackendMissing, match=r"--precision bf16: expected one of fp32, int8, auto"):
        open_engine(onnx_of(reduced_bundles["int8"]), EngineOptions("tensorrt-native", precision="bf16"))


def test_engine_is_used_and_freed_on_its_own_gpu_from_any_thread(bundles: dict, monkeypatch) -> None:
    """CUDA's current device is per thread: a fresh thread (device 0) must run and free an engine on GPU 1."""
    trt, cudart = gpu_fakes.install(monkeypatch, gpus=[ORIN, A10])
    path = onnx_of(bundles["trt"])
    native = open_engine(path, EngineOptions("tensorrt-native", gpu_id=1))
    tiles = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    expected = open_engine(path, EngineOptions("cpu")).run(tiles)
    with ThreadPoolExecutor(1) as pool:  # a thread that never set a device
        np.testing.assert_allclose(pool.submit(native.run, tiles).result(), expected, rtol=1e-5, atol=1e-6)
    assert native.cuda_device == 1
    with ThreadPoolExecutor(1) as pool:
        pool.submit(native.close).result()  # freeing from device 0 would touch the wrong GPU: the fake raises
    assert cudart.buffers == {} and cudart.streams == set() and trt.engines == []

    again = open_engine(path, EngineOptions("tensorrt-native", gpu_id=1))
    finalizer = again._release
    del again
    assert not finalizer.alive  # collected: the finalizer freed everything (it sets the device itself)
    assert cudart.buffers == {} and cudart.streams == set()


def test_copies_are_visible_only_after_the_stream_synchronizes(monkeypatch) -> None:
    """The fake's CUDA model: an async copy lands at the stream's synchronize, not before."""
    _, cudart = gpu_fakes.install(monkeypatch, gpus=[A10])
    stream = cudart.cudaStreamCreate()[1]
    host = gpu_fakes.float_view(cudart.cudaMallocHost(16)[1], (4,))  # pinned, as the engine's buffers are
    host[:] = np.arange(4)
    device = cudart.cudaMalloc(host.nbytes)[1]
    back = gpu_fakes.float_view(cudart.cudaMallocHost(16)[1], (4,))
    back[:] = 0
    kinds = gpu_fakes.MemcpyKind
    cudart.cudaMemcpyAsync(device, host.ctypes.data, host.nbytes, kinds.cudaMemcpyHostToDevice, stream)
    cudart.cudaMemcpyAsync(back.ctypes.data, device, host.nbytes, kinds.cudaMemcpyDeviceToHost, stream)
    assert not back.any()
    cudart.cudaStreamSynchronize(stream)
    np.testing.assert_array_equal(back, host)


def test_fp16_io_engine_is_read_in_its_own_dtype(bundles: dict, monkeypatch) -> None:
    trt, _ = gpu_fakes.install(monkeypatch, gpus=[A10])
    trt.io_dtype = "HALF"  # an engine whose input and output tensors are float16
    path = onnx_of(bundles["trt"])
    native = open_engine(path, EngineOptions("tensorrt-native"))
    assert native.host_in.dtype == native.host_out.dtype == np.float16
    tiles = np.random.default_rng(2).normal(size=(6, 3, 32, 32)).astype(np.float32)
    expected = open_engine(path, EngineOptions("cpu")).run(tiles)
    got = native.run(tiles)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-2 * np.abs(expected).max()  # fp16 I/O rounding only
    trt.io_dtype = "INT8"
    with pytest.raises(TilecoreError, match=r"^engine \S+\.engine: tensor images is DataType\.INT8, expected float32 "
                                            r"or float16$"):  # fmt: skip
        open_engine(path, EngineOptions("tensorrt-native"))


@pytest.mark.parametrize(
    ("failure", "error", "message"),
    [
        ("deserialize", BackendMissing, r"TensorRT could not deserialize \S+\.engine"),
        ("context", BackendMissing, r"could not create an execution context for \S+\.engine"),
        ("address", TilecoreError, r"TensorRT refused the address of tensor images"),
    ],
)
def test_failed_tensorrt_calls_are_one_line_errors_and_free_everything(
    bundles: dict, monkeypatch, failure: str, error: type, message: str
) -> None:
    trt, cudart = gpu_fakes.install(monkeypatch, gpus=[A10])
    trt.fail = {failure}
    with pytest.raises(error, match=message) as caught:
        open_engine(onnx_of(bundles["trt"]), EngineOptions("tensorrt-native"))
    assert "\n" not in str(caught.value)
    caught = None
    assert cudart.buffers == {} and cudart.streams == set()


def test_faiss_moves_to_the_gpu_only_beside_a_gpu_engine(bundles: dict, monkeypatch) -> None:
    moved = []
    fake = types.SimpleNamespace(
        StandardGpuResources=lambda: types.SimpleNamespace(setTempMemory=lambda size: None),
        get_num_gpus=lambda: 2,
        index_cpu_to_gpu=lambda res, device, index: moved.append(device) or index,
    )
    monkeypatch.setattr(knn_gpu_module, "faiss", fake)
    fallen_back = Predictor(bundles["trt"], device="auto", gpu_id=1)  # no TensorRT here: a CPU backend runs
    assert fallen_back.knn_device == "cpu" and moved == []
    gpu_fakes.install(monkeypatch, gpus=[ORIN, A10])
    native = Predictor(bundles["trt"], device="auto", gpu_id=1)
    assert native.knn_device == "cuda:1" and moved and set(moved) == {1}


def real_gpu_missing() -> str | None:
    """Why the real-GPU tests cannot run here (None when tensorrt, cuda-python and a GPU are all present)."""
    from tilecore.runtime.engines.gpu_stack import gpu_info, import_cudart, import_tensorrt

    try:
        import_tensorrt("gpu tests")
        gpu_info(import_cudart("gpu tests"), 0, "gpu tests")
    except TilecoreError as missing:
        return str(missing)
    return None


GPU_MISSING = real_gpu_missing()
needs_gpu = pytest.mark.skipif(GPU_MISSING is not None, reason=f"needs an NVIDIA GPU with TensorRT: {GPU_MISSING}")


@pytest.fixture(scope="module")
def real_gpu_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gpu_fakes.tiny_run(tmp_path_factory.mktemp("trt_gpu"))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(("fp16", "tolerance"), [(False, 1e-3), (True, 1e-2)])
def test_real_engine_matches_onnx_runtime_cpu(real_gpu_run: Path, tmp_path: Path, fp16: bool, tolerance: float) -> None:
    export_run(real_gpu_run, tmp_path / "b", tensorrt=TensorRTBuild(fp16=fp16, max_batch=4))
    path = onnx_of(tmp_path / "b")
    tiles = np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)
    expected = open_engine(path, EngineOptions("cpu")).run(tiles)
    got = open_engine(path, EngineOptions("tensorrt-native")).run(tiles)
    assert np.abs(got - expected).max() <= tolerance * np.abs(expected).max()


@pytest.mark.gpu
@needs_gpu
def test_real_engine_scores_match_pytorch(real_gpu_run: Path, tmp_path: Path) -> None:
    from tilecore.train.ensemble import load_category_model
    from tilecore.train.model import load_embedder
    from tilecore.train.run_dir import load_run_config

    export_run(real_gpu_run, tmp_path / "b", tensorrt=TensorRTBuild(max_batch=4))
    config = load_run_config(real_gpu_run)
    model = load_category_model(config, real_gpu_run, "gravel", [load_embedder(config, real_gpu_run, 0)])
    images = [read_rgb(p) for p in sorted((real_gpu_run.parent / "data" / "gravel" / "test").glob("*/*.png"))]
    torch_scores, _ = model.predict(images)
    predictor = Predictor(tmp_path / "b", device="tensorrt-native")
    scores = np.array([r.score for r in predictor.predict_batch(images)])
    assert np.abs(scores - torch_scores).max() <= 1e-3 * (torch_scores.max() - torch_scores.min())
