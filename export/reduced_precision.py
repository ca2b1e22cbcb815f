"""Reduced-precision engines for CPUs, and what they cost on the validation split.

int8: each backbone graph is quantized after training (static, per-channel weights, activations
calibrated on tiles of the run's training images and of reference photographs: export.quantize) and
written beside the fp32 graph. bf16: no new file, OpenVINO's inference-precision hint at load time;
where the export CPU has no bf16 instructions its cost is measured on OpenVINO's simulation of bf16, or
where OpenVINO gives none, on an emulation (export.bf16_emulation).
Either way only the backbone changes: its embeddings are cast to float32 before FAISS, and kNN,
normalisation and thresholds stay in fp32.

The exporter scores the validation images with fp32 and with each reduced precision through the runtime
itself and records the largest and p99 score difference and the label agreement at the stored image
threshold. A precision whose agreement falls below the floor is refused: the export stops, writes
nothing and says so in one line.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from tilecore.export.bf16_emulation import EMULATED, emulated_bf16_engine
from tilecore.runtime.engines.base import Engine, EngineOptions
from tilecore.runtime.engines.openvino import OpenVinoEngine, cpu_has_bf16
from tilecore.runtime.engines.table import EXPORT_CPU_PRECISIONS
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.manifest import Int8Graph, Manifest, PrecisionCheck, ReducedPrecision, read_manifest
from tilecore.runtime.predictor import Predictor
from tilecore.runtime.tiling import TileGrid
from tilecore.train.run_images import VALIDATION, kept_images

log = logging.getLogger("tilecore")

REDUCED_PRECISIONS = EXPORT_CPU_PRECISIONS  # engines.table: the CPU graphs export can add
CALIBRATION_TILES = 128
VALIDATION_TILES = 64  # tiles of validation images the embedding error (and --int8-max-error) is measured on
DEFAULT_FLOOR = 0.99
SIMULATED = "openvino-simulated"  # OpenVINO's bf16 simulated on a CPU without bf16 instructions
BACKEND_NOTES = {
    SIMULATED: " (OpenVINO's bf16 simulated: this CPU has no bf16 instructions)",
    EMULATED: " (emulated: no bf16 from OpenVINO on this CPU)",
}


def check_backend(precision: str) -> str:
    """Where the exporter measures int8: OpenVINO where it is installed (the fastest path, bf16 in any
    unquantized layer), else ONNX Runtime. bf16: bf16_check_engines."""
    return "openvino" if importlib.util.find_spec("openvino") is not None else "cpu"


def bf16_engines(bundle: Path, backend: str, folder: Path, threads: int = 0) -> dict[str, Engine]:
    """The bundle's graphs as bf16 engines on a CPU without bf16 instructions. SIMULATED: OpenVINO's own
    bf16, simulated (AVX-512; its numerics, not its speed). EMULATED: every tensor rounded to bf16 on ONNX
    Runtime (export.bf16_emulation; the rewritten graphs go to `folder`)."""
    graphs = read_manifest(bundle, verify=False).graphs
    if backend == SIMULATED:
        options = EngineOptions("openvino", threads, precision="bf16", simulated_bf16=True)
        return {name: OpenVinoEngine(bundle / name, options) for name in graphs}
    return {name: emulated_bf16_engine(bundle / name, folder, threads) for name in graphs}


def bf16_check_engines(bundle: Path, folder: Path) -> tuple[str, dict[str, Engine] | None]:
    """(backend, engines) the exporter measures bf16 with; a bundle is often exported on one machine and
    run on another. OpenVINO's bf16 where the CPU has bf16 instructions (engines None: the runtime opens
    them); else OpenVINO's simulation of it; else (no OpenVINO, or no bf16 from it here) the emulation."""
    if cpu_has_bf16():
        return "openvino", None
    try:
        return SIMULATED, bf16_engines(bundle, SIMULATED, folder)
    except TilecoreError as exc:
        log.debug("bf16 check: %s; emulating bf16 instead", exc)
        return EMULATED, bf16_engines(bundle, EMULATED, folder)


def check_precisions(precisions: tuple[str, ...] | list[str], int8_max_error: float | None = None) -> None:
    """Refuse an unknown precision, or an --int8-max-error outside (0, 1) or without int8, before any
    export work starts."""
    for precision in precisions:
        if precision not in REDUCED_PRECISIONS:
            raise TilecoreError(f"--precision {precision!r}: expected one or more of {', '.join(REDUCED_PRECISIONS)}")
    if int8_max_error is not None and (not 0 < int8_max_error < 1 or "int8" not in precisions):
        raise TilecoreError(f"--int8-max-error {int8_max_error}: expected a value in (0, 1) with --precision int8")


