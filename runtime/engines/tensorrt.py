"""Native TensorRT backend (`--device tensorrt-native`): a serialized engine from the bundle, run on one stream.

The engine for `backbone_<hash>.onnx` is the one the manifest's TensorRT records list for it (exported with
`tilecore export --tensorrt` on the same GPU model): with a BundleGraph (the Predictor's), from the
manifest the Predictor checked, its plan read once and checked by manifest.read_checked; for a bare
path, from the bundle's manifest read here (digest checked), the plan checked against it. Before
loading, its record is checked against this machine's TensorRT version and GPU (runtime.engines.tensorrt_plans);
a mismatch, or a missing tensorrt package, cuda-python or GPU, raises BackendMissing with the reason in
one line, and `--device auto` moves on to ONNX Runtime (TensorRT EP, CUDA, then CPU).

The record is the one for the precision asked for (tensorrt_plans.choose_record): fp32 loads an fp32
engine only, int8 an int8 one, auto the fastest the bundle has; a bundle without one names the precisions
it has.

CUDA is reached through gpu_stack's CudaBinding (cuda-python, else pycuda). CUDA's current device is a
host thread's own, so every call that touches the device (loading, run(), close() and the finalizer, which
may run in any thread) makes this engine's device current first. The TensorRT objects are dropped before
the buffers and the CUDA context go.

Everything is allocated once for the largest batch: pinned host buffers and device buffers for the input
and the output, in the dtypes the engine's tensors have (float32, or float16 for an engine built with
fp16 I/O; float32 in and out of run() either way), one CUDA stream and one execution context. A call
only sets the input shape, copies the tiles in, enqueues the engine (execute_async_v3), copies the
embeddings back and synchronizes the stream (the copy back is complete only then). The embeddings come
back to the host because FAISS's Python API searches host arrays; FAISS-GPU then copies the queries to
its own device memory. Every TensorRT call that answers True/False is checked: False is a one-line error.

An execution context, its input shape and these buffers serve one call at a time, so run() holds one lock
per engine for the whole call: threads sharing a Predictor overlap everything but the engine itself.
"""

from __future__ import annotations

import logging
import threading
import traceback
import weakref
from pathlib import Path

import numpy as np

from tilecore.runtime.engines.base import BackendMissing, BundleGraph, EngineOptions
from tilecore.runtime.engines.gpu_stack import CudaBinding, import_tensorrt, open_cuda
from tilecore.runtime.engines.table import BACKENDS
from tilecore.runtime.engines.tensorrt_plans import EngineRecord, choose_record, records_for
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import Manifest, read_checked, read_manifest

log = logging.getLogger("tilecore")
WHO = "--device tensorrt-native"
_TRT_LOGGER = None  # TensorRT wants one logger per process
IO_DTYPES = {"FLOAT": np.float32, "HALF": np.float16}  # TensorRT DataType name -> the host buffers' dtype


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


def io_dtype(trt, engine, name: str, record: EngineRecord) -> np.dtype:
    """The numpy dtype of engine tensor `name` (float32 or float16), or a one-line refusal."""
    dtype = engine.get_tensor_dtype(name)
    kind = next((key for key in IO_DTYPES if dtype == getattr(trt.DataType, key, None)), None)
    if kind is None:
        raise TilecoreError(f"engine {record.engine}: tensor {name} is {dtype}, expected float32 or float16")
    return np.dtype(IO_DTYPES[kind])


def release(cuda: CudaBinding, trt_objects: list) -> None:
    """Free what an engine holds, in order: the TensorRT objects (context, engine, runtime), then the buffers
    and stream, then the CUDA context. Runs at close() or when the engine is garbage collected, in any thread:
    the engine's device is made current here first."""
    with cuda.current():
        trt_objects.clear()  # context before engine before runtime: the order they were made in, reversed
        cuda.release()
    cuda.close()


