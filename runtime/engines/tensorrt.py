"""Native TensorRT backend (`--device tensorrt-native`): a serialized engine from the bundle, run on one stream.

The engine for `backbone_<hash>.onnx` is the one the manifest's TensorRT records list for it (exported with
`tilecore export --tensorrt` on the same GPU model): with a BundleGraph (the Predictor's), from the
manifest the Predictor checked, its plan read once and checked by manifest.read_checked; for a bare
path, from the bundle's manifest read here (digest checked), the plan checked against it. Before
loading, its record is checked against this machine's TensorRT version and GPU (runtime.engines.tensorrt_plans);
a mismatch, or a missing tensorrt package, cuda-python or GPU, raises BackendMissing with the reason in
one line, and `--device auto` moves on to ONNX Runtime (TensorRT EP, CUDA, then CPU).

Everything is allocated once for the largest batch: pinned host buffers and device buffers for the input
and the output, one CUDA stream and one execution context. A call only sets the input shape, copies the
tiles in, enqueues the engine (execute_async_v3) and copies the embeddings back. The embeddings come
back to the host because FAISS's Python API searches host arrays; FAISS-GPU then copies the queries to
its own device memory.

An execution context, its input shape and these buffers serve one call at a time, so run() holds one lock
per engine for the whole call: threads sharing a Predictor overlap everything but the engine itself.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from pathlib import Path

import numpy as np

from tilecore.runtime.engines.base import BackendMissing, BundleGraph, EngineOptions
from tilecore.runtime.engines.gpu_stack import cuda_call, gpu_info, import_cudart, import_tensorrt
from tilecore.runtime.engines.tensorrt_plans import EngineRecord, choose_record, records_for
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import Manifest, read_checked, read_manifest

log = logging.getLogger("tilecore")
WHO = "--device tensorrt-native"
_TRT_LOGGER = None  # TensorRT wants one logger per process


def trt_logger(trt):
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        _TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
    return _TRT_LOGGER


def bundle_records(onnx_path: Path, manifest: Manifest) -> list[EngineRecord]:
    """The engines `manifest` lists for the graph `onnx_path`; BackendMissing when there are none."""
    records = records_for(manifest, onnx_path.name)
    if not records:
        raise BackendMissing(f"{WHO}: the bundle has no TensorRT engine for {onnx_path.name} (export with --tensorrt)")
    return records


def pinned_array(cudart, shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
    """Page-locked host memory for float32 `shape`: (pointer, numpy view of it)."""
    count = int(np.prod(shape))
    pointer = cuda_call(cudart.cudaMallocHost(count * 4), "cudaMallocHost")
    view = np.ctypeslib.as_array((ctypes.c_float * count).from_address(pointer)).reshape(shape)
    return pointer, view


def release(cudart, host: list[int], device: list[int], stream) -> None:
    """Free what an engine allocated (runs when the engine is garbage collected or closed)."""
    cudart.cudaStreamSynchronize(stream)
    for pointer in host:
        cudart.cudaFreeHost(pointer)
    for pointer in device:
        cudart.cudaFree(pointer)
    cudart.cudaStreamDestroy(stream)


class TensorRTEngine:
    """Normalised tiles [N, 3, h, w] -> patch embeddings [N, h', w', D] float32 through a TensorRT engine."""

    def __init__(self, path: Path, options: EngineOptions, graph: BundleGraph | None = None) -> None:
        bundle = path.parent if graph is None else graph.bundle
        manifest = read_manifest(bundle, verify=False) if graph is None else graph.manifest  # a bare graph's own
        records = bundle_records(path, manifest)  # cheapest check first: no engine in the bundle, nothing to import
        trt = import_tensorrt(WHO)
        cudart = import_cudart(WHO)
        gpu = gpu_info(cudart, options.gpu_id, WHO)
        record, reason = choose_record(records, trt.__version__, gpu)
        if record is None:
            if options.device == "auto":
                log.warning("%s; falling back to the ONNX graph", reason)
            raise BackendMissing(f"{WHO}: {reason}")
        cuda_call(cudart.cudaSetDevice(gpu.index), "cudaSetDevice")
        self.record, self.cudart, self.device_index = record, cudart, gpu.index
        self.runtime = trt.Runtime(trt_logger(trt))  # kept: the runtime must outlive its engine
        plan = read_checked(bundle, manifest, record.engine)  # the bytes checked are the bytes loaded
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BackendMissing(f"{WHO}: TensorRT could not deserialize {record.engine} (see its log above)")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = record.profile.input_name, record.output_name
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if {self.input_name, self.output_name} - names:
            expected = f"{self.input_name} -> {self.output_name}"
            raise TilecoreError(f"engine {record.engine}: has tensors {sorted(names)}, the manifest says {expected}")
        for name in (self.input_name, self.output_name):
            if self.engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise TilecoreError(f"engine {record.engine}: tensor {name} is not float32")
        profile = record.profile  # [batch, 3, h, w] at min / opt / max, as the manifest records it
        engine_profile = tuple(tuple(shape) for shape in self.engine.get_tensor_profile_shape(self.input_name, 0))
        if engine_profile != (profile.min, profile.opt, profile.max):
            raise TilecoreError(f"engine {record.engine}: profile {engine_profile} differs from its manifest record")
        self.max_batch = min(options.max_batch, profile.max_batch)
        self.item_shape = profile.max[1:]  # [3, h, w] of one tile
        if not self.context.set_input_shape(self.input_name, (self.max_batch, *self.item_shape)):
            raise TilecoreError(f"engine {record.engine}: input shape {(self.max_batch, *self.item_shape)} refused")
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))  # [max_batch, h', w', D]
        self.out_item_shape = out_shape[1:]

        # Allocated once for the largest batch; run() never allocates on the device.
        self.stream = cuda_call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        in_ptr, self.host_in = pinned_array(cudart, (self.max_batch, *self.item_shape))
        out_ptr, self.host_out = pinned_array(cudart, (self.max_batch, *self.out_item_shape))
        self.dev_in = cuda_call(cudart.cudaMalloc(self.host_in.nbytes), "cudaMalloc")
        self.dev_out = cuda_call(cudart.cudaMalloc(self.host_out.nbytes), "cudaMalloc")
        self.host_in_ptr, self.host_out_ptr = in_ptr, out_ptr
        device = [self.dev_in, self.dev_out]
        self._release = weakref.finalize(self, release, cudart, [in_ptr, out_ptr], device, self.stream)
        self.context.set_tensor_address(self.input_name, self.dev_in)
        self.context.set_tensor_address(self.output_name, self.dev_out)
        self.provider = f"TensorRT {trt.__version__} {record.precision} on {gpu.name} (cuda:{gpu.index})"
        self.lock = threading.Lock()  # the context and the buffers: one call at a time (module docstring)

    def run(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.ascontiguousarray(tiles, dtype=np.float32)  # [N, 3, h, w]
        out = np.empty((len(tiles), *self.out_item_shape), dtype=np.float32)  # [N, h', w', D]
        with self.lock:
            if not self._release.alive:  # close() freed the buffers while this call waited for the lock
                raise TilecoreError(f"engine {self.record.engine}: used after close()")
            cuda_call(self.cudart.cudaSetDevice(self.device_index), "cudaSetDevice")  # per host thread in CUDA
            for start in range(0, len(tiles), self.max_batch):
                chunk = tiles[start : start + self.max_batch]
                out[start : start + len(chunk)] = self.infer(chunk)
        return out

    def infer(self, chunk: np.ndarray) -> np.ndarray:
        """At most max_batch tiles [n, 3, h, w] -> a view [n, h', w', D] of the pinned output (until next call);
        the caller holds self.lock until it has copied the view."""
        n, cudart = len(chunk), self.cudart
        self.host_in[:n] = chunk
        if not self.context.set_input_shape(self.input_name, (n, *self.item_shape)):
            raise TilecoreError(f"engine {self.record.engine}: batch {n} outside its profile")
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        in_bytes, out_bytes = self.host_in[:n].nbytes, self.host_out[:n].nbytes
        cuda_call(cudart.cudaMemcpyAsync(self.dev_in, self.host_in_ptr, in_bytes, to_device, self.stream), "copy in")
        if not self.context.execute_async_v3(int(self.stream)):
            raise TilecoreError(f"engine {self.record.engine}: execute_async_v3 failed (see the TensorRT log)")
        cuda_call(cudart.cudaMemcpyAsync(self.host_out_ptr, self.dev_out, out_bytes, to_host, self.stream), "copy out")
        cuda_call(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return self.host_out[:n]

    def close(self) -> None:
        """Free the buffers and the stream now rather than at garbage collection."""
        with self.lock:
            self._release()
