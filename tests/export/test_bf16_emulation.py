"""bf16 emulated on ONNX Runtime: exact rounding, a convolution that matches a NumPy bf16 convolution, shape
arithmetic left exact, and an exporter that records an emulated bf16 check where the CPU has no bf16."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.tiny import tiny_graph, tiny_run
from tilecore.export import reduced_precision
from tilecore.export.bf16_emulation import (
    EMULATED,
    bf16_emulation_graph,
    emulated_bf16_engine,
    image_data_tensors,
    round_to_bf16,
)
from tilecore.export.bundle import export_run
from tilecore.runtime.engines.base import BackendMissing, Engine, EngineOptions
from tilecore.runtime.engines.opener import open_engine
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.predictor import Predictor


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("bf16"), tiling={})


def test_round_to_bf16_keeps_8_significant_bits_ties_to_even() -> None:
    one_ulp = 2.0**-7  # bf16 has 7 stored mantissa bits: spacing 2^-7 between 1 and 2
    values = np.array([1.0, 1 + one_ulp / 2, 1 + 1.5 * one_ulp, 1 + one_ulp / 4, -3.0e-3, 6.5e4], dtype=np.float32)
    rounded = round_to_bf16(values)
    assert rounded[0] == 1.0 and rounded[1] == 1.0  # a tie goes to the even neighbour, 1.0
    assert rounded[2] == np.float32(1 + 2 * one_ulp)  # a tie above an odd mantissa goes up
    assert rounded[3] == 1.0
    assert np.all(rounded.view(np.uint32) & 0xFFFF == 0)  # exactly representable in bf16
    assert np.all(np.abs(rounded - values) <= np.abs(values) * 2.0**-8)
    assert round_to_bf16(np.float32(3.14159).reshape(())).shape == ()  # a 0-d constant stays 0-d


def conv_graph(x_shape: tuple[int, ...], weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """images -> Conv(1x1) -> Relu -> embeddings, with a shape-arithmetic branch that feeds a Reshape."""
    nodes = [
        helper.make_node("Conv", ["images", "w", "b"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Shape", ["relu"], ["shape"]),
        helper.make_node("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["shape_f", "three"], ["thirds"]),  # 1/3, not a bf16 number
        helper.make_node("Mul", ["thirds", "three"], ["back"]),
        helper.make_node("Round", ["back"], ["rounded_back"]),
        helper.make_node("Cast", ["rounded_back"], ["new_shape"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["relu", "new_shape"], ["embeddings"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array(3.0, np.float32), "three"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_emulated_convolution_matches_a_numpy_bf16_convolution(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 5, 7)).astype(np.float32)
    weight = rng.standard_normal((8, 16, 1, 1)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    model = conv_graph(x.shape, weight, bias)
    assert image_data_tensors(model) == {"conv", "relu", "embeddings"}  # not the shape arithmetic
    onnx.save(bf16_emulation_graph(model), tmp_path / "emulated.onnx")
    onnx.save(model, tmp_path / "fp32.onnx")
    emulated = open_engine(tmp_path / "emulated.onnx", EngineOptions("cpu")).run(x)
    fp32 = open_engine(tmp_path / "fp32.onnx", EngineOptions("cpu")).run(x)
    # bf16 inputs and weights, products exact and sums in float64 here, one rounding of the result
    conv = np.einsum("bchw,oc->bohw", round_to_bf16(x).astype(np.float64), round_to_bf16(weight[:, :, 0, 0]))
    expected = round_to_bf16(np.maximum(round_to_bf16(conv + round_to_bf16(bias)[None, :, None, None]), 0))
    assert emulated.shape == fp32.shape == x.shape[:1] + (8, 5, 7)  # the shape branch stayed exact
    ulp = np.abs(expected) * 2.0**-7
    assert np.all(np.abs(emulated - expected) <= ulp)  # at most one bf16 step: sums rounded near a tie
    assert np.mean(emulated == expected) > 0.9
    assert 1e-4 < np.abs(emulated - fp32).max() / np.abs(fp32).max() < 2e-2  # bf16 changed it, a little


def test_emulated_engine_runs_a_backbone_graph(run: Path, tmp_path: Path) -> None:
    graph, _ = tiny_graph(run, tmp_path)
    tiles = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    engine = emulated_bf16_engine(graph, tmp_path)
    emulated, fp32 = engine.run(tiles), open_engine(graph, EngineOptions("cpu")).run(tiles)
    assert "bf16 emulated" in engine.provider and emulated.dtype == np.float32
    error = np.linalg.norm(emulated - fp32) / np.linalg.norm(fp32)
    assert 1e-4 < error < 5e-2
    (rewritten,) = tmp_path.glob("*.bf16-emulated.onnx")
    assert onnx.load(str(rewritten)).graph.output[0].name == onnx.load(str(graph)).graph.output[0].name


def test_export_records_an_emulated_bf16_check_without_bf16_from_openvino(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_openvino(*_: object) -> None:
        raise BackendMissing("--device openvino: the openvino package is not installed")

    monkeypatch.setattr(reduced_precision, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(reduced_precision, "OpenVinoEngine", no_openvino)
    manifest = export_run(run, tmp_path / "b", precisions=("bf16",), precision_floor=0.0)
    check = manifest.reduced_precision.bf16
    assert check.backend == EMULATED and check.max_score_diff > 0
    assert not [p.name for p in (tmp_path / "b").iterdir() if "emulated" in p.name]  # nothing extra in the bundle
    fp32 = Predictor(tmp_path / "b", device="cpu")
    with pytest.raises(TilecoreError, match="engines for"):
        Predictor(tmp_path / "b", device="cpu", precision="bf16", engines={"other.onnx": fp32.engines})


def openvino_bf16(graph: Path, cache: Path) -> Engine:
    """OpenVINO's bf16 engine of `graph`: native where the CPU has bf16 instructions, else its simulation."""
    pytest.importorskip("openvino", reason="the openvino extra is part of the dev install")
    from tilecore.runtime.engines.openvino import cpu_has_bf16

    options = EngineOptions("openvino", precision="bf16", cache_dir=cache, simulated_bf16=not cpu_has_bf16())
    try:
        return open_engine(graph, options)
    except TilecoreError as exc:
        pytest.skip(f"OpenVINO runs no bf16 on this CPU, not even simulated: {exc}")


