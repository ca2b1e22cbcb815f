"""`tilecore export FINE_RUN --coarse COARSE_RUN`: the spatial cascade's coarse stage (runtime.spatial).

The coarse run is a single-member, single-tile run of the same dataset and image size (e.g. preset SM256
beside an ENS9 run). Its member goes into the bundle as the manifest's `coarse` record: its own Member
(one flat index; its ONNX graph deduplicated with the fine members' like any graph), its one-tile
geometry, the calibration from its calibration.json, and the gate calibrated here.

The gate is set on the fine run's kept validation images and the synthetic defects painted into them
(train.synth.paint_defect, one of each type per image, seeded as train.fit seeds them), never on test
data: both runs' PyTorch embedders score those images once, and runtime.spatial searches the threshold
(calibrate_gate) with the fine run's image threshold, cascade.agreement and cascade.margin.
`spatial_predict` is the PyTorch computation the runtime's coarse stage must equal.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import torch

from tilecore.export.bundle import RunToExport, read_run
from tilecore.export.onnx_graph import export_embedder, weights_hash
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import build_flat_index
from tilecore.runtime.manifest import Coarse, IndexRecord, Member, Tiling
from tilecore.runtime.merge import MemberCalibration
from tilecore.runtime.spatial import (
    GateScores,
    TileGate,
    coarse_tile_maxima,
    coarse_zmaps,
    fit_gate,
    run_spatial,
    tile_selection,
)
from tilecore.train.ensemble import CategoryModel, bank_groups, bank_path, load_bank, load_category_model
from tilecore.train.fit import synthetic_defects
from tilecore.train.model import load_embedder
from tilecore.train.run_dir import load_run_config, run_categories
from tilecore.train.run_images import VALIDATION, kept_images

log = logging.getLogger("tilecore")

COARSE_BANK = "bank_coarse.faiss"


def read_coarse(coarse_dir: Path, fine: RunToExport) -> RunToExport:
    """The coarse run for `fine`'s category, refused in one line unless it fits: one member, one tile, the
    fine run's image size, the category trained; and the fine run must be tiled."""
    where = f"--coarse {coarse_dir}"
    if fine.grid.count == 1:
        raise TilecoreError(f"{where}: run {fine.run_dir} has one tile; a coarse stage gates the tiles of a tiled run")
    config = load_run_config(coarse_dir)
    categories = run_categories(coarse_dir, config)
    if fine.category not in categories:
        raise TilecoreError(f"{where}: no category {fine.category!r} (the run has {categories})")
    if len(config.members) != 1:
        raise TilecoreError(f"{where}: {len(config.members)} members, expected a single-member run (e.g. preset SM256)")
    coarse = read_run(coarse_dir, fine.category)
    if coarse.grid.count != 1:
        grid = f"{coarse.grid.rows} x {coarse.grid.cols}"
        raise TilecoreError(f"{where}: {grid} tiles, expected a single-tile run (e.g. preset SM256)")
    fine_hw, coarse_hw = (fine.grid.image_h, fine.grid.image_w), (coarse.grid.image_h, coarse.grid.image_w)
    if coarse_hw != fine_hw:
        raise TilecoreError(
            f"{where}: image size {coarse_hw[0]}x{coarse_hw[1]}, expected the fine run's {fine_hw[0]}x{fine_hw[1]}"
        )
    return coarse


def load_model(source: RunToExport) -> CategoryModel:
    """A run's calibrated CategoryModel: its PyTorch embedders and banks."""
    embedders = [load_embedder(source.config, source.run_dir, i) for i in range(len(source.config.members))]
    return load_category_model(source.config, source.run_dir, source.category, embedders)


def calibration_images(fine: RunToExport) -> tuple[list[np.ndarray], np.ndarray]:
    """The fine run's kept validation images, then one synthetic defect of each DEFECT_TYPES painted into
    each (seeded per image as train.fit seeds them); and which of them are normal [N]."""
    from tilecore.runtime.image_io import read_rgb

    normals = [read_rgb(path) for path in kept_images(fine.run_dir, fine.category, VALIDATION)]
    painted = []
    for index, image in enumerate(normals):
        painted += synthetic_defects(image, fine.config.train.seed, index, fine.category)
    normal = np.array([True] * len(normals) + [False] * len(painted))
    return normals + painted, normal


def zmaps_of(coarse: CategoryModel, images: list[np.ndarray]) -> np.ndarray:
    """The coarse member's z-maps [B, H, W] of RGB images (its one tile is the whole image)."""
    outputs = coarse.raw_outputs(images)[0]  # [B, 1], [B, 1, H, W]
    return coarse_zmaps(outputs.maps[:, 0], coarse.calibrations[0].image)


