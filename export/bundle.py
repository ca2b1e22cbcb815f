"""`tilecore export RUN --out BUNDLE`: one category of a trained run -> a bundle the runtime loads.

The bundle is written into a temporary sibling folder and renamed into place only when complete, so an
interrupted export never leaves a folder that loads.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import torch

import tilecore
from tilecore.export.indexes import INDEX_KINDS, build_index, recall_at_1
from tilecore.export.onnx_graph import OPSET, export_embedder, weights_hash
from tilecore.export.reduced_precision import DEFAULT_FLOOR, add_reduced_precisions, check_precisions
from tilecore.export.staging import remove_stale_staging, stage_bundle
from tilecore.export.tensorrt_build import TensorRTBuild, check_build_stack, engine_for_run
from tilecore.runtime.artifacts import sha256_file
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.knn import build_flat_index
from tilecore.runtime.manifest import (
    NOT_IN_FILES,
    Calibration,
    IndexRecord,
    Manifest,
    Member,
    Postprocess,
    Thresholds,
    Tiling,
    write_manifest,
)
from tilecore.runtime.merge import MemberCalibration
from tilecore.runtime.signing import load_private_key, sign_bundle
from tilecore.train.config import Config
from tilecore.train.ensemble import CALIBRATION_FILE, bank_groups, bank_path, load_bank
from tilecore.train.model import Embedder, grid_for, load_embedder
from tilecore.train.run_dir import load_run_config, read_metadata, run_categories
from tilecore.train.run_images import VALIDATION, kept_images


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
    """Write a member's FAISS indexes: (file serving each tile location, a record of each file's bank)."""
    grid, _, stacked = grid_for(config)
    per_location: list[str] = [""] * grid.count
    records = []
    for suffix, locations in bank_groups(grid, stacked):
        bank = load_bank(bank_path(run_dir, category, member, suffix))  # [n, D]
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
) -> Manifest:
    """Export one category of `run_dir` to the bundle folder `out`; returns the manifest.

    `precisions` (int8, bf16) adds reduced-precision engines for CPUs, each checked against fp32 on the
    validation split (export.reduced_precision); `int8_max_error` trades int8 speed for accuracy.

    With `tensorrt`, each ONNX graph also gets a TensorRT engine built on this GPU (export.tensorrt_build).
    With `sign_key` (an Ed25519 private key), the bundle is signed (runtime.signing) before it appears.
    """
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
    if index_kind not in INDEX_KINDS:
        raise TilecoreError(f"--index {index_kind!r}: expected one of {', '.join(INDEX_KINDS)}")
    if out.exists():
        raise TilecoreError(f"bundle {out}: already exists; choose another --out or delete it")
    check_precisions(precisions, int8_max_error)
    trt_stack = check_build_stack(tensorrt) if tensorrt is not None else None  # fail fast, before the long work
    signer = load_private_key(sign_key) if sign_key is not None else None  # a bad key file fails fast too
    trt_records = []
    calibration = json.loads(calibration_path.read_text())
    metadata = read_metadata(run_dir)
    grid, model_input, stacked = grid_for(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)  # what killed exports of `out` left; never a running export's
    stage = stage_bundle(out)
    staging = stage.folder
    try:
        members, engines = [], {}
        for i, member in enumerate(config.members):
            embedder = load_embedder(config, run_dir, i)
            engine = f"backbone_{weights_hash(embedder.net, model_input)}.onnx"
            if engine not in engines:  # identical backbones (same weights, same input) are exported once
                export_embedder(embedder.net, model_input, staging / engine)
                engines[engine] = i
                if trt_stack is not None:
                    args = (run_dir, category, embedder.preprocess, grid, model_input)
                    trt_records.append(engine_for_run(staging / engine, tensorrt, trt_stack, *args))
            banks, indexes = export_member_banks(run_dir, category, config, i, embedder, staging, index_kind)
            with torch.inference_mode():
                probe = embedder.net(torch.zeros(1, 3, *model_input))  # [1, h, w, D]
            members.append(
                Member(
                    backbone=member.backbone,
                    layers=tuple(member.layers),
                    weights_source=metadata.get("weights_sources", {}).get(str(i), "unknown"),
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
            )
        manifest = Manifest(
            tilecore_version=tilecore.__version__,
            category=category,
            source_run=str(run_dir.resolve()),  # informational: where `tilecore bench` finds the PyTorch model
            created_with={**metadata.get("versions", {}), "onnx_opset": OPSET, "faiss": faiss.__version__},
            image_size=(config.data.image_size, config.data.image_size),
            tiling=Tiling.of(grid, model_input, stacked),
            members=tuple(members),
            postprocess=Postprocess(config.merge_rule()),
            calibration=Calibration(
                tuple(MemberCalibration.from_dict(c) for c in calibration["members"]), calibration["validation_images"]
            ),
            thresholds=manifest_thresholds(calibration["thresholds"]),
            files=file_checksums(staging),
            tensorrt=tuple(trt_records),  # engines tied to a GPU + TensorRT version
        )
        write_manifest(staging, manifest)
        if precisions:

            def write(m: Manifest) -> None:  # the staged bundle, as the runtime checking a precision reads it
                write_manifest(staging, replace(m, files=file_checksums(staging)))

            block = add_reduced_precisions(
                staging, manifest, run_dir, category, grid, list(precisions), write, precision_floor, int8_max_error
            )
            manifest = replace(manifest, reduced_precision=block, files=file_checksums(staging))  # + int8 graphs
            write_manifest(staging, manifest)
        if signer is not None:
            sign_bundle(staging, signer)  # last: the signature covers the final manifest.json
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
