"""`export --tensorrt` on a machine without a GPU: the builder's calls through a fake tensorrt module, the
INT8 Q/DQ graph and its calibration tiles, and the one-line refusal when the GPU stack is missing."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests import gpu_fakes
from tests.tiny import tiny_graph
from tilecore.export import bundle as bundle_module
from tilecore.export.bundle import export_run
from tilecore.export.quantize import calibration_tiles, relative_error, training_images, write_qdq_graph
from tilecore.export.tensorrt_build import TensorRTBuild, build_engine, check_build_stack
from tilecore.runtime.engines.tensorrt_plans import profile_shapes
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.manifest import read_manifest
from tilecore.runtime.preprocess import normalise_rgb, tiles_at
from tilecore.train.model import Embedder


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gpu_fakes.tiny_run(tmp_path_factory.mktemp("trt_build"))


@pytest.fixture(scope="module")
def graph(run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Embedder]:
    return tiny_graph(run, tmp_path_factory.mktemp("graph"))


def qdq_nodes(model: onnx.ModelProto) -> int:
    return sum(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)


def test_profile_spans_one_tile_to_max_batch() -> None:
    profile = profile_shapes("images", (-1, 3, 48, 64), 8)
    assert (profile.min, profile.opt, profile.max) == ((1, 3, 48, 64), (8, 3, 48, 64), (8, 3, 48, 64))
    assert profile_shapes("images", ("batch", 3, 48, 64), 8, opt_batch=2).opt == (2, 3, 48, 64)
    for shape, max_batch, message in (
        ((4, 3, 48, 64), 8, "fixed batch 4"),
        ((-1, 3, -1, 64), 8, "only the batch axis"),
        ((-1, 3, 48), 8, "expected \\[batch, C, H, W\\]"),
        ((-1, 3, 48, 64), 0, "--max-batch 0"),
    ):
        with pytest.raises(TilecoreError, match=message):
            profile_shapes("images", shape, max_batch)


@pytest.mark.parametrize(
    ("fp16", "int8", "network_flags", "flags", "cleared"),
    [
        (False, False, 1 << 1, set(), {"TF32"}),  # strongly typed fp32; fp32 means fp32: TF32 off
        (True, False, 0, {"FP16"}, set()),  # an fp32 graph: only the (deprecated) flag allows fp16
        (False, True, 1 << 1, set(), set()),  # strongly typed Q/DQ graph, no precision flags
        (True, True, 0, {"INT8", "FP16"}, set()),  # weakly typed Q/DQ graph: INT8 flag required
    ],
)
def test_builder_calls(
    graph: tuple[Path, Embedder], tmp_path: Path, monkeypatch, fp16, int8, network_flags, flags, cleared
) -> None:
    trt, cudart = gpu_fakes.install(monkeypatch, gpus=[("NVIDIA Fake A10", 8, 6), ("NVIDIA Fake L4", 8, 9)])
    onnx_path = tmp_path / graph[0].name
    shutil.copy(graph[0], onnx_path)
    build = TensorRTBuild(fp16=fp16, int8=int8, workspace_gb=1.5, max_batch=4, gpu_id=1)
    stack = check_build_stack(build)
    assert stack.gpu.name == "NVIDIA Fake L4" and stack.gpu.compute_capability == "8.9"
    tiles = np.random.default_rng(0).normal(size=(12, 3, 32, 32)).astype(np.float32) if int8 else None
    record = build_engine(onnx_path, build, stack, tiles)

    (call,) = trt.builds
    assert call["network_flags"] == network_flags and call["flags"] == flags and call["cleared"] == cleared
    assert call["device"] == 1  # built with the chosen GPU current in the building thread
    assert call["workspace"] == {"WORKSPACE": int(1.5 * 2**30)}
    assert call["profile"] == ("images", [1, 3, 32, 32], [4, 3, 32, 32], [4, 3, 32, 32])
    assert (call["onnx"] != str(onnx_path)) == int8  # INT8 builds from the Q/DQ graph, written elsewhere
    tag = {"fp32": "", "fp16": ".fp16", "int8": ".int8", "int8+fp16": ".int8-fp16"}[build.precision]
    assert record.engine == f"backbone_0123456789abcdef.nvidia-fake-l4-sm89{tag}.engine"
    qdq = ["backbone_0123456789abcdef.qdq.onnx"] * int8  # kept for the TensorRT EP's int8 (run --device tensorrt)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([onnx_path.name, record.engine, *qdq])
    assert call["onnx"] == str(tmp_path / (qdq[0] if int8 else onnx_path.name))
    plan = (tmp_path / record.engine).read_bytes()
    parsed = onnx.load_from_string(plan[12 + int.from_bytes(plan[8:12], "little") :])
    assert (qdq_nodes(parsed) > 0) == int8
    assert record.tensorrt_version == trt.__version__ and record.gpu_name == "NVIDIA Fake L4"
    assert record.precision == build.precision and record.profile.max_batch == 4 and record.output_name == "embeddings"
    if int8:
        assert record.int8_calibration.tiles == 12 and 0 < record.int8_calibration.qdq_relative_error < 0.05
    else:
        assert record.int8_calibration is None


def test_calibration_tiles_are_runtime_tiles_of_training_images(run: Path, graph: tuple[Path, Embedder]) -> None:
    _, embedder = graph
    split = json.loads((run / "gravel" / "split.json").read_text())
    images = training_images(run, "gravel")  # the run's kept copies, so export needs no dataset
    sources = json.loads((run / "gravel" / "kept.json").read_text())["sources"]["calibration"]
    assert len(images) == len(sources) and all("/kept/calibration/" in p for p in images)
    assert set(sources) <= set(split["train"]) and not set(sources) & set(split["test"] + split["validation"])
    grid, hw = embedder.grid, embedder.input_hw
    assert grid.count == 4 and len(images) >= 3
    tiles = calibration_tiles(images, embedder.preprocess, grid, hw, limit=12)  # 3 images x 4 locations
    assert tiles.shape == (12, 3, *hw) and tiles.dtype == np.float32

    def runtime_tiles(path: str) -> np.ndarray:
        return tiles_at(normalise_rgb(read_rgb(path), embedder.preprocess), grid, list(range(4)), hw)

    np.testing.assert_array_equal(tiles[:4], runtime_tiles(images[0]))
    np.testing.assert_array_equal(tiles[8:], runtime_tiles(images[-1]))
    assert not np.array_equal(tiles[4:8], tiles[:4]) and not np.array_equal(tiles[4:8], tiles[8:])
    assert len(calibration_tiles(images, embedder.preprocess, grid, hw, limit=10)) == 10
    assert len(calibration_tiles(images, embedder.preprocess, grid, hw, limit=10_000)) == 4 * len(images)
    with pytest.raises(TilecoreError, match="no training images"):
        calibration_tiles([], embedder.preprocess, grid, hw, limit=8)


def test_qdq_graph_is_symmetric_int8_and_close_to_fp32(run: Path, graph: tuple[Path, Embedder], tmp_path: Path) -> None:
    onnx_path, embedder = graph
    tiles = calibration_tiles(training_images(run, "gravel"), embedder.preprocess, embedder.grid, (32, 32), 16)
    write_qdq_graph(onnx_path, tmp_path / "qdq.onnx", tiles, batch=4)
    model = onnx.load(str(tmp_path / "qdq.onnx"))
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    q_nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert any(n.op_type == "QuantizeLinear" for n in q_nodes)
    zero_points = [constants[n.input[2]] for n in q_nodes]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8
    biases = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    assert all(constants.get(n.input[2], np.zeros(1, np.float32)).dtype == np.float32 for n in biases)
    error = relative_error(onnx_path, tmp_path / "qdq.onnx", tiles[:8])
    assert 0 < error < 0.05


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"tensorrt": None}, "the tensorrt Python package is not installed"),
        ({"cuda.bindings": None, "cuda.bindings.runtime": None}, "the cuda-python package is not installed"),
        ({"driver_error": gpu_fakes.CudaErr.cudaErrorInsufficientDriver}, "cudaErrorInsufficientDriver"),
        ({"gpus": []}, "the CUDA driver sees no GPU"),
        ({"gpu_id": 3}, "--gpu-id 3 requested, this machine has 1 GPU"),
        ({"version": "8.6.1"}, "TensorRT 8.6.1 found, this build supports TensorRT 10"),
    ],
)
def test_missing_gpu_stack_is_named_in_one_line(monkeypatch, state: dict, message: str) -> None:
    fake_args = {k: state[k] for k in ("gpus", "version", "driver_error") if k in state}
    gpu_fakes.install(monkeypatch, **fake_args)
    for module in ("tensorrt", "cuda.bindings", "cuda.bindings.runtime"):
        if module in state:
            monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(TilecoreError, match=f"^--tensorrt: .*{re.escape(message)}") as caught:
        check_build_stack(TensorRTBuild(gpu_id=state.get("gpu_id", 0)))
    assert "\n" not in str(caught.value)


def test_export_refuses_before_any_work(run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)

    def never(*args: object) -> None:
        raise AssertionError("the ONNX export started although TensorRT is missing")

    monkeypatch.setattr(bundle_module, "export_embedder", never)
    with pytest.raises(TilecoreError, match="--tensorrt: the tensorrt Python package is not installed"):
        export_run(run, tmp_path / "b", tensorrt=TensorRTBuild())
    assert list(tmp_path.iterdir()) == []


def test_export_writes_checked_engines_and_records(run: Path, tmp_path: Path, monkeypatch) -> None:
    trt, _ = gpu_fakes.install(monkeypatch)
    manifest = export_run(run, tmp_path / "b", tensorrt=TensorRTBuild(fp16=True, max_batch=4))
    (record,) = manifest.tensorrt
    (onnx_name,) = manifest.graphs
    assert record.onnx == onnx_name and record.engine == onnx_name[:-5] + ".nvidia-fake-a10-sm86.fp16.engine"
    assert record.tensorrt_version == trt.__version__ and record.compute_capability == "8.6"
    assert record.precision == "fp16" and record.profile.max == (4, 3, 32, 32)
    assert record.engine in manifest.files and onnx_name in manifest.files
    assert read_manifest(tmp_path / "b").tensorrt == manifest.tensorrt  # checksums verified on load
    assert len(trt.builds) == 1


def test_cli_export_tensorrt_fails_fast_with_one_line(run: Path, tmp_path: Path) -> None:
    block = "import sys; sys.modules['tensorrt'] = None\nfrom tilecore.cli import main\nmain()\n"
    for args, expected in (
        (["--tensorrt", "--precision", "int8"], "error: --tensorrt: the tensorrt Python package is not installed"),
        (["--precision", "fp16"], "error: --precision fp16: a TensorRT plan precision; add --tensorrt"),
        (["--workspace-gb", "4", "--gpu-id", "1"], "error: --workspace-gb, --gpu-id: options of the TensorRT"),
    ):
        command = [sys.executable, "-c", block, "export", str(run), "--out", str(tmp_path / "b"), *args]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert list(tmp_path.iterdir()) == []
