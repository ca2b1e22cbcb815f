"""The GPU stack, imported only when asked for: the tensorrt package, a CUDA binding and a CUDA device.

Each probe names the missing piece in one line. It raises BackendMissing, which `--device auto` takes as
"try the next backend" and which the exporter and an explicit `--device` report as an error (exit 2).

CUDA is reached through one of two bindings, behind one small interface (CudaBinding):
- cuda-python (`cuda.bindings.runtime`), NVIDIA's own binding: wheels, every call returns its error code,
  and the runtime API makes the device's primary context current with cudaSetDevice.
- pycuda (`pycuda.driver`), where cuda-python cannot be installed (it compiles against the local toolkit,
  which some Jetson images and older export machines have and cuda-python's wheels do not fit): the device's
  retained primary context (never pycuda.autoinit's own context), pushed and popped around each call.
When both import, cuda-python wins (no context stack to keep balanced, its error codes name what is
missing), unless its CUDA major differs from TensorRT's wheel (torch 2.14 brings cuda-bindings 13 to an
export machine whose tensorrt-cu12 is CUDA 12): then pycuda, built against the local toolkit, is used. pycuda
is imported only when cuda-python is absent or of the other CUDA major.

CUDA's current device (and pycuda's context stack) is a host thread's own: every call that touches the
device runs inside `binding.current()`, in whatever thread makes it (the engine's calls, its finalizer,
the builder).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from importlib import metadata
from types import ModuleType
from typing import Protocol

import numpy as np

from tilecore.runtime.engines.base import BackendMissing
from tilecore.runtime.engines.tensorrt_plans import GpuInfo

TENSORRT_INSTALL = "pip install 'tilecore[tensorrt]' with NVIDIA's package index as an extra index"
CUDA_INSTALL = "pip install 'tilecore[tensorrt]' (cuda-python), or pip install pycuda"


class CudaError(BackendMissing):
    """A CUDA call failed (no driver, no device, out of memory): the GPU path cannot run here."""


def import_tensorrt(who: str) -> ModuleType:
    """The tensorrt module (TensorRT 10), or BackendMissing naming what is wrong."""
    try:
        import tensorrt
    except ModuleNotFoundError as exc:
        if exc.name not in (None, "tensorrt"):
            raise BackendMissing(f"{who}: the tensorrt package cannot import {exc.name} ({TENSORRT_INSTALL})") from None
        raise BackendMissing(f"{who}: the tensorrt Python package is not installed ({TENSORRT_INSTALL})") from None
    except (ImportError, OSError) as exc:  # the bindings are there but libnvinfer is not
        reason = first_line(exc)
        raise BackendMissing(f"{who}: tensorrt is installed but its libraries do not load ({reason})") from None
    major = str(getattr(tensorrt, "__version__", "0")).split(".")[0]
    if major != "10":
        raise BackendMissing(f"{who}: TensorRT {tensorrt.__version__} found, this build supports TensorRT 10")
    return tensorrt


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def import_cudart(who: str) -> ModuleType:
    """cuda-python's CUDA runtime module, or BackendMissing."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        raise BackendMissing(f"{who}: the cuda-python package is not installed ({CUDA_INSTALL})") from None
    return cudart


def cuda_call(result: tuple, what: str):
    """cuda-python returns (error, *values): the values, or a TilecoreError naming the call and the error."""
    error, *values = result
    if int(error) != 0:  # cudaSuccess
        raise CudaError(f"CUDA {what} failed: {getattr(error, 'name', error)}")
    return values[0] if len(values) == 1 else tuple(values)


def gpu_info(cudart: ModuleType, gpu_id: int, who: str) -> GpuInfo:
    """Name and compute capability of CUDA device `gpu_id` (cuda-python), or BackendMissing saying why there is none."""
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0:
        name = getattr(error, "name", str(error))
        raise BackendMissing(f"{who}: no usable CUDA GPU or driver ({name})")
    check_gpu_id(count, gpu_id, who)
    props = cuda_call(cudart.cudaGetDeviceProperties(gpu_id), "cudaGetDeviceProperties")
    raw = props.name
    name = (raw.split(b"\0", 1)[0].decode() if isinstance(raw, bytes) else str(raw)).strip()
    return GpuInfo(gpu_id, name, f"{props.major}.{props.minor}")


