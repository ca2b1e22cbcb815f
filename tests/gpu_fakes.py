"""Stand-ins for `tensorrt` and `cuda.bindings.runtime`, so the GPU path runs on a CPU-only machine.

FakeCudart: "device" and pinned memory are ctypes buffers at real addresses and copies are memmove, with
a bounds check, so the engine's pointer and byte arithmetic is exercised for real; calls are counted. As in
CUDA, the current device is per host thread (0 until the thread sets one), and a copy on a stream of
another device than the calling thread's raises.
FakeTensorRT: the builder records every call it gets; the "serialized engine" is a JSON header plus the
ONNX graph it parsed; the runtime's engine runs that graph with ONNX Runtime on the CPU, reading its input
from and writing its output to the addresses and shapes set on the execution context. Like TensorRT's, an
execution context is not shareable between threads: the fake raises when a second thread enters it while
one is inside, or runs it with an input shape another thread set.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import threading
import types
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.tiny import tiny_run  # noqa: F401 - the GPU tests start from the shared tiny run

FAKE_PLAN = b"FAKEPLAN"


class CudaErr(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100


class MemcpyKind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class FakeCudart(types.ModuleType):
    cudaError_t = CudaErr
    cudaMemcpyKind = MemcpyKind

    def __init__(self, gpus: list[tuple[str, int, int]], driver_error: CudaErr = CudaErr.cudaSuccess) -> None:
        super().__init__("cuda.bindings.runtime")
        self.gpus, self.driver_error = gpus, driver_error
        self.buffers: dict[int, ctypes.Array] = {}
        self.calls: Counter[str] = Counter()
        self.streams: set[int] = set()
        self.stream_devices: dict[int, int] = {}  # the device each stream was created on
        self.device: int | None = None  # the device set last, by any thread
        self.thread_device = threading.local()  # CUDA's current device is a host thread's own

    def _alloc(self, what: str, size: int) -> tuple:
        self.calls[what] += 1
        buffer = ctypes.create_string_buffer(size)
        self.buffers[ctypes.addressof(buffer)] = buffer
        return CudaErr.cudaSuccess, ctypes.addressof(buffer)

    def _check_range(self, pointer: int, size: int) -> None:
        if not any(p <= pointer and pointer + size <= p + len(b) for p, b in self.buffers.items()):
            raise AssertionError(f"copy of {size} bytes at {pointer:#x} leaves every allocation")

    def cudaGetDeviceCount(self) -> tuple:
        if self.driver_error:
            return self.driver_error, 0
        return CudaErr.cudaSuccess, len(self.gpus)

    def cudaGetDeviceProperties(self, index: int) -> tuple:
        name, major, minor = self.gpus[index]
        return CudaErr.cudaSuccess, types.SimpleNamespace(name=name.encode() + b"\0" * 8, major=major, minor=minor)

    def cudaSetDevice(self, index: int) -> tuple:
        self.device = self.thread_device.index = index
        return (CudaErr.cudaSuccess,)

    def current_device(self) -> int:
        return getattr(self.thread_device, "index", 0)

    def cudaMallocHost(self, size: int) -> tuple:
        return self._alloc("cudaMallocHost", size)

    def cudaMalloc(self, size: int) -> tuple:
        return self._alloc("cudaMalloc", size)

    def cudaFree(self, pointer: int) -> tuple:
        self.calls["cudaFree"] += 1
        self.buffers.pop(pointer)
        return (CudaErr.cudaSuccess,)

    def cudaFreeHost(self, pointer: int) -> tuple:
        self.calls["cudaFreeHost"] += 1
        self.buffers.pop(pointer)
        return (CudaErr.cudaSuccess,)

    def cudaStreamCreate(self) -> tuple:
        self.calls["cudaStreamCreate"] += 1
        handle = 0x5000 + len(self.streams)
        self.streams.add(handle)
        self.stream_devices[handle] = self.current_device()
        return CudaErr.cudaSuccess, handle

    def cudaStreamSynchronize(self, stream: int) -> tuple:
        assert stream in self.streams
        return (CudaErr.cudaSuccess,)

    def cudaStreamDestroy(self, stream: int) -> tuple:
        self.streams.discard(stream)
        return (CudaErr.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, size: int, kind: MemcpyKind, stream: int) -> tuple:
        assert stream in self.streams and kind in MemcpyKind
        if self.stream_devices[stream] != self.current_device():
            raise AssertionError(
                f"copy on a stream of GPU {self.stream_devices[stream]} from a thread on GPU {self.current_device()}"
            )
        self.calls[kind.name] += 1
        self._check_range(dst, size)
        self._check_range(src, size)
        ctypes.memmove(dst, src, size)
        return (CudaErr.cudaSuccess,)


def float_view(pointer: int, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(pointer)).reshape(shape)


class FakeTensorRT(types.ModuleType):
    """The slice of the TensorRT 10 Python API that tilecore calls."""

    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    BuilderFlag = enum.Enum("BuilderFlag", ["FP16", "INT8", "TF32"])
    DataType = enum.Enum("DataType", ["FLOAT", "HALF"])
    TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])

    def __init__(self, version: str = "10.99.0.1") -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.builds: list[dict] = []  # one record of builder calls per build_serialized_network
        self.contexts: list[FakeContext] = []
        fake = self

        class Builder:
            def __init__(self, logger: object) -> None:
                pass

            def create_network(self, flags: int) -> FakeNetwork:
                return FakeNetwork(flags)

            def create_builder_config(self) -> FakeConfig:
                return FakeConfig()

            def create_optimization_profile(self) -> FakeProfile:
                return FakeProfile()

            def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes:
                (profile,) = config.profiles
                header = {"input": profile.shapes[0], "min": profile.shapes[1], "opt": profile.shapes[2]}
                header["max"] = profile.shapes[3]
                header["output"] = network.output_name
                fake.builds.append(
                    {
                        "onnx": network.path,
                        "network_flags": network.flags,
                        "flags": set(config.flags),
                        "cleared": set(config.cleared),
                        "workspace": config.pools,
                        "profile": profile.shapes,
                    }
                )
                head = json.dumps(header).encode()
                return FAKE_PLAN + len(head).to_bytes(4, "little") + head + network.onnx_bytes

        class OnnxParser:
            def __init__(self, network: FakeNetwork, logger: object) -> None:
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path: str) -> bool:
                try:
                    model = onnx.load(path)
                except Exception:  # noqa: BLE001
                    self.num_errors = 1
                    return False
                self.network.load(path, model)
                return True

            def get_error(self, index: int) -> str:
                return "fake parser: not an ONNX file"

        class Runtime:
            def __init__(self, logger: object) -> None:
                pass

            def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine | None:
                if not plan.startswith(FAKE_PLAN):
                    return None
                size = int.from_bytes(plan[8:12], "little")
                return FakeEngine(fake, json.loads(plan[12 : 12 + size]), plan[12 + size :])

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags, self.num_inputs, self.num_outputs = flags, 0, 0

    def load(self, path: str, model: onnx.ModelProto) -> None:
        self.path, self.onnx_bytes = path, model.SerializeToString()
        (graph_input,), (graph_output,) = model.graph.input, model.graph.output
        dims = graph_input.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)  # dynamic axes are -1
        self.input = types.SimpleNamespace(name=graph_input.name, shape=shape)
        self.output_name = graph_output.name
        self.num_inputs, self.num_outputs = 1, 1

    def get_input(self, index: int) -> types.SimpleNamespace:
        return self.input

    def get_output(self, index: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(name=self.output_name)


class FakeConfig:
    def __init__(self) -> None:
        self.flags, self.cleared, self.profiles, self.pools = [], [], [], {}

    def set_memory_pool_limit(self, pool: enum.Enum, size: int) -> None:
        self.pools[pool.name] = size

    def set_flag(self, flag: enum.Enum) -> None:
        self.flags.append(flag.name)

    def clear_flag(self, flag: enum.Enum) -> None:
        self.cleared.append(flag.name)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return 0


class FakeProfile:
    def set_shape(self, name: str, min: tuple, opt: tuple, max: tuple) -> None:
        self.shapes = (name, list(min), list(opt), list(max))


class FakeEngine:
    def __init__(self, trt: FakeTensorRT, header: dict, onnx_bytes: bytes) -> None:
        self.trt, self.header = trt, header
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.num_io_tensors = 2
        self.names = [header["input"], header["output"]]
        probe = np.zeros((1, *header["max"][1:]), np.float32)
        self.out_item = self.session.run(None, {header["input"]: probe})[0].shape[1:]

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> enum.Enum:
        return self.trt.TensorIOMode.INPUT if name == self.names[0] else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> enum.Enum:
        return self.trt.DataType.FLOAT

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[list[int]]:
        return [self.header["min"], self.header["opt"], self.header["max"]]

    def create_execution_context(self) -> FakeContext:
        context = FakeContext(self)
        self.trt.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.addresses, self.input_shape = engine, {}, None
        self.shapes_set: list[tuple] = []
        self.streams: set[int] = set()
        self.entered = 0  # execute_async_v3 calls
        self.inside = threading.Lock()  # held while a thread runs the context
        self.shape_owner: int | None = None  # the thread that set the input shape last

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        low, high = self.engine.header["min"], self.engine.header["max"]
        if name != self.engine.names[0] or not low[0] <= shape[0] <= high[0] or list(shape[1:]) != high[1:]:
            return False
        self.input_shape = tuple(shape)
        self.shapes_set.append(self.input_shape)
        self.shape_owner = threading.get_ident()
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        return (self.input_shape[0], *self.engine.out_item)

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream: int) -> bool:
        if not self.inside.acquire(blocking=False):
            raise AssertionError("two threads in one TensorRT execution context at once")
        try:
            if self.shape_owner != threading.get_ident():
                raise AssertionError("TensorRT execution context run with an input shape another thread set")
            self.entered += 1
            self.streams.add(stream)
            tiles = float_view(self.addresses[self.engine.names[0]], self.input_shape).copy()
            out = self.engine.session.run(None, {self.engine.names[0]: tiles})[0]  # [n, h', w', D]
            float_view(self.addresses[self.engine.names[1]], out.shape)[:] = out
            return True
        finally:
            self.inside.release()


def install(
    monkeypatch: pytest.MonkeyPatch,
    gpus: list[tuple[str, int, int]] | None = None,
    version: str = "10.99.0.1",
    driver_error: CudaErr = CudaErr.cudaSuccess,
) -> tuple[FakeTensorRT, FakeCudart]:
    """Put the fakes where `import tensorrt` and `from cuda.bindings import runtime` will find them."""
    trt = FakeTensorRT(version)
    cudart = FakeCudart([("NVIDIA Fake A10", 8, 6)] if gpus is None else gpus, driver_error)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    package = types.ModuleType("cuda")
    package.bindings = bindings
    for name, module in (("tensorrt", trt), ("cuda", package), ("cuda.bindings", bindings)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return trt, cudart


def tensorrt_bundle(root: Path, name: str = "bundle", gpus: tuple = (("NVIDIA Fake A10", 8, 6),)) -> Path:
    """The tiny run under `root`, exported to `root/name` with an fp32 TensorRT plan built by the fake
    TensorRT (max batch 4) on `gpus`."""
    from tilecore.export.bundle import export_run
    from tilecore.export.tensorrt_build import TensorRTBuild

    run = tiny_run(root)
    with pytest.MonkeyPatch.context() as patch:
        install(patch, gpus=list(gpus))
        export_run(run, root / name, tensorrt=TensorRTBuild(max_batch=4))
    return root / name
