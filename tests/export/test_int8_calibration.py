"""int8 calibration: training tiles plus reference photographs, so that activation ranges leave room for
what normal images never show (a colour cast on grey textures, here)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.tiny import tiny_graph, tiny_run
from tilecore.export.quantize import (
    REFERENCE_PHOTOS,
    calibration_set,
    calibration_tiles,
    reference_tiles,
    relative_error,
    training_images,
    write_int8_graph,
)
from tilecore.runtime.preprocess import Preprocess
from tilecore.train.model import Embedder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("calibration"))


@pytest.fixture(scope="module")
def graph(run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Embedder]:
    return tiny_graph(run, tmp_path_factory.mktemp("graph"))


def test_reference_tiles_are_normalised_colour_photographs() -> None:
    import skimage.data

    spec = Preprocess(64, 64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    tiles = reference_tiles(spec, (48, 40))
    # each photograph whole, plus three windows of every photograph at least 48 x 40 (all of them are)
    assert tiles.shape == (4 * len(REFERENCE_PHOTOS), 3, 48, 40) and tiles.dtype == np.float32
    expected, sizes = [], []  # [48, 40, 3] uint8 each: the photograph area-resized, then 3 windows
    for name in REFERENCE_PHOTOS:
        photo = getattr(skimage.data, name)()[..., :3]
        ph, pw = photo.shape[:2]
        sizes.append((ph, pw))
        expected.append(cv2.resize(photo, (40, 48), interpolation=cv2.INTER_AREA))
        corners = ((0, 0), ((ph - 48) // 2, (pw - 40) // 2), (ph - 48, pw - 40))
        expected += [photo[y : y + 48, x : x + 40] for y, x in corners]
    expected = (np.stack(expected).transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.5  # [n, 3, 48, 40]
    np.testing.assert_allclose(tiles, expected, atol=1e-6)
    chroma = np.abs(tiles[:, 0] - tiles[:, 1]).mean(axis=(1, 2))  # |R - G| per tile
    assert (chroma > 0.02).mean() > 0.5  # colour, unlike the grey textures of the demo data
    big = reference_tiles(spec, (600, 600))  # only the photographs of at least 600 x 600 add windows
    assert len(big) == len(REFERENCE_PHOTOS) + 3 * sum(h >= 600 and w >= 600 for h, w in sizes) < len(tiles)


def test_calibration_set_is_reference_tiles_then_training_tiles(run: Path, graph: tuple[Path, Embedder]) -> None:
    _, embedder = graph
    images, spec, grid, hw = training_images(run, "gravel"), embedder.preprocess, embedder.grid, embedder.input_hw
    tiles = calibration_set(images, spec, grid, hw, limit=12)
    references = reference_tiles(spec, hw)
    assert len(tiles) == len(references) + 12
    np.testing.assert_array_equal(tiles[: len(references)], references)
    np.testing.assert_array_equal(tiles[len(references) :], calibration_tiles(images, spec, grid, hw, limit=12))


def test_reference_tiles_keep_a_colour_cast_from_being_clipped(
    run: Path, graph: tuple[Path, Embedder], tmp_path: Path
) -> None:
    onnx_path, embedder = graph
    images, spec, grid, hw = training_images(run, "gravel"), embedder.preprocess, embedder.grid, embedder.input_hw
    grey = calibration_tiles(images, spec, grid, hw, limit=24)  # the training tiles: grey gravel
    write_int8_graph(onnx_path, tmp_path / "grey.onnx", grey)
    write_int8_graph(onnx_path, tmp_path / "both.onnx", calibration_set(images, spec, grid, hw, limit=24))
    # a colour cast the training images never show: red up, blue down, on tiles of the same images
    mean, std = np.array(spec.mean)[:, None, None], np.array(spec.std)[:, None, None]
    pixels = grey[:8] * std + mean  # back to [0, 1]
    cast = np.clip(pixels * np.array([1.5, 1.0, 0.5])[:, None, None], 0, 1)
    cast = ((cast - mean) / std).astype(np.float32)  # [8, 3, h, w], normalised again
    grey_error = relative_error(onnx_path, tmp_path / "grey.onnx", cast)
    both_error = relative_error(onnx_path, tmp_path / "both.onnx", cast)
    assert both_error < 0.6 * grey_error  # measured: 0.029 vs 0.067
    # and on the normal tiles both stay close to fp32
    assert relative_error(onnx_path, tmp_path / "both.onnx", grey[:8]) < 0.1


def test_tied_weights_are_untied_and_the_graph_computes_the_same() -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tilecore.export.onnx_graph import untie_weights

    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["w"], ["w_again"]),  # how the exporter shares an equal weight
            helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["x", "w_again"], ["b"], pads=[1, 1, 1, 1]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)

    def run(m: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    before = run(model)
    assert untie_weights(model) == 1
    assert not [n for n in model.graph.node if n.op_type == "Identity"]
    assert {t.name for t in model.graph.initializer} == {"w", "w_again"}
    onnx.checker.check_model(model)
    np.testing.assert_allclose(run(model), before, rtol=1e-5, atol=1e-5)  # other kernels, same weights
