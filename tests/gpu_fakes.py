"""Stand-ins for `tensorrt`, `cuda.bindings.runtime`, `pycuda.driver` and a falling-back `onnxruntime`, so the
GPU path runs on a CPU-only machine. They model what the real libraries do where tilecore could get it wrong:

FakeGpus (shared by both CUDA fakes): "device" and pinned memory are ctypes buffers at real addresses, with
a bounds check on every copy. Copies and TensorRT's enqueued work are queued on their stream and happen
only at the stream's synchronize, in order, as in CUDA: a host buffer read before the synchronize holds
stale data. Every device buffer and stream belongs to one device; using or freeing one from a host thread
whose current device is another raises (real CUDA would act on, or create, another device's context).
FakeCudart: CUDA's current device is per host thread, 0 until the thread sets one; calls are counted.
FakePyCuda: the driver API through a primary context that must be pushed in the calling thread (a thread
with no context pushed cannot allocate, copy or run); retains and detaches are counted.
FakeTensorRT: the builder records every call and applies TensorRT's rules (a strongly typed network refuses
precision flags; a weakly typed network with Q/DQ nodes needs the INT8 flag); the "serialized engine" is a
JSON header plus the ONNX graph it parsed; the runtime's engine runs that graph with ONNX Runtime on the CPU
when its stream is synchronized, reading its input from and writing its output to the addresses and
shapes set on the execution context, in the tensor dtypes the engine reports (float32, or float16 I/O).
Like TensorRT's, an execution context is not shareable between threads: the fake raises when a second
thread enters it while one is inside, or runs it with an input shape another thread set. Loads can fail
(deserialize -> None, create_execution_context -> None, set_tensor_address -> False).
FakeOrt: onnxruntime whose sessions run on the CPU and report, like ONNX Runtime after a provider failed to
load, only the providers that did load.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import json
import sys
import threading
import types
import weakref
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


class FakeGpus:
    """Memory and streams of the fake GPUs, shared by the CUDA fakes and the fake TensorRT."""

    def __init__(self, gpus: list[tuple[str, int, int]]) -> None:
        self.gpus = gpus
        self.buffers: dict[int, ctypes.Array] = {}
        self.owners: dict[int, int | None] = {}  # buffer -> its device (None: pinned host memory)
        self.streams: dict[int, int] = {}  # stream handle -> its device
        self.pending: dict[int, list] = {}  # stream handle -> work queued on it, run at synchronize
        self.next_stream = 0x5000

    def alloc(self, size: int, device: int | None) -> int:
        buffer = ctypes.create_string_buffer(size)
        address = ctypes.addressof(buffer)
        self.buffers[address], self.owners[address] = buffer, device
        return address

    def free(self, pointer: int, device: int | None) -> None:
        owner = self.owners[pointer]
        if owner is not None and owner != device:
            raise AssertionError(f"buffer of GPU {owner} freed from a thread on GPU {device}")
        self.buffers.pop(pointer)
        self.owners.pop(pointer)

    def check_range(self, pointer: int, size: int) -> None:
        if not any(p <= pointer and pointer + size <= p + len(b) for p, b in self.buffers.items()):
            raise AssertionError(f"copy of {size} bytes at {pointer:#x} leaves every allocation")

    def stream_create(self, device: int) -> int:
        handle, self.next_stream = self.next_stream, self.next_stream + 1
        self.streams[handle], self.pending[handle] = device, []
        return handle

    def check_stream(self, stream: int, device: int | None) -> None:
        assert stream in self.streams, f"unknown stream {stream:#x}"
        if self.streams[stream] != device:
            raise AssertionError(f"work on a stream of GPU {self.streams[stream]} from a thread on GPU {device}")

    def enqueue(self, stream: int, device: int | None, work) -> None:
        self.check_stream(stream, device)
        self.pending[stream].append(work)

    def copy(self, stream: int, device: int | None, dst: int, src: int, size: int) -> None:
        self.check_range(dst, size)
        self.check_range(src, size)
        self.enqueue(stream, device, lambda: ctypes.memmove(dst, src, size))

    def synchronize(self, stream: int, device: int | None) -> None:
        self.check_stream(stream, device)
        work, self.pending[stream] = self.pending[stream], []
        for item in work:
            item()

    def stream_destroy(self, stream: int, device: int | None) -> None:
        self.check_stream(stream, device)
        self.streams.pop(stream)
        self.pending.pop(stream)


class FakeCudart(types.ModuleType):
    cudaError_t = CudaErr
    cudaMemcpyKind = MemcpyKind

    def __init__(self, gpus: FakeGpus, driver_error: CudaErr = CudaErr.cudaSuccess) -> None:
        super().__init__("cuda.bindings.runtime")
        self.core, self.gpus, self.driver_error = gpus, gpus.gpus, driver_error
        self.calls: Counter[str] = Counter()
        self.device: int | None = None  # the device set last, by any thread
        self.thread_device = threading.local()  # CUDA's current device is a host thread's own

    @property
    def buffers(self) -> dict[int, ctypes.Array]:
        return self.core.buffers

    @property
    def streams(self) -> set[int]:
        return set(self.core.streams)

    def current_device(self) -> int:
        return getattr(self.thread_device, "index", 0)

    def cudaGetDeviceCount(self) -> tuple:
        if self.driver_error:
            return self.driver_error, 0
        return CudaErr.cudaSuccess, len(self.gpus)

    def cudaGetDeviceProperties(self, index: int) -> tuple:
        name, major, minor = self.gpus[index]
        return CudaErr.cudaSuccess, types.SimpleNamespace(name=name.encode() + b"\0" * 8, major=major, minor=minor)

    def cudaSetDevice(self, index: int) -> tuple:
        self.calls["cudaSetDevice"] += 1
        self.device = self.thread_device.index = index
        return (CudaErr.cudaSuccess,)

    def cudaMallocHost(self, size: int) -> tuple:
        self.calls["cudaMallocHost"] += 1
        return CudaErr.cudaSuccess, self.core.alloc(size, None)

    def cudaMalloc(self, size: int) -> tuple:
        self.calls["cudaMalloc"] += 1
        return CudaErr.cudaSuccess, self.core.alloc(size, self.current_device())

    def cudaFree(self, pointer: int) -> tuple:
        self.calls["cudaFree"] += 1
        self.core.free(pointer, self.current_device())
        return (CudaErr.cudaSuccess,)

    def cudaFreeHost(self, pointer: int) -> tuple:
        self.calls["cudaFreeHost"] += 1
        self.core.free(pointer, None)
        return (CudaErr.cudaSuccess,)

    def cudaStreamCreate(self) -> tuple:
        self.calls["cudaStreamCreate"] += 1
        return CudaErr.cudaSuccess, self.core.stream_create(self.current_device())

    def cudaStreamSynchronize(self, stream: int) -> tuple:
        self.calls["cudaStreamSynchronize"] += 1
        self.core.synchronize(stream, self.current_device())
        return (CudaErr.cudaSuccess,)

    def cudaStreamDestroy(self, stream: int) -> tuple:
        self.core.stream_destroy(stream, self.current_device())
        return (CudaErr.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, size: int, kind: MemcpyKind, stream: int) -> tuple:
        assert kind in MemcpyKind
        self.calls[kind.name] += 1
        self.core.copy(stream, self.current_device(), dst, src, size)
        return (CudaErr.cudaSuccess,)

    def stream_device(self) -> int:
        return self.current_device()


class PyCudaError(Exception):
    """pycuda.driver.Error"""


class FakePyCuda(types.ModuleType):
    """pycuda.driver: Device, retained primary contexts pushed per thread, pagelocked memory, streams."""

    Error = PyCudaError

    def __init__(self, gpus: FakeGpus, init_error: str | None = None) -> None:
        super().__init__("pycuda.driver")
        self.core, self.init_error, self.initialised = gpus, init_error, False
        self.calls: Counter[str] = Counter()
        self.stack = threading.local()  # each thread's context stack
        self.retained: Counter[int] = Counter()  # device -> retains not yet detached
        self.trt: FakeTensorRT | None = None  # install_pycuda's: its live engines must go before the context
        fake = self

        class Device:
            def __init__(self, index: int) -> None:
                fake.check_init()
                if not 0 <= index < len(fake.core.gpus):
                    raise PyCudaError(f"cuDeviceGet failed: invalid device ordinal {index}")
                self.index = index

            @staticmethod
            def count() -> int:
                fake.check_init()
                return len(fake.core.gpus)

            def name(self) -> str:
                return fake.core.gpus[self.index][0]

            def compute_capability(self) -> tuple[int, int]:
                return tuple(fake.core.gpus[self.index][1:])

            def retain_primary_context(self) -> Context:
                fake.calls["retain_primary_context"] += 1
                fake.retained[self.index] += 1
                return Context(self.index)

        class Context:
            def __init__(self, index: int) -> None:
                self.index, self.detached = index, False

            def push(self) -> None:
                assert not self.detached, "push of a detached context"
                fake.calls["push"] += 1
                fake.thread_stack().append(self.index)

            @staticmethod
            def pop() -> None:
                fake.calls["pop"] += 1
                stack = fake.thread_stack()
                if not stack:
                    raise PyCudaError("cuCtxPopCurrent failed: invalid device context")
                stack.pop()

            def detach(self) -> None:
                assert not self.detached, "context detached twice"
                alive = [e for e in fake.trt.engines if e.device == self.index] if fake.trt is not None else []
                if fake.retained[self.index] == 1 and alive:
                    raise AssertionError("the primary context released while a TensorRT engine on it is alive")
                self.detached = True
                fake.retained[self.index] -= 1

        class HostAllocation:
            def __init__(self, shape: tuple, dtype: np.dtype) -> None:
                dtype = np.dtype(dtype)
                size = int(np.prod(shape)) * dtype.itemsize
                self.pointer = fake.core.alloc(size, None)
                self.__array_interface__ = {"data": (self.pointer, False), "shape": tuple(shape),
                                            "typestr": dtype.str, "version": 3}  # fmt: skip

            def free(self) -> None:
                fake.calls["free_host"] += 1
                fake.core.free(self.pointer, None)

        class DeviceAllocation:
            def __init__(self, size: int) -> None:
                self.pointer = fake.core.alloc(size, fake.current())
                self.size = size

            def __int__(self) -> int:
                return self.pointer

            def free(self) -> None:
                fake.calls["free"] += 1
                fake.core.free(self.pointer, fake.current())

        class Stream:
            def __init__(self) -> None:
                self.handle = fake.core.stream_create(fake.current())

            def synchronize(self) -> None:
                fake.core.synchronize(self.handle, fake.current())

        self.Device, self.Context, self.Stream = Device, Context, Stream
        self.HostAllocation, self.DeviceAllocation = HostAllocation, DeviceAllocation

    def check_init(self) -> None:
        if not self.initialised:
            raise PyCudaError("cuInit has not been called")

    def init(self) -> None:
        if self.init_error is not None:
            raise PyCudaError(self.init_error)
        self.initialised = True

    def thread_stack(self) -> list[int]:
        if not hasattr(self.stack, "contexts"):
            self.stack.contexts = []
        return self.stack.contexts

    def current(self) -> int:
        """The device of this thread's current context; raises where none is pushed (as the driver API does)."""
        stack = self.thread_stack()
        if not stack:
            raise PyCudaError("invalid device context: no context is current in this thread")
        return stack[-1]

    def stream_device(self) -> int:
        return self.current()

    def pagelocked_empty(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        self.calls["pagelocked_empty"] += 1
        return np.asarray(self.HostAllocation(tuple(shape), dtype))  # its .base is the HostAllocation

    def mem_alloc(self, size: int) -> object:
        self.calls["mem_alloc"] += 1
        return self.DeviceAllocation(size)

    def memcpy_htod_async(self, dest: int, src: np.ndarray, stream: object) -> None:
        self.calls["memcpy_htod_async"] += 1
        assert src.flags.c_contiguous
        self.core.copy(stream.handle, self.current(), int(dest), src.ctypes.data, src.nbytes)

    def memcpy_dtoh_async(self, dest: np.ndarray, src: int, stream: object) -> None:
        self.calls["memcpy_dtoh_async"] += 1
        assert dest.flags.c_contiguous
        self.core.copy(stream.handle, self.current(), dest.ctypes.data, int(src), dest.nbytes)


def typed_view(pointer: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(pointer)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def float_view(pointer: int, shape: tuple[int, ...]) -> np.ndarray:
    return typed_view(pointer, shape, np.float32)


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


class FakeTensorRT(types.ModuleType):
    """The slice of the TensorRT 10 Python API that tilecore calls."""

    Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE"])
    BuilderFlag = enum.Enum("BuilderFlag", ["FP16", "INT8", "TF32"])
    DataType = enum.Enum("DataType", ["FLOAT", "HALF", "INT8"])
    TensorIOMode = enum.Enum("TensorIOMode", ["INPUT", "OUTPUT"])
    PRECISION_FLAGS = ("FP16", "INT8")  # what a strongly typed network refuses

    def __init__(self, version: str = "10.99.0.1", gpus: FakeGpus | None = None) -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.gpus = gpus
        self.cuda: FakeCudart | FakePyCuda | None = None  # whose current device enqueues run on
        self.builds: list[dict] = []  # one record of builder calls per build_serialized_network
        self.refused: list[str] = []  # why a build returned None
        self.made: list[weakref.ref] = []  # every engine and context made: listed while alive (engines, contexts)
        self.io_dtype = "FLOAT"  # the I/O dtype the next deserialized engine reports
        self.fail = set()  # "deserialize", "context", "address": the next load fails there
        fake = self

        class Builder:
            def __init__(self, logger: object) -> None:
                fake.check_device("Builder")

            def create_network(self, flags: int) -> FakeNetwork:
                return FakeNetwork(flags)

            def create_builder_config(self) -> FakeConfig:
                return FakeConfig()

            def create_optimization_profile(self) -> FakeProfile:
                return FakeProfile()

            def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes | None:
                fake.check_device("build_serialized_network")
                (profile,) = config.profiles
                strongly = bool(network.flags & (1 << int(fake.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
                fake.builds.append(
                    {
                        "onnx": network.path,
                        "network_flags": network.flags,
                        "flags": set(config.flags),
                        "cleared": set(config.cleared),
                        "workspace": config.pools,
                        "profile": profile.shapes,
                        "device": fake.current_device(),  # the calling thread's: where kernels are timed
                    }
                )
                if strongly and set(config.flags) & set(fake.PRECISION_FLAGS):
                    fake.refused.append("a strongly typed network takes no precision flags")
                    return None
                if not strongly and network.qdq and "INT8" not in config.flags:
                    fake.refused.append("Q/DQ layers in a weakly typed network need the INT8 flag")
                    return None
                header = {"input": profile.shapes[0], "min": profile.shapes[1], "opt": profile.shapes[2]}
                header["max"] = profile.shapes[3]
                header["output"] = network.output_name
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
                fake.check_device("Runtime")

            def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine | None:
                fake.check_device("deserialize_cuda_engine")
                if not plan.startswith(FAKE_PLAN) or "deserialize" in fake.fail:
                    return None
                size = int.from_bytes(plan[8:12], "little")
                engine = FakeEngine(fake, json.loads(plan[12 : 12 + size]), plan[12 + size :], fake.io_dtype)
                fake.made.append(weakref.ref(engine))
                return engine

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    @property
    def engines(self) -> list[FakeEngine]:
        return [e for e in (ref() for ref in self.made) if isinstance(e, FakeEngine)]

    @property
    def contexts(self) -> list[FakeContext]:
        return [c for c in (ref() for ref in self.made) if isinstance(c, FakeContext)]

    def current_device(self) -> int | None:
        return None if self.cuda is None else self.cuda.stream_device()

    def check_device(self, what: str) -> None:
        """TensorRT works on the calling thread's current device: with pycuda a context must be pushed."""
        if isinstance(self.cuda, FakePyCuda):
            self.cuda.current()  # raises where no context is current


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags, self.num_inputs, self.num_outputs, self.qdq = flags, 0, 0, False

    def load(self, path: str, model: onnx.ModelProto) -> None:
        self.path, self.onnx_bytes, self.qdq = path, model.SerializeToString(), has_qdq(model)
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


IO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8}


class FakeEngine:
    def __init__(self, trt: FakeTensorRT, header: dict, onnx_bytes: bytes, io_dtype: str) -> None:
        self.trt, self.header, self.io_dtype = trt, header, io_dtype
        self.device = trt.current_device()  # the device it was deserialized on
        self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self.num_io_tensors = 2
        self.names = [header["input"], header["output"]]
        probe = np.zeros((1, *header["max"][1:]), np.float32)
        self.out_item = self.session.run(None, {header["input"]: probe})[0].shape[1:]
        self.alive = True

    def __del__(self) -> None:
        self.alive = False

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> enum.Enum:
        return self.trt.TensorIOMode.INPUT if name == self.names[0] else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> enum.Enum:
        return self.trt.DataType[self.io_dtype]

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[list[int]]:
        return [self.header["min"], self.header["opt"], self.header["max"]]

    def create_execution_context(self) -> FakeContext | None:
        if "context" in self.trt.fail:
            return None
        context = FakeContext(self)
        self.trt.made.append(weakref.ref(context))
        return context


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.addresses, self.input_shape = engine, {}, None
        self.shapes_set: list[tuple] = []
        self.streams: set[int] = set()
        self.profiles: list[int] = []
        self.entered = 0  # execute_async_v3 calls
        self.guard = threading.Lock()  # guards owner and queued
        self.owner: int | None = None  # the thread whose enqueued work has not run yet
        self.queued = 0
        self.shape_owner: int | None = None  # the thread that set the input shape last

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profiles.append(index)
        return index == 0

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
        if "address" in self.engine.trt.fail:
            return False
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream: int) -> bool:
        """Enqueue the graph on `stream`; the context counts as in use until that work has run (at the stream's
        synchronize), as a real context's resources are."""
        me = threading.get_ident()
        with self.guard:
            if self.owner not in (None, me):
                raise AssertionError("two threads in one TensorRT execution context at once")
            self.owner, self.queued = me, self.queued + 1
        if self.shape_owner != me:
            self.done()
            raise AssertionError("TensorRT execution context run with an input shape another thread set")
        self.entered += 1
        self.streams.add(stream)
        shape, names = self.input_shape, self.engine.names
        dtype = IO_NUMPY[self.engine.io_dtype]
        addresses = dict(self.addresses)

        def compute() -> None:  # on the stream, after the copies queued before it
            try:
                tiles = typed_view(addresses[names[0]], shape, dtype).astype(np.float32)
                out = self.engine.session.run(None, {names[0]: tiles})[0]  # [n, h', w', D]
                typed_view(addresses[names[1]], out.shape, dtype)[:] = out.astype(dtype)
            finally:
                self.done()

        trt = self.engine.trt
        if trt.gpus is None:
            compute()
        else:
            trt.gpus.enqueue(stream, trt.current_device(), compute)
        return True

    def done(self) -> None:
        with self.guard:
            self.queued -= 1
            if not self.queued:
                self.owner = None


class FakeOrtSession:
    """An ONNX Runtime session that runs on the CPU and reports the providers that loaded (`loads`), as ONNX
    Runtime does after a provider library failed to load: those of the list asked for, then the CPU."""

    def __init__(self, fake: FakeOrt, model: bytes | str, options: object = None, providers: list | None = None):
        names = [p[0] if isinstance(p, tuple) else p for p in (providers or ["CPUExecutionProvider"])]
        self.asked = providers or []
        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.model_sha256 = hashlib.sha256(data).hexdigest()  # which graph it was given
        self.running = [n for n in names if n in fake.loads or n == "CPUExecutionProvider"]
        self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        fake.sessions.append(self)

    def get_providers(self) -> list[str]:
        return list(self.running)

    def get_inputs(self) -> list:
        return self.session.get_inputs()

    def run(self, outputs: object, feeds: dict) -> list:
        return self.session.run(outputs, feeds)


class FakeOrt(types.SimpleNamespace):
    """`onnxruntime` as the ORT backend uses it: built with `available`, of which only `loads` start."""

    def __init__(self, available: list[str], loads: set[str]) -> None:
        super().__init__(SessionOptions=ort.SessionOptions, available=available, loads=loads, sessions=[])
        fake = self

        class InferenceSession(FakeOrtSession):
            def __init__(self, model: bytes | str, options: object = None, providers: list | None = None):
                super().__init__(fake, model, options, providers)

        self.InferenceSession = InferenceSession

    def get_available_providers(self) -> list[str]:
        return list(self.available)


ALL_ORT_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def install_ort(monkeypatch: pytest.MonkeyPatch, loads: set[str], available: list[str] | None = None) -> FakeOrt:
    """Put a FakeOrt in place of the ORT backend's onnxruntime."""
    from tilecore.runtime.engines import onnx_runtime

    fake = FakeOrt(ALL_ORT_PROVIDERS if available is None else available, loads)
    monkeypatch.setattr(onnx_runtime, "ort", fake)
    return fake


def install_cuda_python(monkeypatch: pytest.MonkeyPatch, cudart: FakeCudart) -> None:
    """Put `cudart` where `from cuda.bindings import runtime` (cuda-python) will find it."""
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    package = types.ModuleType("cuda")
    package.bindings = bindings
    for name, module in (("cuda", package), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module)


def install(
    monkeypatch: pytest.MonkeyPatch,
    gpus: list[tuple[str, int, int]] | None = None,
    version: str = "10.99.0.1",
    driver_error: CudaErr = CudaErr.cudaSuccess,
) -> tuple[FakeTensorRT, FakeCudart]:
    """Put the fakes where `import tensorrt` and `from cuda.bindings import runtime` will find them (and hide
    any real pycuda)."""
    core = FakeGpus([("NVIDIA Fake A10", 8, 6)] if gpus is None else gpus)
    trt = FakeTensorRT(version, core)
    cudart = FakeCudart(core, driver_error)
    trt.cuda = cudart
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_cuda_python(monkeypatch, cudart)
    monkeypatch.setitem(sys.modules, "pycuda", None)
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    return trt, cudart


def install_pycuda(
    monkeypatch: pytest.MonkeyPatch,
    gpus: list[tuple[str, int, int]] | None = None,
    version: str = "10.99.0.1",
    init_error: str | None = None,
) -> tuple[FakeTensorRT, FakePyCuda]:
    """The fake tensorrt with a fake pycuda and no cuda-python: the native backend must take pycuda."""
    core = FakeGpus([("NVIDIA Fake A10", 8, 6)] if gpus is None else gpus)
    trt = FakeTensorRT(version, core)
    driver = FakePyCuda(core, init_error)
    trt.cuda, driver.trt = driver, trt
    package = types.ModuleType("pycuda")
    package.__path__ = []
    package.driver = driver
    for name, module in (("tensorrt", trt), ("pycuda", package), ("pycuda.driver", driver)):
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime"):
        monkeypatch.setitem(sys.modules, name, None)
    return trt, driver


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
