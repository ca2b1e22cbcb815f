"""OpenVINO backend (`--device openvino`): Intel CPUs, reading the bundle's ONNX graph directly.

Compiled once per process. The compiled model is exported to a cache folder (default
`$XDG_CACHE_HOME/tilecore/openvino`, never the working directory or the bundle) so later processes start
fast: one blob per (graph sha256, precision, compile settings, OpenVINO version, CPU), written atomically
beside a sidecar with the blob's own sha256. A blob is imported only after its sha256 matches the sidecar;
a mismatch, or a blob OpenVINO cannot import, is logged, deleted and replaced by a fresh compile. A cache
folder that cannot be written only costs the compile time.

Precision is OpenVINO's inference-precision hint: fp32 ("f32"), bf16, or auto (OpenVINO's own default,
bf16 on CPUs that have it). An int8 engine is a quantized graph from the bundle, chosen by the caller;
its unquantized layers get OpenVINO's default (bf16 where the CPU has it). Embeddings come back as
float32 in every case, so kNN stays fp32.

On a CPU without bf16 instructions OpenVINO still compiles bf16 (on AVX-512 it simulates it: bf16
numerics, slower than fp32), so `--precision bf16` is refused there; the exporter and the measurement
tools ask for the simulation with EngineOptions.simulated_bf16.

`streams` > 1 compiles the graph for that many parallel inference streams (OpenVINO's NUM_STREAMS,
the threads shared among them) and splits each call's tiles into one chunk per stream, run through an
AsyncInferQueue: on CPUs where one stream cannot keep every core busy, throughput rises.

Thread safety: an infer request (and the AsyncInferQueue) is one call's at a time: it refuses a second
start while busy and reuses its output buffer, so a call could read another call's embeddings. One lock
per engine serialises run(); threads sharing a Predictor still overlap everything but the engine call.
A pool of requests (one per thread) brings no steady gain over the lock: one stream runs its
requests one at a time, and with `streams` > 1 a single call already fills every stream.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import threading
from pathlib import Path

import numpy as np

from tilecore.runtime.artifacts import atomic_write_bytes, sha256_file
from tilecore.runtime.engines.base import BackendMissing, BundleGraph, EngineOptions, run_in_chunks, user_cache_dir
from tilecore.runtime.errors import TilecoreError

log = logging.getLogger("tilecore")
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}  # "auto" and "int8": no hint (bf16 where the CPU has it)


def default_cache_dir() -> Path:
    return user_cache_dir("openvino")


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendMissing(
            "--device openvino: the openvino package is not installed (pip install 'tilecore[openvino]')"
        ) from None
    return openvino


def reports_bf16(core) -> bool:
    """Whether OpenVINO's CPU plugin (`core`: an ov.Core) reports bf16 instructions (AVX-512 bf16 or AMX)."""
    return "CPU" in core.available_devices and "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def blob_path(
    cache: Path, graph: Path, precision: str, config: dict[str, str], core, ov, sha256: str | None = None
) -> Path:
    """The cache file of `graph` compiled with `config`: named by the graph's sha256 (`sha256`, the manifest's,
    or hashed here) and the precision asked for, plus a digest of everything else the compiled model depends
    on (settings, OpenVINO, the CPU)."""
    version = ov.get_version()
    settings = {"config": config, "openvino": version, "cpu": core.get_property("CPU", "FULL_DEVICE_NAME")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    short_version = re.sub(r"[^0-9.]", "", version.split("-")[0])
    return cache / f"{sha256 or sha256_file(graph)}-cpu-{precision}-ov{short_version}-{digest}.blob"


def sidecar(blob: Path) -> Path:
    return blob.with_name(blob.name + ".sha256")


def discard(blob: Path, why: str) -> None:
    log.warning("OpenVINO cache: %s %s; deleted, compiling afresh", blob, why)
    for path in (blob, sidecar(blob)):
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only cache: it is not read again without a matching sidecar anyway


def load_blob(core, blob: Path, config: dict[str, str]):
    """The compiled model cached at `blob`, or None when there is none, it fails its sha256 or will not import."""
    try:
        data, expected = blob.read_bytes(), sidecar(blob).read_text().strip()
    except OSError:
        return None  # no entry yet (or one whose sidecar was never written): compiled and stored afresh
    if hashlib.sha256(data).hexdigest() != expected:
        discard(blob, "does not match its sha256")
        return None
    try:
        return core.import_model(data, "CPU", config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
        discard(blob, f"cannot be imported ({str(exc).splitlines()[0][:120]})")
        return None


def store_blob(compiled, blob: Path) -> None:
    """Export `compiled` to `blob`, then its sha256 to the sidecar (both atomic); a cache that cannot be
    written is skipped: the next process compiles again."""
    try:
        stream = io.BytesIO()
        compiled.export_model(stream)
        data = stream.getvalue()
        atomic_write_bytes(blob, data)
        atomic_write_bytes(sidecar(blob), (hashlib.sha256(data).hexdigest() + "\n").encode())
    except (OSError, RuntimeError) as exc:
        log.debug("OpenVINO cache: not written to %s (%s)", blob, exc)


def compile_cached(
    core, ov, path: Path, precision: str, config: dict[str, str], cache: Path | None, graph: BundleGraph | None = None
):
    """`path` compiled for the CPU with `config`, from a verified cache entry when `cache` has one; with
    `graph`, compiled from its checked bytes (OpenVINO's ONNX frontend reads a model from io.BytesIO)."""
    sha256 = graph.sha256 if graph is not None else None
    try:
        blob = None if cache is None else blob_path(cache, path, precision, config, core, ov, sha256)
    except OSError:
        blob = None  # an unreadable graph: compile_model below names it in one line
    compiled = None if blob is None else load_blob(core, blob, config)
    if compiled is not None:
        return compiled
    source = io.BytesIO(graph.data) if graph is not None else str(path)  # a refused graph: its own one line
    try:
        compiled = core.compile_model(core.read_model(source), "CPU", config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
        reason = str(exc).splitlines()[0][:200]
        raise TilecoreError(f"engine {path.name}: OpenVINO cannot compile it ({reason})") from None
    if blob is not None:
        store_blob(compiled, blob)
    return compiled


def cpu_has_bf16() -> bool:
    """Whether OpenVINO is installed and reports bf16 instructions on this CPU."""
    try:
        core = import_openvino().Core()
    except BackendMissing:
        return False
    return reports_bf16(core)


class OpenVinoEngine:
    """One ONNX graph compiled by OpenVINO for the CPU."""

    def __init__(self, path: Path, options: EngineOptions, graph: BundleGraph | None = None) -> None:
        ov = import_openvino()
        core = ov.Core()
        if "CPU" not in core.available_devices:
            raise BackendMissing(f"--device openvino: OpenVINO sees no CPU device (it sees {core.available_devices})")
        native_bf16 = reports_bf16(core)
        if options.precision == "bf16" and not native_bf16 and not options.simulated_bf16:
            raise TilecoreError(
                "--precision bf16: this CPU has no bf16 instructions (OpenVINO would simulate bf16, slower than fp32)"
            )
        cache: Path | None = options.cache_dir or default_cache_dir()
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            cache = None  # a read-only home: compile every time rather than fail
        config = {"NUM_STREAMS": str(options.streams)}
        if options.streams == 1:
            config["PERFORMANCE_HINT"] = "LATENCY"
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = str(options.threads)
        if options.precision in PRECISION_HINTS:
            config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[options.precision]
        compiled = compile_cached(core, ov, path, options.precision, config, cache, graph)
        self.lock = threading.Lock()  # one call at a time through the request or the queue (module docstring)
        self.request = compiled.create_infer_request()
        self.streams = options.streams
        self.queue = ov.AsyncInferQueue(compiled, options.streams) if options.streams > 1 else None
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type, e.g. bf16 or f32
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        if options.precision == "bf16" and self.precision != "bf16":
            raise TilecoreError(f"--precision bf16: OpenVINO compiled {path.name} in {self.precision} on this CPU")
        if self.precision == "bf16" and not native_bf16:
            self.precision = "bf16 simulated"
        graph = "int8 graph, " if options.precision == "int8" else ""
        streams = f", {options.streams} streams" if options.streams > 1 else ""
        self.provider = f"OpenVINO CPU ({graph}{self.precision}{streams})"
        self.max_batch = options.max_batch

    def infer(self, tiles: np.ndarray) -> np.ndarray:
        """One chunk through the engine's request (the caller holds self.lock)."""
        self.request.infer({0: np.ascontiguousarray(tiles)})
        return self.request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

    def run(self, tiles: np.ndarray) -> np.ndarray:
        with self.lock:
            if self.queue is None:
                return run_in_chunks(self.infer, tiles, self.max_batch)
            return self.run_streams(tiles)

    def run_streams(self, tiles: np.ndarray) -> np.ndarray:
        """run() through the AsyncInferQueue, a chunk per stream (the caller holds self.lock)."""
        size = max(1, min(self.max_batch, math.ceil(len(tiles) / self.streams)))  # a chunk per stream
        outputs: list[np.ndarray | None] = [None] * math.ceil(len(tiles) / size)

        def keep(request, index: int) -> None:
            outputs[index] = request.get_output_tensor(0).data.copy()  # the request reuses its buffer

        self.queue.set_callback(keep)
        for index in range(len(outputs)):
            self.queue.start_async({0: np.ascontiguousarray(tiles[index * size : (index + 1) * size])}, index)
        self.queue.wait_all()
        if any(out is None for out in outputs):
            raise TilecoreError("OpenVINO: an inference stream returned no embeddings")
        return np.concatenate(outputs).astype(np.float32, copy=False)