def check_gpu_id(count: int, gpu_id: int, who: str) -> None:
    if count == 0:
        raise BackendMissing(f"{who}: the CUDA driver sees no GPU")
    if not 0 <= gpu_id < count:
        raise BackendMissing(f"{who}: --gpu-id {gpu_id} requested, this machine has {count} GPU(s) (0-{count - 1})")


class CudaBinding(Protocol):
    """What the TensorRT engine and builder need from CUDA, on one device. Host buffers are numpy arrays of
    page-locked memory; device buffers and streams are integer handles (what TensorRT takes)."""

    name: str  # "cuda-python" or "pycuda"
    gpu: GpuInfo

    def current(self) -> contextlib.AbstractContextManager: ...  # this device current in the calling thread
    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...
    def malloc(self, nbytes: int) -> int: ...
    def stream(self) -> int: ...
    def to_device(self, device: int, host: np.ndarray, stream: int) -> None: ...  # async, ordered on stream
    def to_host(self, host: np.ndarray, device: int, stream: int) -> None: ...  # async: read after synchronize
    def synchronize(self, stream: int) -> None: ...
    def release(self) -> None: ...  # free every buffer and stream (inside current()); then close()
    def close(self) -> None: ...  # let go of the device (pycuda: release the retained primary context)


class CudaPython:
    """CudaBinding through cuda-python's runtime API (cudaSetDevice selects the device's primary context)."""

    name = "cuda-python"

    def __init__(self, cudart: ModuleType, gpu: GpuInfo) -> None:
        self.cudart, self.gpu = cudart, gpu
        self.host: list[int] = []
        self.device: list[int] = []
        self.streams: list[int] = []

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        cuda_call(self.cudart.cudaSetDevice(self.gpu.index), "cudaSetDevice")  # per host thread in CUDA
        yield

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        pointer = cuda_call(self.cudart.cudaMallocHost(count * dtype.itemsize), "cudaMallocHost")
        self.host.append(pointer)
        raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(pointer)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def malloc(self, nbytes: int) -> int:
        pointer = cuda_call(self.cudart.cudaMalloc(nbytes), "cudaMalloc")
        self.device.append(pointer)
        return pointer

    def stream(self) -> int:
        handle = cuda_call(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.streams.append(handle)
        return int(handle)

    def to_device(self, device: int, host: np.ndarray, stream: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(self.cudart.cudaMemcpyAsync(device, host.ctypes.data, host.nbytes, kind, stream), "copy in")

    def to_host(self, host: np.ndarray, device: int, stream: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(self.cudart.cudaMemcpyAsync(host.ctypes.data, device, host.nbytes, kind, stream), "copy out")

    def synchronize(self, stream: int) -> None:
        cuda_call(self.cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def release(self) -> None:
        cudart = self.cudart
        for stream in self.streams:
            cudart.cudaStreamSynchronize(stream)
        for pointer in self.host:
            cudart.cudaFreeHost(pointer)
        for pointer in self.device:
            cudart.cudaFree(pointer)
        for stream in self.streams:
            cudart.cudaStreamDestroy(stream)
        self.host, self.device, self.streams = [], [], []

    def close(self) -> None:
        pass  # the runtime API owns the primary context


class PyCuda:
    """CudaBinding through pycuda's driver API: the device's retained primary context, pushed and popped around
    each use (pycuda.autoinit would create a context of its own that TensorRT does not share)."""

    name = "pycuda"

    def __init__(self, driver: ModuleType, gpu: GpuInfo) -> None:
        self.driver, self.gpu = driver, gpu
        with self.errors("retain_primary_context"):
            self.context = driver.Device(gpu.index).retain_primary_context()
        self.host: list[np.ndarray] = []
        self.device: list[object] = []  # DeviceAllocation
        self.streams: dict[int, object] = {}  # handle -> Stream

    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except self.driver.Error as exc:
            raise CudaError(f"CUDA {what} failed (pycuda): {first_line(exc)}") from None

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        with self.errors("context push"):
            self.context.push()
        try:
            yield
        finally:
            self.driver.Context.pop()

    def pinned(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self.errors("pagelocked_empty"):
            array = self.driver.pagelocked_empty(shape, np.dtype(dtype))
        self.host.append(array)
        return array

    def malloc(self, nbytes: int) -> int:
        with self.errors("mem_alloc"):
            allocation = self.driver.mem_alloc(nbytes)
        self.device.append(allocation)
        return int(allocation)

    def stream(self) -> int:
        with self.errors("Stream"):
            stream = self.driver.Stream()
        self.streams[int(stream.handle)] = stream
        return int(stream.handle)

    def to_device(self, device: int, host: np.ndarray, stream: int) -> None:
        with self.errors("copy in"):
            self.driver.memcpy_htod_async(device, host, self.streams[stream])

    def to_host(self, host: np.ndarray, device: int, stream: int) -> None:
        with self.errors("copy out"):
            self.driver.memcpy_dtoh_async(host, device, self.streams[stream])

    def synchronize(self, stream: int) -> None:
        with self.errors("Stream.synchronize"):
            self.streams[stream].synchronize()

    def release(self) -> None:
        for stream in self.streams.values():
            stream.synchronize()
        for allocation in self.device:
            allocation.free()
        for array in self.host:
            array.base.free()  # the HostAllocation behind pagelocked_empty's array
        self.host, self.device, self.streams = [], [], {}

    def close(self) -> None:
        self.context.detach()  # releases this retain of the primary context


def import_pycuda(who: str) -> ModuleType:
    """pycuda.driver, initialised; BackendMissing when pycuda, libcuda or a driver is missing."""
    try:
        import pycuda.driver as driver
    except ModuleNotFoundError as exc:
        if exc.name not in (None, "pycuda", "pycuda.driver"):
            raise BackendMissing(f"{who}: pycuda cannot import {exc.name} ({CUDA_INSTALL})") from None
        raise BackendMissing(
            f"{who}: no CUDA binding: the cuda-python package is not installed, nor pycuda ({CUDA_INSTALL})"
        ) from None
    except (ImportError, OSError) as exc:  # pycuda's extension is there but libcuda.so is not
        raise BackendMissing(f"{who}: pycuda is installed but libcuda does not load ({first_line(exc)})") from None
    try:
        driver.init()
    except driver.Error as exc:
        raise BackendMissing(f"{who}: no usable CUDA GPU or driver (pycuda: {first_line(exc)})") from None
    return driver


def pycuda_gpu_info(driver: ModuleType, gpu_id: int, who: str) -> GpuInfo:
    try:
        check_gpu_id(driver.Device.count(), gpu_id, who)
        device = driver.Device(gpu_id)
        major, minor = device.compute_capability()
        return GpuInfo(gpu_id, str(device.name()).strip(), f"{major}.{minor}")
    except driver.Error as exc:
        raise BackendMissing(f"{who}: no usable CUDA GPU or driver (pycuda: {first_line(exc)})") from None


def installed_major(*distributions: str) -> str | None:
    """The major version of the first of `distributions` installed, or None."""
    for name in distributions:
        try:
            return metadata.version(name).split(".")[0]
        except metadata.PackageNotFoundError:
            continue
    return None


def cuda_majors() -> tuple[str | None, str | None]:
    """(cuda-python's CUDA major, TensorRT's wheel's CUDA major), None where unknown."""
    tensorrt = next((major for major in ("12", "13") if installed_major(f"tensorrt-cu{major}-libs")), None)
    return installed_major("cuda-bindings", "cuda-python"), tensorrt


def open_cuda(gpu_id: int, who: str) -> CudaBinding:
    """A CudaBinding on GPU `gpu_id`: cuda-python when it imports and matches TensorRT's CUDA major, else pycuda
    (module docstring)."""
    try:
        cudart = import_cudart(who)
    except BackendMissing:
        cudart = None
    binding, tensorrt = cuda_majors() if cudart is not None else (None, None)
    if cudart is not None and (binding is None or tensorrt is None or binding == tensorrt):
        return CudaPython(cudart, gpu_info(cudart, gpu_id, who))
    try:
        driver = import_pycuda(who)
    except BackendMissing:
        if cudart is None:
            raise
        return CudaPython(cudart, gpu_info(cudart, gpu_id, who))  # the other CUDA major: still the best there is
    return PyCuda(driver, pycuda_gpu_info(driver, gpu_id, who))
