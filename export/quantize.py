"""Static int8 quantization of a backbone graph: calibration tiles and a Q/DQ ONNX graph.

Shared by the CPU int8 engines (export.reduced_precision: NNCF, write_int8_graph) and TensorRT's int8
build (export.tensorrt_build: ONNX Runtime's quantizer, write_qdq_graph). Both write
QuantizeLinear/DequantizeLinear pairs, which ONNX Runtime, OpenVINO and TensorRT all run as int8.

Calibration sets every activation's int8 range, and whatever falls outside it is clipped. Tiles of the
run's training images (normal images, never test ones, cut by the runtime's own preprocessing and
tiling) give the ranges where normal images live; but an anomaly is by definition what those images do
not contain, and clipping flattens exactly that signal. So calibration_set adds reference_tiles, cut
from colour photographs bundled with scikit-image, which widen the ranges to what a photograph can bring.
On the demo's grey textures a colour-cast defect scoring 31 (normalised) in fp32 scored 2.4 in int8
calibrated on the training tiles alone; the README has the measurements with the reference tiles.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.preprocess import Preprocess, normalise_rgb, tiles_at
from tilecore.runtime.tiling import TileGrid
from tilecore.train.run_images import CALIBRATION, kept_images


def training_images(run_dir: Path, category: str) -> list[str]:
    """The training images of a category that int8 calibration takes tiles from (normal images its banks
    were fitted on): the evenly spaced subset the run keeps at the working size (train.run_images), or
    the dataset's files for runs trained before runs kept them."""
    return kept_images(run_dir, category, CALIBRATION)


def calibration_tiles(
    images: list[str], preprocess: Preprocess, grid: TileGrid, input_hw: tuple[int, int], limit: int
) -> np.ndarray:
    """Backbone inputs [n <= limit, 3, in_h, in_w] from evenly spaced images, every tile location of each."""
    if not images:
        raise TilecoreError("int8: the run lists no training images to calibrate on")
    wanted = min(len(images), math.ceil(limit / grid.count))
    picks = np.linspace(0, len(images) - 1, wanted).round().astype(int)
    locations = list(range(grid.count))
    tiles = [tiles_at(normalise_rgb(read_rgb(images[i]), preprocess), grid, locations, input_hw) for i in picks]
    return np.concatenate(tiles)[:limit]  # [images * T, 3, in_h, in_w] -> at most `limit` tiles


# scikit-image's bundled colour photographs (no download): people, animals, objects, space, microscopy.
REFERENCE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
)  # fmt: skip