class TensorRTEngine:
    """Normalised tiles [N, 3, h, w] -> patch embeddings [N, h', w', D] float32 through a TensorRT engine."""

    def __init__(self, path: Path, options: EngineOptions, graph: BundleGraph | None = None) -> None:
        if options.precision not in BACKENDS["tensorrt-native"].precisions:
            choices = ", ".join(BACKENDS["tensorrt-native"].precisions)
            raise BackendMissing(f"{WHO}: --precision {options.precision}: expected one of {choices}")
        bundle = path.parent if graph is None else graph.bundle
        manifest = read_manifest(bundle, verify=False) if graph is None else graph.manifest  # a bare graph's own
        records = bundle_records(path, manifest)  # cheapest check first: no engine in the bundle, nothing to import
        trt = import_tensorrt(WHO)
        cuda = open_cuda(options.gpu_id, WHO)
        record, reason = choose_record(records, trt.__version__, cuda.gpu, options.precision)
        if record is None:
            cuda.close()
            if options.device == "auto":
                log.warning("%s; falling back to the ONNX graph", reason)
            raise BackendMissing(f"{WHO}: {reason}")
        self.record, self.cuda = record, cuda
        plan = read_checked(bundle, manifest, record.engine)  # the bytes checked are the bytes loaded
        trt_objects: list = []  # runtime, engine, context: dropped in reverse order by release()
        self._release = weakref.finalize(self, release, cuda, trt_objects)
        try:
            with cuda.current():
                self.load(trt, plan, options, trt_objects)
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)  # load()'s locals hold the engine, which must go first
            self._release()
            raise
        self.provider = f"TensorRT {trt.__version__} {record.precision} on {cuda.gpu.name} (cuda:{cuda.gpu.index})"
        self.cuda_device = cuda.gpu.index  # where the embeddings are computed (knn_gpu follows it)
        self.lock = threading.Lock()  # the context and the buffers: one call at a time (module docstring)

    def load(self, trt, plan: bytes, options: EngineOptions, trt_objects: list) -> None:
        """Deserialize the plan, check it against its record, allocate the buffers (this device current)."""
        record, cuda = self.record, self.cuda
        runtime = trt.Runtime(trt_logger(trt))  # kept: the runtime must outlive its engine
        trt_objects.append(runtime)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendMissing(f"{WHO}: TensorRT could not deserialize {record.engine} (see its log above)")
        trt_objects.append(engine)
        context = engine.create_execution_context()
        if context is None:
            raise BackendMissing(f"{WHO}: TensorRT could not create an execution context for {record.engine}")
        trt_objects.append(context)
        self.trt_objects = trt_objects
        self.input_name, self.output_name = record.profile.input_name, record.output_name
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        if {self.input_name, self.output_name} - names:
            expected = f"{self.input_name} -> {self.output_name}"
            raise TilecoreError(f"engine {record.engine}: has tensors {sorted(names)}, the manifest says {expected}")
        in_dtype, out_dtype = (io_dtype(trt, engine, name, record) for name in (self.input_name, self.output_name))
        profile = record.profile  # [batch, 3, h, w] at min / opt / max, as the manifest records it
        engine_profile = tuple(tuple(shape) for shape in engine.get_tensor_profile_shape(self.input_name, 0))
        if engine_profile != (profile.min, profile.opt, profile.max):
            raise TilecoreError(f"engine {record.engine}: profile {engine_profile} differs from its manifest record")
        self.max_batch = min(options.max_batch, profile.max_batch)
        self.item_shape = profile.max[1:]  # [3, h, w] of one tile
        self.stream = cuda.stream()
        if not context.set_optimization_profile_async(0, self.stream):
            raise TilecoreError(f"engine {record.engine}: TensorRT refused optimization profile 0")
        self.set_shape(context, self.max_batch)
        out_shape = tuple(context.get_tensor_shape(self.output_name))  # [max_batch, h', w', D]
        self.out_item_shape = out_shape[1:]

        # Allocated once for the largest batch, in the engine's own dtypes; run() never allocates on the device.
        self.host_in = cuda.pinned((self.max_batch, *self.item_shape), in_dtype)
        self.host_out = cuda.pinned((self.max_batch, *self.out_item_shape), out_dtype)
        self.dev_in = cuda.malloc(self.host_in.nbytes)
        self.dev_out = cuda.malloc(self.host_out.nbytes)
        for name, pointer in ((self.input_name, self.dev_in), (self.output_name, self.dev_out)):
            if not context.set_tensor_address(name, pointer):
                raise TilecoreError(f"engine {record.engine}: TensorRT refused the address of tensor {name}")

    @property
    def context(self):
        return self.trt_objects[2]

    def set_shape(self, context, n: int) -> None:
        if not context.set_input_shape(self.input_name, (n, *self.item_shape)):
            raise TilecoreError(f"engine {self.record.engine}: input shape {(n, *self.item_shape)} outside its profile")

    def run(self, tiles: np.ndarray) -> np.ndarray:
        tiles = np.ascontiguousarray(tiles, dtype=np.float32)  # [N, 3, h, w]
        out = np.empty((len(tiles), *self.out_item_shape), dtype=np.float32)  # [N, h', w', D]
        with self.lock:
            if not self._release.alive:  # close() freed the buffers while this call waited for the lock
                raise TilecoreError(f"engine {self.record.engine}: used after close()")
            with self.cuda.current():  # this thread's current device, whichever thread it is
                for start in range(0, len(tiles), self.max_batch):
                    chunk = tiles[start : start + self.max_batch]
                    out[start : start + len(chunk)] = self.infer(chunk)
        return out

    def infer(self, chunk: np.ndarray) -> np.ndarray:
        """At most max_batch tiles [n, 3, h, w] -> a view [n, h', w', D] of the pinned output (until next call);
        the caller holds self.lock and this device current until it has copied the view."""
        n, cuda = len(chunk), self.cuda
        self.host_in[:n] = chunk  # cast to the engine's input dtype
        self.set_shape(self.context, n)
        cuda.to_device(self.dev_in, self.host_in[:n], self.stream)
        if not self.context.execute_async_v3(self.stream):
            raise TilecoreError(f"engine {self.record.engine}: execute_async_v3 failed (see the TensorRT log)")
        cuda.to_host(self.host_out[:n], self.dev_out, self.stream)
        cuda.synchronize(self.stream)  # the copy out is complete only now
        return self.host_out[:n]

    def close(self) -> None:
        """Free the TensorRT objects, the buffers, the stream and the CUDA context now rather than at collection."""
        with self.lock:
            self._release()
