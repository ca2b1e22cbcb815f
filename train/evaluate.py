"""`tilecore eval`: score a run's test split and write image/pixel metrics per category."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import Progress

from tilecore.runtime.artifacts import atomic_write_json
from tilecore.runtime.cascade import Cascade, CascadeOutputs
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_mask
from tilecore.runtime.merge import ensemble_result
from tilecore.runtime.preprocess import resize_mask
from tilecore.train.cascade_fit import fit_cascade, member_gflops
from tilecore.train.config import Config, image_hw
from tilecore.train.data import Sample, config_categories, load_config_category
from tilecore.train.device import resolve_placement
from tilecore.train.ensemble import CALIBRATION_FILE, CategoryModel, load_category_model
from tilecore.train.executor import Executor, Job
from tilecore.train.fit import read_batches
from tilecore.train.metrics import pixel_truth, summarize
from tilecore.train.run_dir import METRICS_FILE, TEST_SCORES_FILE, load_run_config, update_metadata
from tilecore.train.run_embedders import RunEmbedders, match_knn_threads, worker_embedders

log = logging.getLogger("tilecore")

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def ground_truth(sample: Sample, image_shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray | None:
    """The sample's mask at the working resolution (height, width) `size`, bool; all False for normal images;
    None for an anomalous image without a mask (a `plain` dataset's bad/ image may have none)."""
    if sample.label == 0:
        return np.zeros(size, dtype=bool)
    if sample.mask is None:
        return None
    mask = read_mask(sample.mask)
    if mask.shape != image_shape:
        raise TilecoreError(
            f"mask {sample.mask}: size {mask.shape[1]}x{mask.shape[0]} differs from its image "
            f"{image_shape[1]}x{image_shape[0]}"
        )
    return resize_mask(mask, *size)


@dataclass
class Scored:
    """A test split scored: the readable samples, their fused scores [N] and maps [N, H, W], their masks
    (None for an anomalous image without one) and, with a cascade, what the cascade gave the same images."""

    samples: list[Sample]
    scores: np.ndarray
    maps: np.ndarray
    masks: list[np.ndarray | None]
    cascade: CascadeOutputs | None = None


def score_samples(
    config: Config,
    model: CategoryModel,
    samples: list[Sample],
    skipped: list[str],
    progress: Progress,
    label: str,
    cascade: Cascade | None = None,
) -> Scored:
    """Score the readable samples with the full ensemble and, given `cascade`, with its early exits too
    (from the same member outputs: each member runs once per image)."""
    size = image_hw(config)
    task = progress.add_task(label, total=len(samples))
    kept: list[Sample] = []
    scores, maps, masks, staged = [], [], [], []
    rule = config.merge_rule()
    for batch_samples, images in read_batches(samples, config.train.batch_size, skipped):
        masks.extend(ground_truth(s, im.shape[:2], size) for s, im in zip(batch_samples, images, strict=True))
        raw = model.raw_outputs(images)
        batch_scores, batch_maps = ensemble_result(raw, model.grid, rule, model.calibrations)  # [b], [b, H, W]
        scores.append(batch_scores)
        maps.append(batch_maps)
        if cascade is not None:
            staged.append(model.cascade_from(raw, cascade))
        kept.extend(batch_samples)
        progress.advance(task, len(batch_samples))
    progress.update(task, completed=len(samples))
    if not kept:
        raise TilecoreError(f"{label}: no readable test images")
    joined = None
    if staged:
        joined = CascadeOutputs(
            np.concatenate([c.scores for c in staged]),
            np.concatenate([c.maps for c in staged]),
            np.concatenate([c.exit_stage for c in staged]),
            [sum(c.images_per_stage[s] for c in staged) for s in range(len(cascade.stages))],
        )
    return Scored(kept, np.concatenate(scores), np.concatenate(maps), masks, joined)


def cascade_cost(cascade: Cascade, staged: CascadeOutputs, full_labels: np.ndarray, threshold: float) -> dict:
    """How a cascade did against its full ensemble on the same images: label agreement, exits per stage,
    and the backbone GFLOPs per image it spent (each image pays every stage it reached)."""
    count = len(full_labels)
    spent = sum(stage.gflops * ran for stage, ran in zip(cascade.stages, staged.images_per_stage, strict=True))
    return {
        "label_agreement": float(np.mean((staged.scores >= threshold) == full_labels)),
        "exit_shares": [float(np.mean(staged.exit_stage == s + 1)) for s in range(len(cascade.stages))],
        "gflops_per_image": spent / count,
        "full_gflops_per_image": sum(stage.gflops for stage in cascade.stages),
        "windows": [None if s.window is None else list(s.window) for s in cascade.stages],
        "order": list(cascade.order),
    }


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Precision, recall and F1 of the calibrated image threshold (set without test data)."""
    predicted = scores >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    precision = tp / max(int(predicted.sum()), 1)
    recall = tp / max(int((labels == 1).sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"threshold_precision": precision, "threshold_recall": recall, "threshold_f1": f1}


@dataclass
class CategoryEval:
    """One category evaluated: its metrics.json entry, its test_scores.json rows, its unreadable images."""

    metrics: dict
    per_image: list[dict]
    skipped: list[str]


def eval_task(
    config: Config,
    run_dir: Path,
    category: str,
    gflops: list[float] | None,
    progress: Progress | None = None,
    embedders: RunEmbedders | None = None,
) -> CategoryEval:
    """Score one category's test split and measure it; writes nothing (the driver writes the results)."""
    progress = progress or Progress(disable=True)
    embedders = embedders or worker_embedders(config, run_dir)
    match_knn_threads()
    data = load_config_category(config, category)
    if not data.test:
        raise TilecoreError(f"dataset {config.data.root} category {category}: no test images")
    model = load_category_model(config, run_dir, category, [embedders.get(i) for i in range(len(config.members))])
    skipped: list[str] = []
    started = time.perf_counter()
    calibration = json.loads((run_dir / category / CALIBRATION_FILE).read_text())
    cascade = fit_cascade(config, calibration, where=f"{category}: cascade", gflops=gflops)
    scored = score_samples(config, model, data.test, skipped, progress, f"{category}: eval", cascade)
    kept, scores, maps, masks = scored.samples, scored.scores, scored.maps, scored.masks
    labels = np.array([s.label for s in kept])
    # pixel metrics over the images whose ground truth is known: normals, and anomalous ones with a mask
    known = [i for i, m in enumerate(masks) if m is not None]
    pixel_known = any(labels[i] == 1 for i in known)
    # regions and PRO weights found once, for the full ensemble's maps and the cascade's
    truth = pixel_truth(np.stack([masks[i] for i in known]), f"{category}: pixel metrics") if pixel_known else None
    metrics = summarize(labels, scores, truth, maps[known] if pixel_known else None)  # masks [K, H, W]
    metrics["masked_anomalous_images"] = sum(int(labels[i] == 1) for i in known)
    metrics.update(threshold_metrics(labels, scores, model.thresholds["image"]))
    metrics["test_images"] = len(kept)
    if scored.cascade is not None:
        staged = scored.cascade
        cascade_maps = staged.maps[known] if pixel_known else None
        metrics["cascade"] = {
            **summarize(labels, staged.scores, truth, cascade_maps),
            **cascade_cost(cascade, staged, scores >= model.thresholds["image"], model.thresholds["image"]),
        }
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
    per_image = [
        {
            "image": str(s.image),
            "label": s.label,
            "defect": s.defect,
            "score": float(v),
            "defect_pixels": None if m is None else int(m.sum()),
        }
        for s, v, m in zip(kept, scores, masks, strict=True)
    ]
    if scored.cascade is not None:
        for row, score, stage in zip(per_image, scored.cascade.scores, scored.cascade.exit_stage, strict=True):
            row["cascade_score"], row["exit_stage"] = float(score), int(stage)
    return CategoryEval(metrics, per_image, skipped)


def evaluate_run(run_dir: Path, progress: Progress | None = None, executor: Executor | None = None) -> dict:
    """Evaluate every trained category of `run_dir`; writes and returns metrics.json's content. `executor`
    says where each category is scored (train.executor); this process writes every file."""
    progress = progress or Progress(disable=True)
    executor = executor or Executor()
    config = load_run_config(run_dir)
    categories = config_categories(config)
    untrained = [c for c in categories if not (run_dir / c / CALIBRATION_FILE).is_file()]
    if untrained:
        raise TilecoreError(f"run {run_dir}: categories {untrained} not trained; run `tilecore train` first")
    gflops = member_gflops(config) if len(config.members) > 1 else None  # the cascade's costs, once per run
    # local: each member loaded once, on its first use, for every category; Ray workers load their own
    embedders = RunEmbedders(config, run_dir, resolve_placement("cpu", "off")) if executor.ray is None else None
    results: dict[str, CategoryEval] = {}
    overall = progress.add_task("eval", total=len(categories)) if executor.ray is not None else None

    def done(job: Job, result: CategoryEval) -> list[Job]:
        category = job.args[2]
        atomic_write_json(run_dir / category / TEST_SCORES_FILE, result.per_image)
        results[category] = result
        if overall is not None:
            progress.advance(overall)
        return []

    jobs = [Job(eval_task, (config, run_dir.absolute(), c, gflops), f"{c}: eval") for c in categories]
    executor.execute(jobs, done, {"progress": progress, "embedders": embedders})
    metrics = {c: results[c].metrics for c in categories}
    # a metric no category could compute (no masks anywhere) stays None
    known = {k: [r[k] for r in metrics.values() if r[k] is not None] for k in METRIC_KEYS}
    mean = {k: float(np.mean(values)) if values else None for k, values in known.items()}
    report = {"categories": metrics, "mean": mean}
    atomic_write_json(run_dir / METRICS_FILE, report)
    update_metadata(run_dir, eval_skipped_images={c: results[c].skipped for c in categories})
    return report
