"""The one table of backends and precisions: `--device` and `--precision` choices, help text and validation
for `run`, `bench` and `export`, the bench's device list and `auto`'s order all come from here.

Pure data and checks: this module imports no backend, so every backend may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tilecore.runtime.errors import TilecoreError


@dataclass(frozen=True)
class Backend:
    name: str  # the --device name
    what: str  # one line for help text and docs
    precisions: tuple[str, ...]  # what `run --precision` may ask of it
    extra: str  # the pip extra that brings it ("" : the base install)
    auto_rank: int | None  # position in `--device auto`'s order; None: never picked by auto


@dataclass(frozen=True)
class Precision:
    name: str
    what: str
    run: bool  # `run --precision` accepts it
    export_cpu: bool  # `export --precision` writes a reduced-precision CPU graph for it
    export_tensorrt: bool  # `export --tensorrt --precision` builds a TensorRT plan in it


PRECISION_TABLE = (
    Precision("fp32", "32-bit float, the reference", run=True, export_cpu=False, export_tensorrt=True),
    Precision("fp16", "16-bit float (TensorRT plans)", run=False, export_cpu=False, export_tensorrt=True),
    Precision("bf16", "bfloat16 (OpenVINO on CPUs with bf16)", run=True, export_cpu=True, export_tensorrt=False),
    Precision("int8", "8-bit quantized graph or TensorRT plan", run=True, export_cpu=True, export_tensorrt=True),
    Precision("auto", "what the backend and bundle offer", run=True, export_cpu=False, export_tensorrt=False),
)

BACKEND_TABLE = (
    Backend("cpu", "ONNX Runtime on the CPU", ("fp32", "int8"), "", auto_rank=4),
    Backend("cuda", "ONNX Runtime's CUDA provider", ("fp32", "int8"), "gpu", auto_rank=2),
    Backend("tensorrt", "ONNX Runtime's TensorRT provider (plans cached per graph)", ("fp32", "int8"), "gpu", 1),
    # tensorrt-native runs the bundle's plan of that precision; auto: the fastest plan the bundle has (fp16 too)
    Backend("tensorrt-native", "a TensorRT plan from the bundle (export --tensorrt)", ("fp32", "int8", "auto"),
            "tensorrt", 0),  # fmt: skip
    Backend("openvino", "OpenVINO on Intel CPUs", ("fp32", "bf16", "int8", "auto"), "openvino", auto_rank=3),
)

BACKENDS = {backend.name: backend for backend in BACKEND_TABLE}
DEVICES = ("auto", *BACKENDS)
AUTO_ORDER = tuple(b.name for b in sorted(BACKEND_TABLE, key=lambda b: b.auto_rank) if b.auto_rank is not None)
PRECISIONS = tuple(p.name for p in PRECISION_TABLE)
RUN_PRECISIONS = tuple(p.name for p in PRECISION_TABLE if p.run)
EXPORT_CPU_PRECISIONS = tuple(p.name for p in PRECISION_TABLE if p.export_cpu)
EXPORT_TENSORRT_PRECISIONS = tuple(p.name for p in PRECISION_TABLE if p.export_tensorrt)


def device_help() -> str:
    return "Where to score: " + ", ".join(DEVICES) + f" (auto tries {' > '.join(AUTO_ORDER)})."


def precision_help() -> str:
    return (
        "Backbone precision: "
        + ", ".join(RUN_PRECISIONS)
        + " ("
        + "; ".join(f"{b.name}: {'/'.join(b.precisions)}" for b in BACKEND_TABLE)
        + ")."
    )


def check_device(device: str, option: str = "--device") -> str:
    if device not in DEVICES:
        raise TilecoreError(f"{option} {device!r}: expected one of {', '.join(DEVICES)}")
    return device


def check_run_precision(precision: str, option: str = "--precision") -> str:
    if precision not in RUN_PRECISIONS:
        raise TilecoreError(f"{option} {precision!r}: expected one of {', '.join(RUN_PRECISIONS)}")
    return precision


def export_precision_help() -> str:
    cpu, trt = ", ".join(EXPORT_CPU_PRECISIONS), ", ".join(p for p in EXPORT_TENSORRT_PRECISIONS if p != "fp32")
    return (
        f"Precisions besides fp32, comma-separated: CPU graphs {cpu}; with --tensorrt, {trt} go to the TensorRT plan."
    )


def split_export_precisions(names: tuple[str, ...], tensorrt: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`export --precision` names -> (reduced-precision CPU graphs, TensorRT plan precisions besides fp32).
    With --tensorrt a name the TensorRT build takes (fp16, int8) goes to the plan; bf16 is always a CPU graph."""
    allowed = EXPORT_CPU_PRECISIONS + (EXPORT_TENSORRT_PRECISIONS if tensorrt else ())
    for name in names:
        if name in EXPORT_TENSORRT_PRECISIONS and name not in allowed:
            raise TilecoreError(f"--precision {name}: a TensorRT plan precision; add --tensorrt")
        if name not in allowed:
            raise TilecoreError(f"--precision {name!r}: expected one or more of {', '.join(dict.fromkeys(allowed))}")
    plan = tuple(n for n in names if tensorrt and n in EXPORT_TENSORRT_PRECISIONS and n != "fp32")
    return tuple(n for n in names if n in EXPORT_CPU_PRECISIONS and n not in plan), plan


BENCH_ONLY = {"pytorch": ("fp32",)}  # `bench --device pytorch`: the eager model of the bundle's source run
BENCH_PRECISIONS = {**{b.name: b.precisions for b in BACKEND_TABLE}, **BENCH_ONLY}  # what each can compute in


def bench_device_help() -> str:
    return "Backends, comma-separated: " + ", ".join(BENCH_PRECISIONS) + "."


def bench_precision_help() -> str:
    return "Precisions, comma-separated: " + ", ".join(RUN_PRECISIONS) + " (each where the backend offers it)."