def reference_tiles(preprocess: Preprocess, input_hw: tuple[int, int]) -> np.ndarray:
    """Backbone inputs [n, 3, in_h, in_w] from REFERENCE_PHOTOS: each photograph whole (resized to the
    input) and, where it is large enough, three input-sized windows at its own scale (corner, centre,
    corner), normalised as the member's preprocessing does."""
    try:
        import skimage.data
    except ImportError:
        message = "int8: calibration needs scikit-image's photographs (pip install 'tilecore[export]')"
        raise TilecoreError(message) from None

    h, w = input_hw
    spec = replace(preprocess, height=h, width=w)
    tiles = []
    for name in REFERENCE_PHOTOS:
        photo = np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])  # [H, W, 3] uint8, alpha dropped
        tiles.append(normalise_rgb(photo, spec))  # the whole photograph, resized: [3, h, w]
        ph, pw = photo.shape[:2]
        if ph >= h and pw >= w:
            for y, x in ((0, 0), ((ph - h) // 2, (pw - w) // 2), (ph - h, pw - w)):
                tiles.append(normalise_rgb(np.ascontiguousarray(photo[y : y + h, x : x + w]), spec))
    return np.stack(tiles)  # [n, 3, h, w]


def calibration_set(
    images: list[str], preprocess: Preprocess, grid: TileGrid, input_hw: tuple[int, int], limit: int
) -> np.ndarray:
    """What an int8 graph is calibrated on: reference_tiles, then calibration_tiles of the training images
    (in that order, so a quantizer that trims the set to whole batches drops training tiles, not these)."""
    normal = calibration_tiles(images, preprocess, grid, input_hw, limit)
    return np.concatenate([reference_tiles(preprocess, input_hw), normal])  # [n_ref + limit', 3, in_h, in_w]


def float_nodes(onnx_path: Path, patterns: tuple[str, ...]) -> list[str]:
    """Names of the Conv nodes that stay float: "head" (the PatchCore projection, outside the backbone),
    "stem" (the first convolution) and "depthwise" (grouped convolutions with one input channel per group)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    weights = {t.name: t for t in graph.initializer}
    chosen = []
    for i, node in enumerate(convs):
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = weights.get(node.input[1])
        depthwise = group > 1 and weight is not None and weight.dims[1] == 1
        head = not node.name.startswith("/features/")
        if ("head" in patterns and head) or ("stem" in patterns and i == 0) or ("depthwise" in patterns and depthwise):
            chosen.append(node.name)
    return chosen


def write_qdq_graph(onnx_path: Path, out_path: Path, tiles: np.ndarray, batch: int) -> None:
    """TensorRT's int8 graph: Q/DQ pairs by ONNX Runtime's static quantizer (entropy calibration on `tiles`,
    symmetric int8 activations as TensorRT requires, per-channel int8 weights, float biases)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    input_name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name

    class TileReader(CalibrationDataReader):
        def __init__(self) -> None:
            whole = max(batch, len(tiles) - len(tiles) % batch)  # entropy calibration needs equal batch shapes
            self.batches = iter([tiles[i : i + batch] for i in range(0, min(whole, len(tiles)), batch)])

        def get_next(self) -> dict | None:
            chunk = next(self.batches, None)
            return None if chunk is None else {input_name: chunk}

    root = logging.getLogger()  # the quantizer prints progress and logs advice on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(onnx_path),
                str(out_path),
                TileReader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.Entropy,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
            )
    finally:
        root.setLevel(level)


def int8_convolutions(model) -> tuple[int, int]:
    """(Conv nodes whose weights come through a DequantizeLinear, all Conv nodes) of an ONNX model."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    return sum(producers.get(node.input[1]) == "DequantizeLinear" for node in convs), len(convs)


def write_int8_graph(
    onnx_path: Path,
    out_path: Path,
    tiles: np.ndarray,
    keep_float: tuple[str, ...] = (),
    max_error: float | None = None,
    validation_tiles: np.ndarray | None = None,
) -> str:
    """The CPU int8 graph (Q/DQ ONNX) by NNCF's post-training quantization; returns how it was made.

    NNCF calibrates activation ranges on `tiles`, fuses activations into the quantized convolutions and
    corrects the biases for the rounding error; on tf_efficientnet_lite0 its embeddings were 7.5% off the
    fp32 graph's against 33% for ONNX Runtime's static quantizer with the same tiles (min-max, uint8).
    The PatchCore head is quantized too: keeping it float left the error at 7.5% (resnet18: 1.2%) and
    cost 38% of lite0's int8 speed (140 vs 225 tiles/s at 256 px in OpenVINO).

    With `max_error`, NNCF's accuracy control puts back in float, most harmful first, the layers whose
    quantization moves the embeddings of `validation_tiles` most, until their mean relative error
    (||int8 - fp32|| / ||fp32|| per tile) is at most `max_error`: slower than all-int8, closer to fp32.
    """
    import nncf
    import onnx

    model = onnx.load(str(onnx_path))
    input_name = model.graph.input[0].name
    dataset = nncf.Dataset([tiles[i : i + 1] for i in range(len(tiles))], lambda tile: {input_name: tile})
    ignored = nncf.IgnoredScope(names=float_nodes(onnx_path, keep_float))
    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        if max_error is None:
            quantized = nncf.quantize(model, dataset, subset_size=len(tiles), ignored_scope=ignored)
        else:
            if validation_tiles is None or not len(validation_tiles):
                raise TilecoreError("int8 --int8-max-error: no validation tiles to measure the error on")
            quantized = nncf.quantize_with_accuracy_control(
                model,
                dataset,
                nncf.Dataset([validation_tiles[i : i + 1] for i in range(len(validation_tiles))]),
                embedding_agreement(onnx_path),
                max_drop=max_error,
                drop_type=nncf.DropType.ABSOLUTE,
                subset_size=len(tiles),
                ignored_scope=ignored,
            )
    onnx.save(quantized, str(out_path))
    kept = f"; float: {', '.join(keep_float)}" if keep_float else ""
    int8, total = int8_convolutions(quantized)
    control = "" if max_error is None else f", accuracy control (embedding error <= {max_error:g})"
    return (
        f"NNCF {nncf.__version__} post-training quantization{control}, {len(tiles)} calibration tiles, "
        f"{int8} of {total} convolutions int8{kept}"
    )


def tile_errors(fp32, candidate, tiles) -> list[float]:
    """||candidate(t) - fp32(t)|| / ||fp32(t)|| for each tile t [1, 3, h, w] (ONNX Runtime sessions)."""
    name = fp32.get_inputs()[0].name
    errors = []
    for tile in tiles:
        ours, theirs = candidate.run(None, {name: tile})[0], fp32.run(None, {name: tile})[0]
        errors.append(float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-12)))
    return errors


def embedding_error(reference: Path, candidate: Path, tiles: np.ndarray) -> float:
    """The mean of tile_errors over `tiles` [n, 3, h, w]: what --int8-max-error bounds."""
    import onnxruntime as ort

    fp32, ours = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (reference, candidate))
    return float(np.mean(tile_errors(fp32, ours, (tiles[i : i + 1] for i in range(len(tiles))))))


def embedding_agreement(reference: Path) -> Callable:
    """NNCF's validation function: 1 - the mean of tile_errors over the items it is given, and 1 - each."""
    import onnxruntime as ort

    fp32 = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])

    def agreement(model, items) -> tuple[float, list[float]]:
        candidate = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        per_tile = [1.0 - e for e in tile_errors(fp32, candidate, items)]
        return float(np.mean(per_tile)), per_tile

    return agreement


def relative_error(reference: Path, candidate: Path, tiles: np.ndarray) -> float:
    """||candidate(tiles) - reference(tiles)|| / ||reference(tiles)|| with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    outputs = []
    for path in (reference, candidate):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: tiles})[0])
    return float(np.linalg.norm(outputs[1] - outputs[0]) / max(np.linalg.norm(outputs[0]), 1e-12))