def test_export_measures_bf16_with_openvino_where_it_can(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph, _ = tiny_graph(run, tmp_path)
    openvino_bf16(graph, tmp_path / "cache")  # skips where OpenVINO gives no bf16 at all
    monkeypatch.setattr(reduced_precision, "cpu_has_bf16", lambda: False)  # as on a CPU without bf16
    manifest = export_run(run, tmp_path / "b", precisions=("bf16",), precision_floor=0.0)
    check = manifest.reduced_precision.bf16
    assert check.backend == reduced_precision.SIMULATED and check.max_score_diff > 0


def test_emulation_is_close_to_openvino_bf16(run: Path, tmp_path: Path) -> None:
    """How far the emulation can be trusted: against OpenVINO's own bf16 (native, or simulated on AVX-512
    CPUs without bf16 instructions) it differs far less than either differs from fp32."""
    graph, _ = tiny_graph(run, tmp_path)
    tiles = np.random.default_rng(2).standard_normal((4, 3, 64, 64)).astype(np.float32)
    openvino = openvino_bf16(graph, tmp_path / "cache").run(tiles)
    fp32 = open_engine(graph, EngineOptions("cpu")).run(tiles)
    emulated = emulated_bf16_engine(graph, tmp_path).run(tiles)
    openvino_error = np.linalg.norm(openvino - fp32) / np.linalg.norm(fp32)
    emulated_error = np.linalg.norm(emulated - fp32) / np.linalg.norm(fp32)
    between = np.linalg.norm(emulated - openvino) / np.linalg.norm(fp32)
    assert 0.5 < emulated_error / openvino_error < 2.0, (emulated_error, openvino_error)
    assert between < 0.5 * openvino_error, (between, openvino_error)
