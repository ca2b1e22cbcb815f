"""open_engine(path, options, graph): the engine for a graph on options.device.

`auto` walks table.AUTO_ORDER and takes the first backend that is present, saying which one runs.
ONNX Runtime's backends are imported here; OpenVINO and native TensorRT only when asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tilecore.runtime.engines.base import BackendMissing, BundleGraph, Engine, EngineOptions
from tilecore.runtime.engines.onnx_runtime import OrtEngine
from tilecore.runtime.engines.table import AUTO_ORDER
from tilecore.runtime.engines.tensorrt_plans import qdq_graph_name
from tilecore.runtime.errors import TilecoreError

log = logging.getLogger("tilecore")


def graph_at_precision(path: Path, graph: BundleGraph | None, device: str, precision: str):
    """(path, graph) of the bundle graph `device` runs for fp32 graph `path` at `precision`: at int8 the native
    TensorRT backend keeps the fp32 graph (its record picks the int8 plan), ONNX Runtime's TensorRT EP takes
    the signed-int8 Q/DQ graph (TensorRT cannot build the uint8 graph), every other backend the bundle's
    int8 graph. A bare path (no BundleGraph) is run as it is."""
    if graph is None or precision != "int8" or device == "tensorrt-native":
        return path, graph
    manifest = graph.manifest
    if device == "tensorrt":
        name = qdq_graph_name(graph.name)
        if name not in manifest.files:
            raise BackendMissing(
                f"--device tensorrt --precision int8: the bundle has no signed-int8 Q/DQ graph of {graph.name} "
                "(export --tensorrt --precision int8 writes one)"
            )
    else:
        graphs = manifest.reduced_precision.int8 if manifest.reduced_precision is not None else {}
        if graph.name not in graphs:
            raise TilecoreError(
                f"--precision int8: bundle has no int8 graph of {graph.name}; "
                "export with `tilecore export --precision int8`"
            )
        name = graphs[graph.name].file
    return graph.bundle / name, BundleGraph(graph.bundle, manifest, name)


def open_backend(path: Path, options: EngineOptions, device: str, graph: BundleGraph | None = None) -> Engine:
    """The engine for one concrete device name (never `auto`); `path` is the fp32 graph (graph_at_precision)."""
    if options.streams > 1 and device != "openvino":
        raise BackendMissing(f"--streams {options.streams}: parallel streams are OpenVINO's; use --device openvino")
    path, graph = graph_at_precision(path, graph, device, options.precision)
    if device == "openvino":
        from tilecore.runtime.engines.openvino import OpenVinoEngine

        return OpenVinoEngine(path, options, graph)
    if device == "tensorrt-native":
        from tilecore.runtime.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(path, options, graph)
    return OrtEngine(path, options, device, graph)


def open_engine(path: Path, options: EngineOptions, graph: BundleGraph | None = None) -> Engine:
    """The engine for the ONNX graph at `path` on options.device; `auto` takes the first backend present.
    `graph`: the same graph from a checked bundle, loaded from its checked bytes (module docstring)."""
    if options.device != "auto":
        return open_backend(path, options, options.device, graph)
    reasons = []
    for device in AUTO_ORDER:
        try:
            engine = open_backend(path, options, device, graph)
        except BackendMissing as missing:
            log.debug("auto: %s", missing)
            reasons.append(str(missing))
            continue
        log.info("engine %s runs on %s", path.name, engine.provider)
        return engine
    raise TilecoreError(f"engine {path.name}: no backend could load it ({reasons[-1]})")  # cpu, then, was refused
