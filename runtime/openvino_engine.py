"""OpenVINO backend (`--device openvino`): Intel CPUs, reading the bundle's ONNX graph directly.

Compiled once per process; OpenVINO keeps the compiled blob in a cache folder (default
`$XDG_CACHE_HOME/tilecore/openvino`, never the working directory) so later processes start fast.
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
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from tilecore.runtime.engine import BackendMissing, EngineOptions, run_in_chunks
from tilecore.runtime.errors import TilecoreError

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}  # "auto" and "int8": no hint (bf16 where the CPU has it)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tilecore" / "openvino"


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


def cpu_has_bf16() -> bool:
    """Whether OpenVINO is installed and reports bf16 instructions on this CPU."""
    try:
        core = import_openvino().Core()
    except BackendMissing:
        return False
    return reports_bf16(core)


class OpenVinoEngine:
    """One ONNX graph compiled by OpenVINO for the CPU."""

    def __init__(self, path: Path, options: EngineOptions) -> None:
        ov = import_openvino()
        core = ov.Core()
        if "CPU" not in core.available_devices:
            raise BackendMissing(f"--device openvino: OpenVINO sees no CPU device (it sees {core.available_devices})")
        native_bf16 = reports_bf16(core)
        if options.precision == "bf16" and not native_bf16 and not options.simulated_bf16:
            raise TilecoreError(
                "--precision bf16: this CPU has no bf16 instructions (OpenVINO would simulate bf16, slower than fp32)"
            )
        cache = options.cache_dir or default_cache_dir()
        try:
            cache.mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache)})
        except OSError:
            pass  # a read-only home: compile every time rather than fail
        config = {"NUM_STREAMS": str(options.streams)}
        if options.streams == 1:
            config["PERFORMANCE_HINT"] = "LATENCY"
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = str(options.threads)
        if options.precision in PRECISION_HINTS:
            config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[options.precision]
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            reason = str(exc).splitlines()[0][:200]
            raise TilecoreError(f"engine {path.name}: OpenVINO cannot compile it ({reason})") from None
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
        self.request.infer({0: np.ascontiguousarray(tiles)})
        return self.request.get_output_tensor(0).data.copy()  # the request reuses its output buffer

    def run(self, tiles: np.ndarray) -> np.ndarray:
        if self.queue is None:
            return run_in_chunks(self.infer, tiles, self.max_batch)
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
