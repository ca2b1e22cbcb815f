"""`tilecore export --tensorrt`: one serialized TensorRT 10 engine per ONNX backbone, built on this GPU.

The builder parses the bundle's ONNX graph, adds one optimization profile over the batch axis (min 1,
opt = max = --max-batch tiles; the rest of the shape comes from the graph), sets the workspace limit and
the precision, and writes `backbone_<hash>.<gpu-slug>.engine` next to the graph. Its EngineRecord
(TensorRT version, GPU name and compute capability, precision, profile) goes into the manifest.

Precision -> network and flags. Strongly typed networks are preferred wherever the graph's own types say
what to compute in: the precision flags (FP16, INT8) are deprecated since TensorRT 10.12 and removed in 11,
and a strongly typed network refuses them. Where the installed TensorRT has no STRONGLY_TYPED flag the
weakly typed form is used instead.
- fp32: strongly typed fp32 graph, TF32 cleared, so fp32 really computes in fp32 (parity with ONNX Runtime).
- fp16: weakly typed network with BuilderFlag.FP16: the graph is fp32, so only the flag can let TensorRT
  pick fp16 kernels (a strongly typed fp16 build would need an fp16 graph; hence the pin below 11).
- int8: a strongly typed network from a Q/DQ graph; no precision flags (TensorRT's documented way for
  explicit quantization); layers outside the Q/DQ pairs stay fp32. (Weakly typed, a Q/DQ graph needs
  the INT8 flag.)
- int8+fp16: the Q/DQ graph in a weakly typed network with the INT8 and FP16 flags, so the layers
  outside the Q/DQ pairs may run in fp16.
The Q/DQ graph is kept in the bundle as backbone_<hash>.qdq.onnx: ONNX Runtime's TensorRT EP builds its
int8 engines from it (`run --device tensorrt --precision int8`).

INT8 uses explicit quantization (a Q/DQ graph), not IInt8EntropyCalibrator2, because:
- TensorRT deprecated the calibrator classes in 10.1 and removed them, with the INT8 flag, in 11: a
  Q/DQ graph is the form TensorRT keeps building from;
- the scales are computed on the CPU by ONNX Runtime's static quantizer (entropy calibration, the same
  criterion as IInt8EntropyCalibrator2; symmetric int8 as TensorRT requires, per-channel weights,
  biases kept in float), so the quantized graph is made and checked without a GPU: ONNX Runtime runs
  it, and its embedding error against the fp32 graph is written into the engine's record;
- no calibrator class with its own device buffers and calibration cache to maintain.
Calibration tiles and the Q/DQ graph come from export.quantize (shared with the CPU int8 engines).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from tilecore.export.quantize import calibration_set, relative_error, training_images, write_qdq_graph
from tilecore.runtime.engines.base import EngineOptions
from tilecore.runtime.engines.gpu_stack import CudaBinding, import_tensorrt, open_cuda
from tilecore.runtime.engines.tensorrt_plans import (
    EngineRecord,
    GpuInfo,
    Profile,
    engine_file_name,
    profile_shapes,
    qdq_graph_name,
)
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import QdqCalibration
from tilecore.runtime.preprocess import Preprocess
from tilecore.runtime.tiling import TileGrid

WHO = "--tensorrt"


@dataclass(frozen=True)
class TensorRTBuild:
    """What `tilecore export --tensorrt [--precision fp16,int8] [--workspace-gb N] [--max-batch N]` asks for."""

    fp16: bool = False
    int8: bool = False
    workspace_gb: float = 2.0
    max_batch: int = EngineOptions.max_batch  # the runtime's default batch: opt = max = what run() sends
    gpu_id: int = 0
    calibration_tiles: int = 128  # INT8 only: tiles of training images the quantizer calibrates on

    def __post_init__(self) -> None:
        if not self.workspace_gb > 0:
            raise TilecoreError(f"--workspace-gb {self.workspace_gb}: expected > 0")
        if self.max_batch < 1:
            raise TilecoreError(f"--max-batch {self.max_batch}: expected >= 1")
        if self.calibration_tiles < 1:
            raise TilecoreError(f"calibration tiles {self.calibration_tiles}: expected >= 1")

    @property
    def precision(self) -> str:
        return {(False, False): "fp32", (True, False): "fp16", (False, True): "int8", (True, True): "int8+fp16"}[
            (self.fp16, self.int8)
        ]


@dataclass(frozen=True)
class BuildStack:
    trt: ModuleType
    cuda: CudaBinding  # its device is made current around each build (the builder times kernels on it)

    @property
    def gpu(self) -> GpuInfo:
        return self.cuda.gpu


def check_build_stack(build: TensorRTBuild) -> BuildStack:
    """tensorrt, cuda-python, the GPU (and for INT8 the quantizer), or one line naming what is missing.

    Called before any export work, so a machine without the GPU stack fails in a second, not after
    writing the ONNX graphs and indexes.
    """
    trt = import_tensorrt(WHO)
    cuda = open_cuda(build.gpu_id, WHO)
    if build.int8:
        try:
            import onnx  # noqa: F401
            from onnxruntime.quantization import quantize_static  # noqa: F401
        except ImportError as exc:
            raise TilecoreError(f"--precision int8: the quantizer needs {exc.name} (the export extra)") from None
    return BuildStack(trt, cuda)


STRONGLY_TYPED_PRECISIONS = ("fp32", "int8")  # the graph's own types say it all (module docstring)


def strongly_typed(trt: ModuleType, precision: str) -> bool:
    """Whether `precision` builds a strongly typed network with this TensorRT."""
    return precision in STRONGLY_TYPED_PRECISIONS and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")


def network_flags(trt: ModuleType, precision: str) -> int:
    """create_network flags: strongly typed where strongly_typed() says so, else none."""
    if strongly_typed(trt, precision):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # TensorRT 10 networks are always explicit-batch


def builder_flags(trt: ModuleType, precision: str) -> list[str]:
    """BuilderFlag names to set for a precision: none for a strongly typed network (it refuses them)."""
    if strongly_typed(trt, precision):
        return []
    return {"fp32": [], "fp16": ["FP16"], "int8": ["INT8"], "int8+fp16": ["INT8", "FP16"]}[precision]


def build_plan(
    trt: ModuleType, onnx_path: Path, precision: str, max_batch: int, workspace_gb: float
) -> tuple[bytes, Profile, str]:
    """ONNX graph -> (serialized engine, its batch profile, output tensor name)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, precision))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TilecoreError(f"{WHO}: TensorRT cannot parse {onnx_path.name} ({errors[0] if errors else 'no detail'})")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise TilecoreError(f"{WHO}: {onnx_path.name} has {network.num_inputs} inputs, expected one image batch")
    tensor = network.get_input(0)
    profile = profile_shapes(tensor.name, tuple(tensor.shape), max_batch)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(profile.input_name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(trt_profile)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    for flag in builder_flags(trt, precision):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TilecoreError(f"{WHO}: TensorRT could not build an engine for {onnx_path.name} (see its log above)")
    return bytes(plan), profile, network.get_output(0).name


def build_engine(onnx_path: Path, build: TensorRTBuild, stack: BuildStack, tiles: np.ndarray | None) -> EngineRecord:
    """Write the engine for `onnx_path` beside it; `tiles` (INT8 only) are the calibration inputs."""
    calibration = None
    source = onnx_path
    if build.int8:
        if tiles is None or not len(tiles):
            raise TilecoreError("--tensorrt --precision int8: no calibration tiles")
        source = onnx_path.parent / qdq_graph_name(onnx_path.name)  # kept: the TensorRT EP's int8 graph
        with tempfile.TemporaryDirectory(prefix="tilecore-qdq-") as tmp:
            write_qdq_graph(onnx_path, Path(tmp) / source.name, tiles, build.max_batch)
            Path(tmp, source.name).replace(source)  # the staging folder: whole or absent
        probe = tiles[: build.max_batch]
        calibration = QdqCalibration(
            method="onnxruntime static quantization, entropy, symmetric int8, per-channel weights",
            tiles=int(len(tiles)),
            qdq_relative_error=round(relative_error(onnx_path, source, probe), 6),
        )
    with stack.cuda.current():  # this thread builds on the chosen GPU
        plan, profile, output_name = build_plan(stack.trt, source, build.precision, build.max_batch, build.workspace_gb)
    name = engine_file_name(onnx_path.name, stack.gpu, build.precision)
    (onnx_path.parent / name).write_bytes(plan)  # the bundle's staging folder: renamed into place at the end
    return EngineRecord(
        onnx=onnx_path.name,
        engine=name,
        tensorrt_version=stack.trt.__version__,
        gpu_name=stack.gpu.name,
        compute_capability=stack.gpu.compute_capability,
        precision=build.precision,
        profile=profile,
        output_name=output_name,
        workspace_gb=build.workspace_gb,
        int8_calibration=calibration,
    )


def engine_for_run(
    onnx_path: Path,
    build: TensorRTBuild,
    stack: BuildStack,
    run_dir: Path,
    category: str,
    preprocess: Preprocess,
    grid: TileGrid,
    input_hw: tuple[int, int],
) -> EngineRecord:
    """build_engine with calibration tiles (training images + reference photographs) when INT8 is asked for."""
    tiles = None
    if build.int8:
        images = training_images(run_dir, category)
        tiles = calibration_set(images, preprocess, grid, input_hw, build.calibration_tiles)
    return build_engine(onnx_path, build, stack, tiles)
