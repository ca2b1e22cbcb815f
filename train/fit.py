"""`tilecore train`: memory banks per (category, member, tile location), then calibration per category.

Every bank is written atomically as soon as it is finished, so an interrupted run loses at most the bank
in progress; re-running the same command skips finished banks and ends with the same files. Training
memory stays at one tile location's level: the images are re-read for each location, and only that
location's tiles are embedded and kept.

Before the run folder is touched, the data and the coresets are checked (train.data_checks: duplicated
images, a validation split without spread, banks below the row floor), so a refused run writes nothing;
each category also keeps the images export needs (train.run_images) before its first bank.

The banks and calibrations are jobs (train.executor): computed here, or as Ray tasks on a cluster, and
written by this process alone as each result comes back, so both ways leave the same files and resume alike.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from tilecore.runtime.anomaly_map import MAP_RULE
from tilecore.runtime.artifacts import atomic_write_json
from tilecore.runtime.calibration import (
    MIN_CALIBRATION_IMAGES,
    NormalStats,
    calibrate_threshold,
    fuse,
    quantile_threshold,
)
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.merge import MemberCalibration, TileOutputs, member_result, merge_tiles
from tilecore.train.backbones import resolve_out_indices
from tilecore.train.config import Config
from tilecore.train.coreset import greedy_coreset
from tilecore.train.data import CategoryData, Sample, config_categories, load_config_category
from tilecore.train.data_checks import ImageCensus, check_bank_size, check_category_images, check_spread
from tilecore.train.device import Placement, knn_on_device, resolve_placement
from tilecore.train.ensemble import (
    CALIBRATION_FILE,
    CategoryModel,
    bank_groups,
    bank_path,
    load_category_model,
    save_bank,
)
from tilecore.train.executor import Executor, Job, executor_info
from tilecore.train.model import (
    Embedder,
    build_net,
    create_embedder,
    embedder_path,
    grid_for,
    load_embedder,
    save_embedder,
)
from tilecore.train.run_dir import (
    SPLIT_FILE,
    library_versions,
    peak_rss_mb,
    prepare_run_dir,
    read_metadata,
    update_metadata,
)
from tilecore.train.run_embedders import RunEmbedders, match_knn_threads, task_threads, worker_embedders
from tilecore.train.run_images import keep_images
from tilecore.train.synth import DEFECT_TYPES, paint_defect

log = logging.getLogger("tilecore")
SYNTHETIC_SEED_STREAM = 7919  # seeds the synthetic defects apart from every other use of train.seed


def read_batches(
    samples: list[Sample], batch_size: int, skipped: list[str]
) -> Iterator[tuple[list[Sample], list[np.ndarray]]]:
    """Read images batch by batch; unreadable ones are logged, appended to `skipped` and left out."""
    batch: list[tuple[Sample, np.ndarray]] = []
    for sample in samples:
        try:
            batch.append((sample, read_rgb(sample.image, bit_depth=sample.bit_depth)))
        except TilecoreError as exc:
            if str(sample.image) not in skipped:
                log.warning("skipped: %s", exc)
                skipped.append(str(sample.image))
            continue
        if len(batch) == batch_size:
            yield [s for s, _ in batch], [im for _, im in batch]
            batch = []
    if batch:
        yield [s for s, _ in batch], [im for _, im in batch]


def fit_bank(
    config: Config,
    member: int,
    embedder: Embedder,
    samples: list[Sample],
    locations: list[int],
    skipped: list[str],
    progress: Progress,
    label: str,
) -> np.ndarray:
    """Memory bank [n, D]: embeddings of the given tile locations of the samples, coreset-subsampled."""
    task = progress.add_task(f"{label}: features", total=len(samples))
    chunks = []
    for batch_samples, images in read_batches(samples, config.train.batch_size, skipped):
        embeddings = embedder.embed(images, locations)  # [b, T', h, w, D]
        chunks.append(embeddings.reshape(-1, embeddings.shape[-1]))  # [b*T'*h*w, D]
        progress.advance(task, len(batch_samples))
    progress.update(task, completed=len(samples))
    if not chunks:
        raise TilecoreError(f"{label}: no readable training images")
    features = torch.from_numpy(np.concatenate(chunks))  # [N, D]
    del chunks
    task = progress.add_task(f"{label}: coreset", total=1)
    indices = greedy_coreset(
        features,
        config.members[member].coreset_ratio,
        seed=config.train.seed + 1000 * member + locations[0],  # distinct, reproducible per bank
        device=embedder.device,  # NumPy on the CPU, torch on a GPU (train.coreset)
        on_progress=lambda done, total: progress.update(task, completed=done, total=total),
    )
    return np.ascontiguousarray(features.numpy()[np.sort(indices)])


def calibrate(model: CategoryModel, data: CategoryData, skipped: list[str], progress: Progress) -> dict:
    """Normalisation statistics and thresholds from the held-out normal images; nothing from the test split."""
    config = model.config
    task = progress.add_task(f"{data.name}: calibration", total=len(data.validation))
    per_member: list[list[TileOutputs]] = [[] for _ in config.members]
    for batch_samples, images in read_batches(data.validation, config.train.batch_size, skipped):
        for i, outputs in enumerate(model.raw_outputs(images)):
            per_member[i].append(outputs)
        progress.advance(task, len(batch_samples))
    count = sum(len(o.scores) for o in per_member[0])
    if count < MIN_CALIBRATION_IMAGES:
        raise TilecoreError(
            f"category {data.name}: {count} readable validation images, calibration needs {MIN_CALIBRATION_IMAGES}"
        )
    rule = config.merge_rule()
    raw = [
        TileOutputs(np.concatenate([o.scores for o in outs]), np.concatenate([o.maps for o in outs]))
        for outs in per_member
    ]
    calibrations = []
    for outputs in raw:
        per_location = [NormalStats.measure(outputs.scores[:, t], outputs.maps[:, t]) for t in range(model.grid.count)]
        image_scores, image_maps = merge_tiles(outputs, model.grid, rule)
        calibrations.append(MemberCalibration(per_location, NormalStats.measure(image_scores, image_maps)))
    for i, calibration in enumerate(calibrations):  # only the statistics the normalisation divides by
        if rule.normalisation == "tile":
            for t, stats in enumerate(calibration.per_location):
                check_spread(stats, f"category {data.name} member {i} tile location {t}", rule.fusion)
        else:
            check_spread(calibration.image, f"category {data.name} member {i}", rule.fusion)
    results = [member_result(o, model.grid, rule, c) for o, c in zip(raw, calibrations, strict=True)]
    member_scores = np.stack([scores for scores, _ in results])  # [M, N] normalised image scores
    fused_scores = fuse(list(member_scores), rule.fusion)  # [N], as runtime.merge.ensemble_result fuses
    fused_maps = fuse([maps for _, maps in results], rule.fusion)  # [N, H, W]
    labels = np.zeros(count, dtype=bool)  # the validation split holds normal images only
    synthetic = synthetic_members = None
    if config.fusion.threshold in ("auto", "synthetic") or len(config.members) > 1:  # cascades need them too
        synthetic_members = synthetic_member_scores(model, data, calibrations, skipped, progress)  # [M, K]
        synthetic = fuse(list(synthetic_members), rule.fusion) if synthetic_members.shape[1] else None
    if config.fusion.threshold not in ("auto", "synthetic"):
        synthetic = None  # the threshold rule does not use them
    threshold, how = calibrate_threshold(
        labels, fused_scores, config.fusion.threshold, config.fusion.quantile, synthetic
    )
    return {
        "validation_images": count,
        "synthetic_anomalies": 0 if synthetic is None else len(synthetic),
        "members": [c.to_dict() for c in calibrations],
        "thresholds": {
            "image": threshold,
            "image_rule": how,
            "pixel": quantile_threshold(fused_maps.ravel(), config.fusion.pixel_quantile),
            "pixel_rule": f"quantile {config.fusion.pixel_quantile}",
        },
        "validation_fused_scores": fused_scores.tolist(),
        "synthetic_fused_scores": [] if synthetic is None else synthetic.tolist(),
        # each member's normalised image scores: what export calibrates the cascade's windows on
        "validation_member_scores": member_scores.tolist(),
        "synthetic_member_scores": [] if synthetic_members is None else synthetic_members.tolist(),
    }


def synthetic_defects(image: np.ndarray, seed: int, index: int, category: str) -> list[np.ndarray]:
    """One synthetic defect of each DEFECT_TYPES painted into validation image number `index` (seeded by the
    run's seed and the index, so training's calibration and export's cascade gate paint the same ones)."""
    rng = np.random.default_rng([seed, SYNTHETIC_SEED_STREAM, index])
    return [paint_defect(rng, image, kind, category)[0] for kind in DEFECT_TYPES]


def synthetic_member_scores(
    model: CategoryModel,
    data: CategoryData,
    calibrations: list[MemberCalibration],
    skipped: list[str],
    progress: Progress,
) -> np.ndarray:
    """Each member's normalised image scores [M, N * len(DEFECT_TYPES)] of synthetic defects painted into
    the held-out normal validation images (train.synth.paint_defect: one of each defect type per image),
    normalised with the normals' statistics. They stand in for the anomalous validation images a normals-only
    dataset lacks (never test data). A second pass re-reads the images, so memory stays at one batch of maps."""
    config = model.config
    task = progress.add_task(f"{data.name}: synthetic anomalies", total=len(data.validation))
    scores = []  # [M, b] per chunk
    index = 0
    rule = config.merge_rule()
    for batch_samples, images in read_batches(data.validation, config.train.batch_size, skipped):
        painted = []
        for image in images:
            painted += synthetic_defects(image, config.train.seed, index, data.name)
            index += 1
        for start in range(0, len(painted), config.train.batch_size):
            chunk = painted[start : start + config.train.batch_size]
            outputs = zip(model.raw_outputs(chunk), calibrations, strict=True)
            scores.append(np.stack([member_result(o, model.grid, rule, c)[0] for o, c in outputs]))
        progress.advance(task, len(batch_samples))
    if not scores:
        return np.zeros((len(config.members), 0), dtype=np.float32)
    return np.concatenate(scores, axis=1)


def check_before_work(config: Config, datasets: list[CategoryData]) -> None:
    """Everything that can be checked without a model: fail before the first minute of work is spent."""
    for i, member in enumerate(config.members):
        try:
            resolve_out_indices(member.backbone, member.layers)
        except TilecoreError as exc:
            raise TilecoreError(f"member {i}: {exc}") from None
    for data in datasets:
        if len(data.validation) < MIN_CALIBRATION_IMAGES:
            raise TilecoreError(
                f"category {data.name}: {len(data.validation)} validation images, calibration needs "
                f"{MIN_CALIBRATION_IMAGES}; raise data.val_fraction or add normal training images"
            )


def feature_grid(config: Config, member: int) -> tuple[int, int]:
    """(h, w) of member `member`'s patch grid on one tile, from its architecture alone (random weights,
    torch's random state left as it was)."""
    _, model_input, _ = grid_for(config)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        net = build_net(config.members[member], None)
        probe = net(torch.zeros(1, 3, *model_input))  # [1, h, w, D]
    return int(probe.shape[1]), int(probe.shape[2])


def check_bank_sizes(config: Config, indices: list[int], censuses: dict[str, ImageCensus]) -> None:
    """Refuse a coreset ratio that leaves any bank of the members `indices` too few rows (data_checks)."""
    grid, _, stacked = grid_for(config)
    locations = grid.count if stacked else 1  # tile locations per bank
    for i in indices:
        m = config.members[i]
        patches = feature_grid(config, i)
        for name, census in censuses.items():
            try:
                check_bank_size(i, m.coreset_ratio, m.num_neighbours, len(census.readable), locations, patches)
            except TilecoreError as exc:
                raise TilecoreError(f"category {name}: {exc}") from None


def member_embedders(
    config: Config, run_dir: Path, indices: list[int], placement: Placement | None = None
) -> dict[int, Embedder]:
    """Load each member's saved embedder, creating (and saving) it on first use; placed on `placement`'s device."""
    embedders = {}
    sources = {}
    for i in indices:
        if embedder_path(run_dir, i).is_file():
            embedders[i] = load_embedder(config, run_dir, i)
        else:
            embedders[i], sources[i] = create_embedder(config, i)
            save_embedder(embedders[i], run_dir, i)
        if placement is not None:
            embedders[i].place(placement.device, placement.autocast)
    if sources:
        known = read_metadata(run_dir).get("weights_sources", {})
        known.update({str(i): s for i, s in sources.items()})
        update_metadata(run_dir, weights_sources=known, random_init=any(s == "random" for s in known.values()))
    return embedders


@dataclass(frozen=True)
class BankJob:
    """One memory bank to fit: member `member`'s bank `suffix` of `category`, from the given tile locations."""

    category: str
    member: int
    suffix: str
    locations: list[int]
    samples: list[Sample]  # the category's training images

    @property
    def label(self) -> str:
        return f"{self.category} m{self.member} {self.suffix}"


@dataclass
class BankResult:
    bank: np.ndarray  # [n, D] float32
    skipped: list[str]  # unreadable training images
    seconds: float
    peak_rss_mb: float  # of the process that fitted it


def bank_task(
    config: Config,
    run_dir: Path,
    job: BankJob,
    progress: Progress | None = None,
    embedders: RunEmbedders | None = None,
    reported: list[str] | None = None,
) -> BankResult:
    """Fit one bank (embedding + coreset of its tile locations); writes nothing: the driver saves the result.
    Local jobs share `reported` (unreadable images already logged), so each is logged once per run."""
    started = time.perf_counter()
    embedders = embedders or worker_embedders(config, run_dir)
    reported = [] if reported is None else reported
    shown = progress or Progress(disable=True)
    embedder = embedders.get(job.member)
    bank = fit_bank(config, job.member, embedder, job.samples, job.locations, reported, shown, job.label)
    return BankResult(bank, unreadable(job.samples, reported), time.perf_counter() - started, peak_rss_mb())


def unreadable(samples: list[Sample], reported: list[str]) -> list[str]:
    """The samples' images among `reported`, in sample order."""
    names = set(reported)
    return [str(s.image) for s in samples if str(s.image) in names]


@dataclass
class CalibrationResult:
    calibration: dict  # calibration.json's content
    skipped: list[str]  # unreadable validation images
    train_device: dict  # where it ran: the placement and the kNN's device
    peak_rss_mb: float
    seconds: float


def calibration_task(
    config: Config,
    run_dir: Path,
    data: CategoryData,
    progress: Progress | None = None,
    embedders: RunEmbedders | None = None,
    reported: list[str] | None = None,
) -> CalibrationResult:
    """Calibrate one category from its banks in `run_dir` (all written); writes nothing."""
    started = time.perf_counter()
    embedders = embedders or worker_embedders(config, run_dir)
    match_knn_threads()
    everyone = [embedders.get(j) for j in range(len(config.members))]
    model = load_category_model(config, run_dir, data.name, everyone, calibrated=False)
    reported = [] if reported is None else reported
    calibration = calibrate(model, data, reported, progress or Progress(disable=True))
    device = {**embedders.placement.to_dict(), "knn": knn_on_device(model.scorers, embedders.placement)}
    skipped = unreadable(data.validation, reported)
    return CalibrationResult(calibration, skipped, device, peak_rss_mb(), time.perf_counter() - started)


@dataclass
class CategoryWork:
    """What the driver gathers about one category while its jobs come back."""

    data: CategoryData
    banks_left: int
    banks_trained: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def add_skipped(self, names: list[str], show: bool) -> None:
        for name in names:
            if name not in self.skipped:
                if show:  # a Ray worker's own warning stays in its log
                    log.warning("skipped (unreadable on a Ray worker): %s", name)
                self.skipped.append(name)


def prepare_category(
    config: Config, run_dir: Path, data: CategoryData, censuses: tuple[ImageCensus, ImageCensus]
) -> None:
    """Write what a category needs before its first bank: its split, the images export keeps, its fingerprint."""
    grid, _, _ = grid_for(config)
    atomic_write_json(
        run_dir / data.name / SPLIT_FILE,
        {
            "train": [str(s.image) for s in data.train],
            "validation": [str(s.image) for s in data.validation],
            "test": [str(s.image) for s in data.test],
        },
    )
    trained, held_out = censuses
    size = (grid.image_h, grid.image_w)
    keep_images(run_dir, data.name, held_out.readable, trained.readable, size, grid.count, config.data.bit_depth)
    fingerprints = read_metadata(run_dir).get("data_fingerprints", {})  # the bundle identity's (export)
    fingerprints[data.name] = data_fingerprint(trained.readable + held_out.readable, Path(config.data.root))
    update_metadata(run_dir, data_fingerprints=fingerprints)


def train_run(
    config: Config,
    run_dir: Path,
    progress: Progress | None = None,
    member: int | None = None,
    executor: Executor | None = None,
) -> dict:
    """Train every category into `run_dir` (only member `member` when given); returns the run's metadata.

    `executor` says where the banks and calibrations are computed (train.executor: here, or as Ray tasks);
    this process writes every file, as each result arrives, so the files are the same either way."""
    progress = progress or Progress(disable=True)
    executor = executor or Executor()
    if member is not None and not 0 <= member < len(config.members):
        raise TilecoreError(f"--member {member}: expected 0..{len(config.members) - 1}")
    # a missing GPU is refused here; through Ray the workers have the GPUs, and this process only builds models
    local = executor.ray is None
    placement = resolve_placement(config.train.device, config.train.amp) if local else resolve_placement("cpu", "off")
    categories = config_categories(config)
    datasets = [load_config_category(config, c) for c in categories]
    check_before_work(config, datasets)
    censuses = {
        d.name: check_category_images(d.name, [s.image for s in d.train], [s.image for s in d.validation])
        for d in datasets
    }  # name -> (training census, validation census)
    indices = [member] if member is not None else list(range(len(config.members)))
    check_bank_sizes(config, indices, {name: train for name, (train, _) in censuses.items()})
    resuming = prepare_run_dir(run_dir, config)  # everything above writes nothing
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    grid, model_input, stacked = grid_for(config)
    update_metadata(
        run_dir,
        seed=config.train.seed,
        versions=library_versions(),
        map_rule=MAP_RULE,
        resumed=resuming,
        category_names=categories,  # export lists the run's categories from here, not from the dataset
        tiling={
            **grid.to_dict(),
            "backbone_input": list(model_input),
            "stacked": stacked,
            "neighbourhood": config.tiling.neighbourhood,  # banks each location searches (train.ensemble)
        },
        # a bank's bytes depend on its torch thread count (train.run_embedders.task_threads)
        execution={
            **executor_info(executor),
            "torch_threads": torch.get_num_threads() if local else task_threads(config),
        },
    )
    update_metadata(run_dir, train_device=placement.to_dict())  # where the banks of this (last) session came from
    embedders = RunEmbedders(config, run_dir, placement, member_embedders(config, run_dir, indices, placement))
    work: dict[str, CategoryWork] = {}
    jobs: list[Job] = []
    for data in datasets:
        prepare_category(config, run_dir, data, censuses[data.name])
        banks = []
        for i in indices:
            for suffix, locations in bank_groups(grid, stacked):
                if bank_path(run_dir, data.name, i, suffix).is_file():
                    log.info("%s m%d %s: bank already trained, skipping", data.name, i, suffix)
                    continue
                job = BankJob(data.name, i, suffix, locations, data.train)
                banks.append(Job(bank_task, (config, run_dir.absolute(), job), job.label))
        work[data.name] = CategoryWork(data, len(banks))
        jobs += banks or calibration_jobs(config, run_dir, work[data.name])
    overall = None if local else progress.add_task("banks and calibrations", total=len(jobs))  # Ray jobs show no bars

    task_seconds: dict[str, float] = {}  # job label -> seconds its work took, wherever it ran (this session)

    def done(job: Job, result: BankResult | CalibrationResult) -> list[Job]:
        task_seconds[job.label] = round(result.seconds, 3)
        if overall is not None:
            progress.advance(overall)
        if isinstance(result, BankResult):
            bank = job.args[2]
            category = work[bank.category]
            save_bank(bank_path(run_dir, bank.category, bank.member, bank.suffix), result.bank)
            category.add_skipped(result.skipped, not local)
            category.banks_left -= 1
            category.banks_trained += 1
            category.seconds += result.seconds
            category.peak_rss_mb = max(category.peak_rss_mb, result.peak_rss_mb)
            follow = calibration_jobs(config, run_dir, category) if category.banks_left == 0 else []
            if overall is not None:
                progress.update(overall, total=progress.tasks[overall].total + len(follow))
            return follow
        category = work[job.args[2].name]
        category.add_skipped(result.skipped, not local)
        category.peak_rss_mb = max(category.peak_rss_mb, result.peak_rss_mb)
        write_calibration(config, run_dir, category, result)
        return []

    try:
        executor.execute(jobs, done, {"progress": progress, "embedders": embedders, "reported": []})
    finally:  # also for an interrupted session: what its finished jobs cost
        update_metadata(run_dir, task_seconds=task_seconds)
    return read_metadata(run_dir)


def calibration_jobs(config: Config, run_dir: Path, category: CategoryWork) -> list[Job]:
    """The category's calibration, once all its banks are there (and it is missing or new banks came)."""
    name = category.data.name
    if not all(p.is_file() for p in all_bank_paths(run_dir, name, config)):
        log.info("%s: other members' banks missing; calibration waits for them", name)
        return []
    if (run_dir / name / CALIBRATION_FILE).is_file() and category.banks_trained == 0:
        log.info("%s: already calibrated, skipping", name)
        return []
    return [Job(calibration_task, (config, run_dir.absolute(), category.data), f"{name} calibration")]


def write_calibration(config: Config, run_dir: Path, category: CategoryWork, result: CalibrationResult) -> None:
    """The driver's part of a calibration: calibration.json, then the category's record in the metadata."""
    data, calibration = category.data, result.calibration
    grid, _, stacked = grid_for(config)
    atomic_write_json(run_dir / data.name / CALIBRATION_FILE, calibration)
    update_metadata(run_dir, train_device={**read_metadata(run_dir).get("train_device", {}), **result.train_device})
    stats = read_metadata(run_dir).get("categories", {})
    train_skipped = {str(s.image) for s in data.train} & set(category.skipped)
    stats[data.name] = {
        "train_images": len(data.train) - len(train_skipped),
        "validation_images": calibration["validation_images"],
        "banks": grid.count if not stacked else 1,
        "bank_sizes": [bank_rows(p) for p in all_bank_paths(run_dir, data.name, config)],
        "fit_seconds": round(category.seconds, 3),
        "peak_rss_mb": round(max(category.peak_rss_mb, peak_rss_mb()), 1),
        "skipped_images": category.skipped,
        "threshold": calibration["thresholds"]["image"],
        "threshold_rule": calibration["thresholds"]["image_rule"],
    }
    update_metadata(run_dir, categories=stats)


def data_fingerprint(images: list[Path], root: Path) -> dict[str, str | int]:
    """{"sha256", "images"}: sha256 over the sorted names (relative to `root`) and bytes of `images`; each
    image adds its name, a NUL and the sha256 of its file, so no two different sets hash alike."""
    named = sorted((os.path.relpath(path, root) if path.is_absolute() == root.is_absolute() else str(path), path)
                   for path in images)  # fmt: skip
    digest = hashlib.sha256()
    for name, path in named:
        digest.update(name.replace(os.sep, "/").encode("utf-8", "surrogateescape") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return {"sha256": digest.hexdigest(), "images": len(named)}


def all_bank_paths(run_dir: Path, category: str, config: Config) -> list[Path]:
    grid, _, stacked = grid_for(config)
    groups = bank_groups(grid, stacked)
    return [bank_path(run_dir, category, i, suffix) for i in range(len(config.members)) for suffix, _ in groups]


def bank_rows(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return int(f.get_slice("bank").get_shape()[0])
