"""`tilecore eval`: score a run's test split and write image/pixel metrics per category."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from rich.progress import Progress

from tilecore.runtime.artifacts import atomic_write_json
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_mask
from tilecore.runtime.preprocess import resize_mask
from tilecore.train.config import Config, image_hw
from tilecore.train.data import Sample, config_categories, load_config_category
from tilecore.train.ensemble import CALIBRATION_FILE, CategoryModel, load_category_model
from tilecore.train.fit import read_batches
from tilecore.train.metrics import summarize
from tilecore.train.model import load_embedder
from tilecore.train.run_dir import METRICS_FILE, load_run_config, update_metadata

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


def score_samples(
    config: Config, model: CategoryModel, samples: list[Sample], skipped: list[str], progress: Progress, label: str
) -> tuple[list[Sample], np.ndarray, np.ndarray, np.ndarray]:
    """(kept samples, image scores [N], anomaly maps [N, H, W], N masks [H, W] or None) for readable samples."""
    size = image_hw(config)
    task = progress.add_task(label, total=len(samples))
    kept: list[Sample] = []
    scores, maps, masks = [], [], []
    for batch_samples, images in read_batches(samples, config.train.batch_size, skipped):
        masks.extend(ground_truth(s, im.shape[:2], size) for s, im in zip(batch_samples, images, strict=True))
        batch_scores, batch_maps = model.predict(images)  # [b], [b, H, W]
        scores.append(batch_scores)
        maps.append(batch_maps)
        kept.extend(batch_samples)
        progress.advance(task, len(batch_samples))
    progress.update(task, completed=len(samples))
    if not kept:
        raise TilecoreError(f"{label}: no readable test images")
    return kept, np.concatenate(scores), np.concatenate(maps), masks


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Precision, recall and F1 of the calibrated image threshold (set without test data)."""
    predicted = scores >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    precision = tp / max(int(predicted.sum()), 1)
    recall = tp / max(int((labels == 1).sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"threshold_precision": precision, "threshold_recall": recall, "threshold_f1": f1}


def evaluate_run(run_dir: Path, progress: Progress | None = None) -> dict:
    """Evaluate every trained category of `run_dir`; writes and returns metrics.json's content."""
    progress = progress or Progress(disable=True)
    config = load_run_config(run_dir)
    categories = config_categories(config)
    untrained = [c for c in categories if not (run_dir / c / CALIBRATION_FILE).is_file()]
    if untrained:
        raise TilecoreError(f"run {run_dir}: categories {untrained} not trained; run `tilecore train` first")
    embedders = [load_embedder(config, run_dir, i) for i in range(len(config.members))]
    results: dict[str, dict] = {}
    skipped_all: dict[str, list[str]] = {}
    for category in categories:
        data = load_config_category(config, category)
        if not data.test:
            raise TilecoreError(f"dataset {config.data.root} category {category}: no test images")
        model = load_category_model(config, run_dir, category, embedders)
        skipped: list[str] = []
        started = time.perf_counter()
        kept, scores, maps, masks = score_samples(config, model, data.test, skipped, progress, f"{category}: eval")
        labels = np.array([s.label for s in kept])
        # pixel metrics over the images whose ground truth is known: normals, and anomalous ones with a mask
        known = [i for i, m in enumerate(masks) if m is not None]
        pixel_known = any(labels[i] == 1 for i in known)
        known_masks = np.stack([masks[i] for i in known]) if pixel_known else None  # [K, H, W]
        metrics = summarize(labels, scores, known_masks, maps[known] if pixel_known else None)
        metrics["masked_anomalous_images"] = sum(int(labels[i] == 1) for i in known)
        metrics.update(threshold_metrics(labels, scores, model.thresholds["image"]))
        metrics["test_images"] = len(kept)
        metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
        results[category] = metrics
        skipped_all[category] = skipped
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
        atomic_write_json(run_dir / category / "test_scores.json", per_image)
    # a metric no category could compute (no masks anywhere) stays None
    known = {k: [r[k] for r in results.values() if r[k] is not None] for k in METRIC_KEYS}
    mean = {k: float(np.mean(values)) if values else None for k, values in known.items()}
    report = {"categories": results, "mean": mean}
    atomic_write_json(run_dir / METRICS_FILE, report)
    update_metadata(run_dir, eval_skipped_images=skipped_all)
    return report