def score_difference(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> dict:
    """What a precision changes: |score difference| (max, p99), the share of unchanged labels, how many
    flipped, and how close to the threshold the nearest fp32 score lies (a flip there says little)."""
    diff = np.abs(candidate - reference)
    flipped = (candidate >= threshold) != (reference >= threshold)
    return {
        "images": int(len(reference)),
        "max_score_diff": round(float(diff.max()), 6),
        "p99_score_diff": round(float(np.percentile(diff, 99)), 6),
        "label_agreement": round(float(np.mean(~flipped)), 6),
        "flipped_labels": int(flipped.sum()),
        "nearest_to_threshold": round(float(np.abs(reference - threshold).min()), 6),
    }


def validation_scores(
    bundle: Path, images: list[np.ndarray], device: str, precision: str, engines: dict[str, Engine] | None = None
) -> np.ndarray:
    """The full ensemble's image scores of `images` on `device` (every member: a precision is checked on
    the scores it changes, not on a cascade's exits), or with `engines` already opened."""
    predictor = Predictor(bundle, device=device, precision=precision, engines=engines, cascade=False)
    return np.array([r.score for r in predictor.predict_batch(images)], dtype=np.float64)


def precision_scores(bundle: Path, images: list[np.ndarray], precision: str) -> tuple[str, np.ndarray]:
    """(backend, scores of `images`) for a reduced precision: int8 on check_backend, bf16 on
    bf16_check_engines."""
    if precision != "bf16":
        backend = check_backend(precision)
        return backend, validation_scores(bundle, images, backend, precision)
    with tempfile.TemporaryDirectory() as scratch:  # emulated graphs never enter the bundle
        backend, engines = bf16_check_engines(bundle, Path(scratch))
        device = "openvino" if engines is None else "cpu"  # opened engines: the device only places FAISS
        return backend, validation_scores(bundle, images, device, precision, engines)


def write_int8_graphs(
    folder: Path,
    manifest: Manifest,
    run_dir: Path,
    category: str,
    grid: TileGrid,
    validation: list[str],
    max_error: float | None = None,
) -> dict[str, Int8Graph]:
    """Quantize each distinct backbone graph; {fp32 graph name: its Int8Graph (file, method, and the mean
    relative error of its embeddings of tiles of the `validation` images)}."""
    from tilecore.export.quantize import (
        calibration_set,
        calibration_tiles,
        embedding_error,
        training_images,
        write_int8_graph,
    )

    images = training_images(run_dir, category)
    input_hw = manifest.tiling.backbone_input
    graphs = {}
    for member in manifest.members:
        engine = member.engine
        if engine in graphs:
            continue
        spec = member.preprocess
        tiles = calibration_set(images, spec, grid, input_hw, CALIBRATION_TILES)
        checks = calibration_tiles(validation, spec, grid, input_hw, VALIDATION_TILES)
        name = engine.removesuffix(".onnx") + ".int8.onnx"
        method = write_int8_graph(folder / engine, folder / name, tiles, max_error=max_error, validation_tiles=checks)
        error = embedding_error(folder / engine, folder / name, checks)
        graphs[engine] = Int8Graph(name, method, round(error, 6))
    return graphs


def add_reduced_precisions(
    folder: Path,
    manifest: Manifest,
    run_dir: Path,
    category: str,
    grid: TileGrid,
    precisions: list[str],
    write: Callable[[Manifest], None],
    floor: float = DEFAULT_FLOOR,
    int8_max_error: float | None = None,
) -> ReducedPrecision:
    """Write and check each precision in `folder` (a complete, staged bundle); returns the manifest block.

    `precisions` and `int8_max_error` were checked by check_precisions before the export began.
    `write(manifest)` rewrites the staged manifest (with the new files' checksums), since the runtime that
    checks a precision reads the bundle from disk.
    `int8_max_error` keeps the int8 layers that cost most in float until the embedding error on validation
    tiles is at most that (export.quantize.write_int8_graph).
    """
    validation = kept_images(run_dir, category, VALIDATION)  # the run's own copies: no dataset needed
    if not validation:
        raise TilecoreError(f"--precision: run {run_dir} has no validation images of {category} to check it on")
    images = [read_rgb(p) for p in validation]
    threshold = manifest.thresholds.image
    reference = validation_scores(folder, images, "cpu", "fp32")
    block = ReducedPrecision(floor)
    for precision in precisions:
        if precision == "int8":
            graphs = write_int8_graphs(folder, manifest, run_dir, category, grid, validation, int8_max_error)
            block = replace(block, int8=graphs)
            write(replace(manifest, reduced_precision=block))
        backend, candidate = precision_scores(folder, images, precision)
        check = PrecisionCheck(backend=backend, **score_difference(reference, candidate, threshold))
        log.info(
            "%s%s on %d validation images: max score diff %.4g, p99 %.4g, label agreement %.4f (floor %.2f; "
            "%d flipped; the fp32 score nearest the threshold is %.3g from it)",
            precision, BACKEND_NOTES.get(backend, ""), check.images,
            check.max_score_diff, check.p99_score_diff, check.label_agreement,
            floor, check.flipped_labels, check.nearest_to_threshold,
        )  # fmt: skip
        if check.label_agreement < floor:
            raise TilecoreError(
                f"--precision {precision}: label agreement with fp32 on validation {check.label_agreement:.3f} "
                f"is below the floor {floor}; not written (lower it with --precision-floor)"
            )
        if precision == "int8":
            block = replace(block, int8={name: replace(g, validation=check) for name, g in block.int8.items()})
        else:
            block = replace(block, bf16=check)
    return block
