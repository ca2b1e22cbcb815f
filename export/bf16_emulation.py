"""bf16 emulated on any CPU: what a bf16 engine would change, measured where no bf16 hardware is.

OpenVINO runs bf16 only on CPUs with bf16 instructions (AVX-512 bf16, AMX). An export machine without
them can still estimate what bf16 costs with this module: the fp32 graph is rewritten so that every
weight, the input and every floating-point tensor a node produces is rounded to bf16 (round to nearest
even, kept in float32), and ONNX Runtime runs it in fp32. A product of two bf16 numbers is exact in
fp32, and the sums are fp32, so a convolution sees what a bf16 convolution with fp32 accumulation
(oneDNN's, which OpenVINO uses) sees. Where OpenVINO fuses a residual add or an activation into the
convolution it rounds once where this rounds twice, so the emulation errs, slightly, on the side of
more error. The exporter and tools/precision_agreement.py label its results "emulated".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tilecore.runtime.engines.base import EngineOptions
from tilecore.runtime.engines.onnx_runtime import OrtEngine

EMULATED = "emulated"  # the backend name the exporter records for an emulated bf16 check


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bf16 (ties to even), still float32. NaN and inf are not
    expected in weights and are not special-cased."""
    bits = np.array(values, dtype=np.float32).view(np.uint32)  # a copy; keeps a 0-d array 0-d
    lower_half_round = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = (bits + lower_half_round) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def round_float_tensor(tensor: TensorProto) -> None:
    if tensor.data_type == TensorProto.FLOAT:
        tensor.CopyFrom(numpy_helper.from_array(round_to_bf16(numpy_helper.to_array(tensor)), tensor.name))


def image_data_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors computed from the input image's values, not from its shape: what a bf16
    engine holds in bf16. Shape arithmetic (e.g. "same" padding from Shape -> Cast -> Div -> Ceil) stays
    exact, as OpenVINO folds it or keeps it in fp32."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.output)
    floats = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    data = {i.name for i in model.graph.input}
    for node in model.graph.node:  # nodes are in topological order
        if node.op_type not in ("Shape", "Size") and any(name in data for name in node.input):
            data.update(node.output)
    return data & floats


def bf16_emulation_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` that computes what it computes with every float tensor rounded to bf16."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    data = image_data_tensors(model)
    weights = {name for node in graph.node if set(node.output) & data for name in node.input} - data
    for tensor in graph.initializer:
        if tensor.name in weights:
            round_float_tensor(tensor)
    outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}  # tensor -> its rounded copy, which later readers read instead
    nodes = []

    def cast_pair(source: str, target: str) -> None:
        nodes.append(helper.make_node("Cast", [source], [f"{target}.bf16"], to=TensorProto.BFLOAT16))
        nodes.append(helper.make_node("Cast", [f"{target}.bf16"], [target], to=TensorProto.FLOAT))

    for graph_input in graph.input:
        if graph_input.type.tensor_type.elem_type == TensorProto.FLOAT:
            cast_pair(graph_input.name, f"{graph_input.name}.rounded")
            renamed[graph_input.name] = f"{graph_input.name}.rounded"
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        if node.op_type == "Constant" and node.output[0] in weights:
            for attribute in node.attribute:
                if attribute.name == "value":
                    round_float_tensor(attribute.t)
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name not in data:
                continue
            if name in outputs:  # a graph output keeps its name: the node writes an unrounded copy
                node.output[i] = f"{name}.unrounded"
                cast_pair(node.output[i], name)
            else:
                cast_pair(name, f"{name}.rounded")
                renamed[name] = f"{name}.rounded"
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # the exporter's shape notes name tensors that are now read through casts
    return model


def write_bf16_emulation(fp32_graph: Path, out_path: Path) -> Path:
    onnx.save(bf16_emulation_graph(onnx.load(str(fp32_graph))), str(out_path))
    return out_path


def emulated_bf16_engine(fp32_graph: Path, folder: Path, threads: int = 0, max_batch: int = 4) -> OrtEngine:
    """An engine that computes `fp32_graph` as bf16 would (the rewritten graph is written into `folder`)."""
    path = write_bf16_emulation(fp32_graph, folder / f"{fp32_graph.stem}.bf16-emulated.onnx")
    engine = OrtEngine(path, EngineOptions("cpu", threads, max_batch), "cpu")
    engine.provider = "ONNX Runtime CPU (bf16 emulated)"
    return engine