def spatial_predict(
    fine: CategoryModel, coarse: CategoryModel, images: list[np.ndarray], tile_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The spatial cascade in PyTorch: (scores [B], maps [B, H, W], tiles_run [B]) as the runtime computes
    them, the fine members' outputs read from a full pass over every tile (runtime.spatial.run_spatial)."""
    raw = fine.raw_outputs(images)
    z_maps = zmaps_of(coarse, images)
    selection = tile_selection(coarse_tile_maxima(z_maps, fine.grid), tile_threshold)

    def fine_outputs(member: int, location: int, positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return raw[member].scores[positions, location], raw[member].maps[positions, location]

    rule = fine.config.merge_rule()
    return run_spatial(len(images), z_maps, fine_outputs, selection, fine.grid, rule, fine.calibrations)


def calibrate_coarse(source: RunToExport, fine: CategoryModel, coarse: CategoryModel) -> TileGate:
    """The gate (runtime.spatial.calibrate_gate) on the fine run's calibration images: tile scores and
    coarse maxima from one PyTorch pass in batches, then the threshold search on scores alone."""
    images, normal = calibration_images(source)
    batch = max(1, source.config.train.batch_size)
    tile_scores: list[list[np.ndarray]] = [[] for _ in fine.embedders]
    maxima = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        for m, outputs in enumerate(fine.raw_outputs(chunk)):
            tile_scores[m].append(outputs.scores)  # [b, T]
        maxima.append(coarse_tile_maxima(zmaps_of(coarse, chunk), fine.grid))  # [b, T]
    scores = [np.concatenate(s) for s in tile_scores]  # [M] x [N, T]
    c = np.concatenate(maxima)  # [N, T]
    rule, threshold = source.config.merge_rule(), float(source.calibration["thresholds"]["image"])
    cascade = source.config.cascade
    gate = fit_gate(c, normal, scores, threshold, fine.grid, rule, fine.calibrations, cascade.agreement,
                    cascade.margin)  # fmt: skip
    return replace(gate, scores=GateScores.of(c, normal, scores))  # kept for tilecore calibrate (refit_gate)


def describe_gate(gate: TileGate) -> str:
    threshold = "none (every tile runs)" if not math.isfinite(gate.tile_threshold) else f"{gate.tile_threshold:.4g}"
    return (
        f"tile threshold {threshold}; {gate.tile_share:.1%} of tiles run, agreement {gate.agreement:.4f} on "
        f"{gate.calibration_images} calibration images (target {gate.target_agreement})"
    )


def write_coarse(fine_source: RunToExport, coarse_source: RunToExport, staging: Path) -> Coarse:
    """The coarse member's graph (unless a fine member's is the same) and flat index in `staging`, the gate
    calibrated, and the manifest's `coarse` record."""
    embedder = load_embedder(coarse_source.config, coarse_source.run_dir, 0)
    engine = f"backbone_{weights_hash(embedder.net, coarse_source.model_input)}.onnx"
    if not (staging / engine).is_file():  # identical backbones (same weights, same input) are exported once
        export_embedder(embedder.net, coarse_source.model_input, staging / engine)
    suffix = bank_groups(coarse_source.grid, coarse_source.stacked)[0][0]
    bank = load_bank(bank_path(coarse_source.run_dir, coarse_source.category, 0, suffix))  # [n, D]
    index = build_flat_index(bank)
    faiss.write_index(index, str(staging / COARSE_BANK))
    with torch.inference_mode():
        probe = embedder.net(torch.zeros(1, 3, *coarse_source.model_input))  # [1, h, w, D]
    config = coarse_source.config.members[0]
    member = Member(
        backbone=config.backbone,
        layers=tuple(config.layers),
        weights_source=coarse_source.metadata.get("weights_sources", {}).get("0", "unknown"),
        preprocess=embedder.preprocess,
        engine=engine,
        feature_grid=tuple(int(n) for n in probe.shape[1:3]),
        embedding_dim=int(probe.shape[3]),
        scoring=config.scoring,
        num_neighbours=config.num_neighbours,
        banks=(COARSE_BANK,),
        index_kind="flat",
        indexes=(IndexRecord(COARSE_BANK, int(index.ntotal), int(index.d)),),
    )
    gate = calibrate_coarse(fine_source, load_model(fine_source), load_model(coarse_source))
    log.info("export: coarse stage %s", describe_gate(gate))
    return Coarse(
        member=member,
        tiling=Tiling.of(coarse_source.grid, coarse_source.model_input, coarse_source.stacked),
        calibration=MemberCalibration.from_dict(coarse_source.calibration["members"][0]),
        blur_sigma=float(coarse_source.config.tiling.blur_sigma),
        gate=gate,
        source_run=str(coarse_source.run_dir.resolve()),
    )
