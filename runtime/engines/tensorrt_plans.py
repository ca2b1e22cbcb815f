"""What ties a TensorRT engine to one machine, and the check the runtime makes before loading it.

A serialized TensorRT plan runs only under the TensorRT version that built it and on the GPU model it
was built for. The exporter writes one EngineRecord (runtime.manifest) per engine into the manifest's
`tensorrt` list; the runtime compares the record with the TensorRT and GPU it finds and, on any
difference, names it in one line and falls back to the ONNX graph. Pure Python: nothing here imports
tensorrt or CUDA, so all of it is tested on machines without a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import TENSORRT_PRECISIONS, EngineRecord, Manifest, Profile

PRECISIONS = TENSORRT_PRECISIONS


@dataclass(frozen=True)
class GpuInfo:
    index: int  # CUDA device id
    name: str  # e.g. "NVIDIA A10" or "Orin"
    compute_capability: str  # "major.minor", e.g. "8.7"

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")


def profile_shapes(input_name: str, input_shape: tuple, max_batch: int, opt_batch: int | None = None) -> Profile:
    """Profile for an ONNX input [batch, C, H, W] whose batch axis is dynamic (-1 or a name), the rest fixed.

    min is one image, max is `max_batch`, opt defaults to max: the runtime fills whole batches except the last.
    """
    if len(input_shape) != 4:
        raise TilecoreError(f"TensorRT profile: input {input_name} has shape {input_shape}, expected [batch, C, H, W]")
    rest = tuple(input_shape[1:])
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise TilecoreError(f"TensorRT profile: input {input_name} {input_shape}: only the batch axis may be dynamic")
    if isinstance(input_shape[0], int) and input_shape[0] > 0:
        raise TilecoreError(f"TensorRT profile: input {input_name} has fixed batch {input_shape[0]}, expected dynamic")
    opt_batch = max_batch if opt_batch is None else opt_batch
    if max_batch < 1 or not 1 <= opt_batch <= max_batch:
        raise TilecoreError(f"--max-batch {max_batch}: expected >= 1 (and 1 <= opt <= max, got opt {opt_batch})")
    return Profile(input_name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))


def gpu_slug(gpu: GpuInfo) -> str:
    """File-name-safe GPU tag: "NVIDIA A10", 8.6 -> "nvidia-a10-sm86"."""
    name = re.sub(r"[^a-z0-9]+", "-", gpu.name.lower()).strip("-") or "gpu"
    return f"{name}-{gpu.sm}"


def engine_file_name(onnx_name: str, gpu: GpuInfo, precision: str = "fp32") -> str:
    """backbone_<hash>.onnx -> backbone_<hash>.<gpu-slug>.engine (fp32) or
    backbone_<hash>.<gpu-slug>.<precision>.engine, so one bundle can hold the fp32 plan beside a reduced one
    (`--recheck` runs both)."""
    stem = onnx_name.removesuffix(".onnx")
    tag = "" if precision == "fp32" else "." + precision.replace("+", "-")
    return f"{stem}.{gpu_slug(gpu)}{tag}.engine"


def qdq_graph_name(onnx_name: str) -> str:
    """backbone_<hash>.onnx -> backbone_<hash>.qdq.onnx: the signed-int8 Q/DQ graph TensorRT builds int8 from
    (export --tensorrt --precision int8 keeps it in the bundle for ONNX Runtime's TensorRT EP)."""
    return onnx_name.removesuffix(".onnx") + ".qdq.onnx"


def check_compatible(record: EngineRecord, tensorrt_version: str, gpu: GpuInfo) -> str | None:
    """None when the engine can load here, else the one-line reason it cannot."""
    built = f"{record.gpu_name} ({record.compute_capability}) with TensorRT {record.tensorrt_version}"
    if record.tensorrt_version != tensorrt_version:
        return f"{record.engine} was built with TensorRT {record.tensorrt_version}, this is TensorRT {tensorrt_version}"
    if record.compute_capability != gpu.compute_capability:
        return f"{record.engine} was built for {built}, this GPU is {gpu.name} ({gpu.compute_capability})"
    if record.gpu_name != gpu.name:
        return f"{record.engine} was built on {record.gpu_name}, this GPU is {gpu.name}; rebuild it on this model"
    return None


def records_for(manifest: Manifest, onnx_name: str) -> list[EngineRecord]:
    """Every engine the bundle holds for one ONNX graph (one per GPU model it was exported on)."""
    return [record for record in manifest.tensorrt if record.onnx == onnx_name]


# `run --precision` -> the engine precisions that serve it, best first. fp32 means an fp32 engine, never a
# reduced one; int8 takes either int8 engine; auto (what the bundle offers) takes the fastest there is.
RUN_TO_ENGINE_PRECISIONS = {
    "fp32": ("fp32",),
    "int8": ("int8+fp16", "int8"),
    "auto": ("int8+fp16", "int8", "fp16", "fp32"),
}


def engine_precisions(run_precision: str) -> tuple[str, ...]:
    """The engine precisions `run --precision run_precision` may load, best first; () when none can."""
    return RUN_TO_ENGINE_PRECISIONS.get(run_precision, ())


def choose_record(
    records: list[EngineRecord], tensorrt_version: str, gpu: GpuInfo, precision: str = "fp32"
) -> tuple[EngineRecord | None, str]:
    """The record for run precision `precision` that loads here (the best precision first, then the first
    GPU that matches), or (None, the one-line reason: no engine of that precision, naming those the bundle
    has, or why the first engine of that precision does not load here)."""
    wanted = engine_precisions(precision)
    ranked = sorted((r for r in records if r.precision in wanted), key=lambda r: wanted.index(r.precision))
    if not ranked:
        have = ", ".join(dict.fromkeys(r.precision for r in records)) or "none"
        onnx = records[0].onnx if records else "this graph"
        return None, (
            f"--precision {precision}: the bundle has no {'/'.join(wanted) or precision} TensorRT engine for {onnx} "
            f"(it has: {have})"
        )
    reasons = []
    for record in ranked:
        reason = check_compatible(record, tensorrt_version, gpu)
        if reason is None:
            return record, ""
        reasons.append(reason)
    return None, reasons[0]
