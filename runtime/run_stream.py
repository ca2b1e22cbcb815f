"""`tilecore run BUNDLE INPUT --out DIR`: stream images through a Predictor and write what it finds.

Writes one JSON line per input to results.jsonl as soon as its batch is scored (nothing is lost if the
process stops), optional overlays and masks as PNG, and summary.json at the end. A bad input gets an
error line and the stream goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

from tilecore.runtime.artifacts import atomic_write_json
from tilecore.runtime.image_io import write_png
from tilecore.runtime.predictor import Predictor, Result
from tilecore.runtime.sources import Item, stream, validate_image


def overlay(image: np.ndarray, result: Result, pixel_threshold: float) -> np.ndarray:
    """RGB image with the anomaly map as a heat map (red = at or above twice the pixel threshold)."""
    h, w = image.shape[:2]
    anomaly_map = cv2.resize(result.anomaly_map, (w, h), interpolation=cv2.INTER_LINEAR)
    scale = np.clip(anomaly_map / max(2.0 * pixel_threshold, 1e-6), 0.0, 1.0)
    heat = cv2.applyColorMap((scale * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]  # BGR -> RGB
    return cv2.addWeighted(image, 0.6, heat, 0.4, 0.0)


def full_size_mask(result: Result, hw: tuple[int, int]) -> np.ndarray:
    mask = cv2.resize(result.mask.astype(np.uint8), (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    return (mask * 255).astype(np.uint8)


def batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip("/"))[-150:]


def run_stream(
    predictor: Predictor,
    spec: str,
    out: Path,
    batch_size: int = 4,
    overlays: bool = False,
    masks: bool = False,
    on_item: Callable[[dict], None] | None = None,
) -> dict:
    """Score every input of `spec`; returns the summary also written to out/summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    tile_hw = (predictor.grid.tile_h, predictor.grid.tile_w)
    counts = {"images": 0, "anomalous": 0, "failed": 0}
    started = time.perf_counter()
    with open(out / "results.jsonl", "w") as results:
        for batch in batches(stream(spec), batch_size):
            records: dict[int, dict] = {}
            usable = []
            for position, item in enumerate(batch):
                reason = item.error or validate_image(item.image, tile_hw)
                if reason:
                    records[position] = {"input": item.name, "error": reason}
                    counts["failed"] += 1
                else:
                    usable.append((position, item))
            if usable:
                batch_started = time.perf_counter()
                outcomes = predictor.predict_batch([item.image for _, item in usable])
                batch_ms = 1000 * (time.perf_counter() - batch_started) / len(usable)
                for (position, item), result in zip(usable, outcomes, strict=True):
                    stem = safe_name(item.name)
                    if overlays:
                        heat = overlay(item.image, result, predictor.thresholds["pixel"])
                        write_png(out / "overlays" / f"{stem}.png", heat)
                    if masks:
                        write_png(out / "masks" / f"{stem}.png", full_size_mask(result, item.image.shape[:2]))
                    counts["images"] += 1
                    counts["anomalous"] += int(result.label)
                    records[position] = {
                        "input": item.name,
                        "score": round(result.score, 6),
                        "label": "anomalous" if result.label else "normal",
                        "timings_ms": {**result.timings_ms, "total": round(batch_ms, 3)},
                        **({"rechecked_fp32": True} if result.rechecked else {}),
                    }
            for position in sorted(records):  # input order
                results.write(json.dumps(records[position]) + "\n")
                if on_item:
                    on_item(records[position])
            results.flush()
    elapsed = time.perf_counter() - started
    summary = {
        **counts,
        "seconds": round(elapsed, 3),
        "images_per_second": round(counts["images"] / elapsed, 3) if elapsed > 0 else None,
        "providers": predictor.providers,
        "bundle": str(predictor.bundle),
        "thresholds": predictor.thresholds,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
