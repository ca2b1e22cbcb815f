"""One member's embedder (backbone + PatchCore head) as an ONNX graph: images [B, 3, H, W] -> [B, h, w, D]."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import onnx
import torch

from tilecore.runtime.errors import TilecoreError

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
PROTOBUF_LIMIT = 2**31 - 1  # larger models go to external data


def weights_hash(net: torch.nn.Module, input_hw: tuple[int, int]) -> str:
    """Identity of an engine: its weights and its input size (identical members share one engine)."""
    digest = hashlib.sha256(f"{input_hw}".encode())
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def untie_weights(model: onnx.ModelProto) -> int:
    """Give each Identity of a weight its own copy; returns how many. The exporter stores equal weights once
    (e.g. all-zero convolutions of a random-init network after batch-norm folding) and feeds the others
    through Identity nodes, which quantizers that look for a Conv's weight among the initializers reject."""
    initializers = {t.name: t for t in model.graph.initializer}
    tied = [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    for node in tied:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        model.graph.initializer.append(copy)
        model.graph.node.remove(node)
    return len(tied)


def export_embedder(net: torch.nn.Module, input_hw: tuple[int, int], path: Path) -> None:
    """Write `net` as ONNX with a dynamic batch axis, then check it (checker + shape inference)."""
    example = torch.zeros(2, 3, *input_hw)
    with warnings.catch_warnings():  # the tracer's notes on shape-dependent Python branches are expected
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    model = onnx.load(str(path))
    if untie_weights(model):
        onnx.save_model(model, str(path))
    if model.ByteSize() > PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    try:
        onnx.checker.check_model(str(path))
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    except Exception as exc:  # noqa: BLE001
        raise TilecoreError(f"export {path.name}: the ONNX graph failed its check ({exc})") from None
