"""`tilecore export RUN --out BUNDLE`: one category of a trained run -> a bundle the runtime loads.

The bundle is written into a temporary sibling folder and renamed into place only when complete, so an
interrupted export never leaves a folder that loads.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import torch

import tilecore
from tilecore.export.identity import bundle_identity
from tilecore.export.indexes import INDEX_KINDS, build_index, recall_at_1
from tilecore.export.onnx_graph import OPSET, export_embedder, weights_hash
from tilecore.export.reduced_precision import DEFAULT_FLOOR, add_reduced_precisions, check_precisions
from tilecore.export.staging import remove_stale_staging, stage_bundle
from tilecore.export.tensorrt_build import BuildStack, TensorRTBuild, check_build_stack, engine_for_run
from tilecore.runtime.artifacts import sha256_file
from tilecore.runtime.cascade import Cascade
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import build_flat_index
from tilecore.runtime.manifest import (
    NOT_IN_FILES,
    Calibration,
    Coarse,
    EngineRecord,
    Identity,
    IndexRecord,
    Manifest,
    Member,
    Postprocess,
    Thresholds,
    Tiling,
    write_manifest,
)
from tilecore.runtime.merge import MemberCalibration
from tilecore.runtime.preprocess import Preprocess
from tilecore.runtime.signing import load_private_key, sign_bundle
from tilecore.runtime.tiling import TileGrid
from tilecore.train.cascade_fit import describe, fit_cascade
from tilecore.train.config import Config
from tilecore.train.ensemble import CALIBRATION_FILE, search_banks
from tilecore.train.model import Embedder, grid_for, load_embedder
from tilecore.train.run_dir import load_run_config, read_metadata, run_categories
from tilecore.train.run_images import VALIDATION, kept_images

log = logging.getLogger("tilecore")


def validation_queries(
    run_dir: Path, category: str, embedder: Embedder, locations: list[int], limit: int = 4096
) -> np.ndarray:
    """Patch embeddings [m, D] of the held-out validation images at the given tile locations."""
    from tilecore.runtime.image_io import read_rgb

    chunks = []
    for path in kept_images(run_dir, category, VALIDATION):  # the run's own copies: no dataset needed
        embeddings = embedder.embed([read_rgb(path)], locations)  # [1, T', h, w, D]
        chunks.append(embeddings.reshape(-1, embeddings.shape[-1]))
    queries = np.concatenate(chunks)
    rows = np.random.default_rng(0).permutation(len(queries))[:limit]
    return np.ascontiguousarray(queries[np.sort(rows)])


def export_member_banks(
    run_dir: Path, category: str, config: Config, member: int, embedder: Embedder, folder: Path, kind: str = "flat"
) -> tuple[list[str], list[IndexRecord]]:
    """Write a member's FAISS indexes: (file serving each tile location, a record of each file's bank). Each
    index holds the bank its locations search (train.ensemble.search_banks: with tiling.neighbourhood, the
    union of the neighbourhood's banks), so the runtime routes tiles as for any per-location bank."""
    grid, _, _ = grid_for(config)
    per_location: list[str] = [""] * grid.count
    records = []
    for suffix, locations, bank in search_banks(config, run_dir, category, member):
        name = f"bank_m{member}_{suffix}.faiss"
        index = build_index(bank, kind, config.train.seed)
        recall = None
        if kind != "flat":
            queries = validation_queries(run_dir, category, embedder, locations)
            recall = recall_at_1(index, build_flat_index(bank), queries)
        faiss.write_index(index, str(folder / name))
        records.append(IndexRecord(name, int(index.ntotal), int(index.d), recall))
        for location in locations:
            per_location[location] = name
    return per_location, records


def file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file of a staged bundle but the manifest, its digest and signature, by name."""
    names = sorted(p.name for p in folder.iterdir() if p.name not in NOT_IN_FILES and p.is_file())
    return {name: sha256_file(folder / name) for name in names}


def manifest_thresholds(raw: dict) -> Thresholds:
    """The run's calibrated thresholds (calibration.json) as the manifest records them."""
    return Thresholds(raw["image"], raw["pixel"], raw["image_rule"], raw["pixel_rule"])


@dataclass(frozen=True)
class RunToExport:
    """What export reads of one category of a trained run before writing anything."""

    run_dir: Path
    category: str
    config: Config
    calibration: dict  # calibration.json
    metadata: dict  # the run's metadata.json
    grid: TileGrid
    model_input: tuple[int, int]
    stacked: bool


class StageLog:
    """Logs `export: <stage> (i/n)` as each stage starts, so a long export says where it is."""

    def __init__(self, stages: list[str]) -> None:
        self.stages = stages

    def start(self, stage: str, detail: str = "") -> None:
        i = self.stages.index(stage) + 1
        log.info("export: %s%s (%d/%d)", stage, f", {detail}" if detail else "", i, len(self.stages))


def read_run(run_dir: Path, category: str | None) -> RunToExport:
    """The run's config, calibration and metadata for `category` (the only one, when None)."""
    config = load_run_config(run_dir)
    categories = run_categories(run_dir, config)
    if category is None:
        if len(categories) != 1:
            raise TilecoreError(f"run {run_dir}: {len(categories)} categories {categories}; choose one with --category")
        category = categories[0]
    if category not in categories:
        raise TilecoreError(f"--category {category!r}: run {run_dir} has {categories}")
    calibration_path = run_dir / category / CALIBRATION_FILE
    if not calibration_path.is_file():
        raise TilecoreError(f"run {run_dir}: {category} is not trained and calibrated; run `tilecore train` first")
    grid, model_input, stacked = grid_for(config)
    calibration = json.loads(calibration_path.read_text())
    return RunToExport(run_dir, category, config, calibration, read_metadata(run_dir), grid, model_input, stacked)


def write_member(source: RunToExport, i: int, staging: Path, index_kind: str, graphs: dict[str, Preprocess]) -> Member:
    """Member i's ONNX graph (once per distinct backbone, recorded in `graphs`) and FAISS indexes."""
    member = source.config.members[i]
    embedder = load_embedder(source.config, source.run_dir, i)
    engine = f"backbone_{weights_hash(embedder.net, source.model_input)}.onnx"
    if engine not in graphs:  # identical backbones (same weights, same input) are exported once
        export_embedder(embedder.net, source.model_input, staging / engine)
        graphs[engine] = embedder.preprocess
    banks, indexes = export_member_banks(
        source.run_dir, source.category, source.config, i, embedder, staging, index_kind
    )
    with torch.inference_mode():
        probe = embedder.net(torch.zeros(1, 3, *source.model_input))  # [1, h, w, D]
    return Member(
        backbone=member.backbone,
        layers=tuple(member.layers),
        weights_source=source.metadata.get("weights_sources", {}).get(str(i), "unknown"),
        preprocess=embedder.preprocess,
        engine=engine,
        feature_grid=tuple(int(n) for n in probe.shape[1:3]),
        embedding_dim=int(probe.shape[3]),  # write_manifest refuses banks of another dimension
        scoring=member.scoring,
        num_neighbours=member.num_neighbours,
        banks=tuple(banks),
        index_kind=index_kind,
        indexes=tuple(indexes),
    )


def write_tensorrt_plans(
    source: RunToExport, staging: Path, graphs: dict[str, Preprocess], build: TensorRTBuild, stack: BuildStack
) -> list[EngineRecord]:
    """A TensorRT plan built on this GPU for each ONNX graph (export.tensorrt_build), with its record."""
    args = (source.run_dir, source.category)
    return [
        engine_for_run(staging / graph, build, stack, *args, preprocess, source.grid, source.model_input)
        for graph, preprocess in graphs.items()
    ]


def build_manifest(
    source: RunToExport,
    staging: Path,
    members: list[Member],
    trt_records: list[EngineRecord],
    identity: Identity,
    cascade: Cascade | None = None,
    coarse: Coarse | None = None,
) -> Manifest:
    """The bundle's manifest over what is staged so far: the one place its fields are filled in."""
    grid, calibration = source.grid, source.calibration
    return Manifest(
        tilecore_version=tilecore.__version__,
        category=source.category,
        source_run=str(source.run_dir.resolve()),  # informational: where `tilecore bench` finds the PyTorch model
        created_with={**source.metadata.get("versions", {}), "onnx_opset": OPSET, "faiss": faiss.__version__},
        image_size=(grid.image_h, grid.image_w),
        tiling=Tiling.of(grid, source.model_input, source.stacked),
        members=tuple(members),
        postprocess=Postprocess(source.config.merge_rule()),
        calibration=Calibration(
            tuple(MemberCalibration.from_dict(c) for c in calibration["members"]), calibration["validation_images"]
        ),
        thresholds=manifest_thresholds(calibration["thresholds"]),
        files=file_checksums(staging),
        tensorrt=tuple(trt_records),  # engines tied to a GPU + TensorRT version
        identity=identity,  # name, version, created, fingerprints (export.identity)
        cascade=cascade,  # members cheapest first with exit windows (runtime.cascade), or None
        coarse=coarse,  # the spatial cascade's coarse stage (runtime.spatial, export.coarse), or None
    )


def write_reduced_precisions(
    source: RunToExport,
    staging: Path,
    manifest: Manifest,
    precisions: tuple[str, ...],
    precision_floor: float,
    int8_max_error: float | None,
) -> Manifest:
    """Reduced-precision CPU graphs checked against fp32 (export.reduced_precision); the manifest with them."""

    def write(m: Manifest) -> None:  # the staged bundle, as the runtime checking a precision reads it
        write_manifest(staging, replace(m, files=file_checksums(staging)))

    args = (source.run_dir, source.category, source.grid, list(precisions), write, precision_floor, int8_max_error)
    block = add_reduced_precisions(staging, manifest, *args)
    manifest = replace(manifest, reduced_precision=block, files=file_checksums(staging))  # + int8 graphs
    write_manifest(staging, manifest)
    return manifest


def export_run(
    run_dir: Path,
    out: Path,
    category: str | None = None,
    index_kind: str = "flat",
    tensorrt: TensorRTBuild | None = None,
    precisions: tuple[str, ...] = (),
    precision_floor: float = DEFAULT_FLOOR,
    int8_max_error: float | None = None,
    sign_key: Path | None = None,
    name: str | None = None,
    version: str | None = None,
    cascade: str | None = None,
    coarse: Path | None = None,
) -> Manifest:
    """Export one category of `run_dir` to the bundle folder `out`; returns the manifest.

    `coarse`: a single-member, single-tile run of the same data and image size; the bundle then carries
    it as the spatial cascade's coarse stage, which decides which tiles run (export.coarse).

    `cascade` (auto, off; default the run config's cascade.mode): with auto, an ensemble's bundle carries
    an early-exit cascade whose windows are set on the run's validation scores (train.cascade_fit).

    `precisions` (int8, bf16) adds reduced-precision engines for CPUs, each checked against fp32 on the
    validation split (export.reduced_precision); `int8_max_error` trades int8 speed for accuracy.

    With `tensorrt`, each ONNX graph also gets a TensorRT engine built on this GPU (export.tensorrt_build).
    With `sign_key` (an Ed25519 private key), the bundle is signed (runtime.signing) before it appears.
    """
    stages = ["read run", "graphs and indexes"] + ["coarse stage"] * (coarse is not None)
    stages += ["tensorrt plans"] * (tensorrt is not None) + ["manifest"]
    stages += ["reduced precisions"] * bool(precisions) + ["sign"] * (sign_key is not None) + ["commit"]
    progress = StageLog(stages)
    progress.start("read run")
    source = read_run(run_dir, category)
    identity = bundle_identity(source.run_dir, source.category, name, version)  # `name` defaults to the category
    if index_kind not in INDEX_KINDS:
        raise TilecoreError(f"--index {index_kind!r}: expected one of {', '.join(INDEX_KINDS)}")
    if out.exists():
        raise TilecoreError(f"bundle {out}: already exists; choose another --out or delete it")
    check_precisions(precisions, int8_max_error)
    coarse_source = None
    if coarse is not None:
        from tilecore.export.coarse import read_coarse

        if tensorrt is not None:
            raise TilecoreError(f"--coarse {coarse} with --tensorrt: the coarse stage runs ONNX engines only")
        coarse_source = read_coarse(coarse, source)
    cascade_plan = fit_cascade(source.config, source.calibration, cascade, f"export {source.category}: cascade")
    if cascade_plan is not None:
        log.info("cascade: %s", describe(cascade_plan))
    trt_stack = check_build_stack(tensorrt) if tensorrt is not None else None  # fail fast, before the long work
    signer = load_private_key(sign_key) if sign_key is not None else None  # a bad key file fails fast too
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)  # what killed exports of `out` left; never a running export's
    stage = stage_bundle(out)
    staging = stage.folder
    try:
        graphs: dict[str, Preprocess] = {}  # ONNX graph file -> its preprocessing (for TensorRT's calibration)
        members = []
        for i in range(len(source.config.members)):
            progress.start("graphs and indexes", f"member {i + 1} of {len(source.config.members)}")
            members.append(write_member(source, i, staging, index_kind, graphs))
        coarse_record = None
        if coarse_source is not None:
            from tilecore.export.coarse import write_coarse

            progress.start("coarse stage")
            coarse_record = write_coarse(source, coarse_source, staging)
        trt_records = []
        if tensorrt is not None:
            progress.start("tensorrt plans")
            trt_records = write_tensorrt_plans(source, staging, graphs, tensorrt, trt_stack)
        progress.start("manifest")
        manifest = build_manifest(source, staging, members, trt_records, identity, cascade_plan, coarse_record)
        write_manifest(staging, manifest)
        if precisions:
            progress.start("reduced precisions")
            manifest = write_reduced_precisions(source, staging, manifest, precisions, precision_floor, int8_max_error)
        if signer is not None:
            progress.start("sign")
            sign_bundle(staging, signer)  # last: the signature covers the final manifest.json
        progress.start("commit")
        staging.rename(out)  # the bundle appears complete, or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        stage.release()
    return manifest


def bank_arrays(bundle: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """Every index of a bundle read back as its bank (for tests and inspection)."""
    names = {record.file for member in manifest.members for record in member.indexes}
    indexes = {name: faiss.read_index(str(bundle / name)) for name in names}
    return {name: index.reconstruct_n(0, index.ntotal) for name, index in indexes.items()}
