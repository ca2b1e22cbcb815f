"""The GPU stack, imported only when asked for: the tensorrt package, cuda-python and a CUDA device.

Each probe names the missing piece in one line. It raises BackendMissing, which `--device auto` takes as
"try the next backend" and which the exporter and an explicit `--device` report as an error (exit 2).

CUDA is reached through cuda-python (`cuda.bindings.runtime`), not pycuda: it is NVIDIA's own binding,
ships as wheels (pycuda compiles against a local toolkit, which Jetson images often lack), and every call
returns its error code, which makes "what exactly is missing" easy to say.
"""

from __future__ import annotations

from types import ModuleType

from tilecore.runtime.engines.base import BackendMissing
from tilecore.runtime.engines.tensorrt_plans import GpuInfo

TENSORRT_INSTALL = "pip install 'tilecore[tensorrt]' with NVIDIA's package index as an extra index"
CUDA_INSTALL = "pip install 'tilecore[tensorrt]' (cuda-python)"


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
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise BackendMissing(f"{who}: tensorrt is installed but its libraries do not load ({first})") from None
    major = str(getattr(tensorrt, "__version__", "0")).split(".")[0]
    if major != "10":
        raise BackendMissing(f"{who}: TensorRT {tensorrt.__version__} found, this build supports TensorRT 10")
    return tensorrt


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
    """Name and compute capability of CUDA device `gpu_id`, or BackendMissing saying why there is none."""
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0:
        name = getattr(error, "name", str(error))
        raise BackendMissing(f"{who}: no usable CUDA GPU or driver ({name})")
    if count == 0:
        raise BackendMissing(f"{who}: the CUDA driver sees no GPU")
    if not 0 <= gpu_id < count:
        raise BackendMissing(f"{who}: --gpu-id {gpu_id} requested, this machine has {count} GPU(s) (0-{count - 1})")
    props = cuda_call(cudart.cudaGetDeviceProperties(gpu_id), "cudaGetDeviceProperties")
    raw = props.name
    name = (raw.split(b"\0", 1)[0].decode() if isinstance(raw, bytes) else str(raw)).strip()
    return GpuInfo(gpu_id, name, f"{props.major}.{props.minor}")
