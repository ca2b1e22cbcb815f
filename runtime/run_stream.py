"""`tilecore run BUNDLE INPUT --out DIR`: stream images through a Predictor and write what it finds.

What lands in `--out`, and the promises about it:

* `results.jsonl`: one JSON line per input, appended as soon as its batch is scored. Each line is written
  whole; after a failed write (full disk) the file is cut back to its last complete line, so it always
  ends on a complete record. Strict JSON only: a result with a non-finite score is an error line.
* `summary.json`: written atomically at the start (`"completed": false`), every few seconds, and at the
  end (`"completed": true`); an interrupted run leaves `false` with the counts of the lines written.
  `images + failed` equals the number of lines in results.jsonl.
* `overlays/`, `masks/` (optional): one PNG per scored input, named `<readable part>-<hash of the input
  name>.png` so that no two inputs share a file; each result line names its files. What an overlay
  shows (heat map, mask outline, colour bar, label, score, threshold; optionally beside the original)
  is runtime.overlay's.
* `.lock`: an exclusive lock held for the whole run, so a second run into the same folder is refused.

runtime.output_folder keeps these files; this module streams inputs into them.

The input spec is resolved (and the bundle opened, by the caller) before anything in `--out` is created
or changed. A folder that already holds results is refused unless `resume` (skip the inputs already
recorded, append the rest) or `overwrite` (start afresh) is asked for. A bad input gets an error line and
the stream goes on; a fault of the output folder (full disk, read-only, not a folder) ends the run with
one TilecoreError naming the path.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import IMAGE_SUFFIXES, write_png
from tilecore.runtime.output_folder import (
    EXIT_KEY,
    check_same_run,
    count_records,
    lock_out,
    open_results,
    read_results,
    record_line,
    write_summary,
)
from tilecore.runtime.overlay import overlay
from tilecore.runtime.predictor import Predictor, Result
from tilecore.runtime.sources import Item, is_camera, stream, validate_image

SUMMARY_EVERY_S = 5.0  # how often a running stream rewrites summary.json
STEM_CHARS = 60  # readable part of an overlay/mask file name (ASCII, so bytes = chars)
HASH_CHARS = 16  # hex digits of sha256(input name) that make the file name unique


@dataclass(frozen=True)
class Pictures:
    """Which pictures a run writes for each scored input."""

    overlays: bool = False
    masks: bool = False
    side_by_side: bool = False  # overlays: the original on the left of the overlay


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


def output_stem(name: str) -> str:
    """File stem for an input's overlay and mask: the end of its name made safe, plus a hash of all of it.

    Two different names never share a stem (the hash covers the full name, any characters), and the
    stem stays short (at most STEM_CHARS + 1 + HASH_CHARS ASCII characters) however long the name.
    """
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    base, suffix = os.path.splitext(name.replace("\\", "/"))
    if suffix.lower() not in IMAGE_SUFFIXES:
        base += suffix
    readable = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in base)
    readable = re.sub(r"_+", "_", readable)[-STEM_CHARS:].strip("_-")
    return f"{readable}-{digest}" if readable else digest


# --------------------------------------------------------------------------------------------------
# The stream


def _scored_record(item: Item, result: Result, batch_ms: float) -> dict:
    if not math.isfinite(result.score):
        return {"input": item.name, "error": f"score is not finite ({result.score})"}
    return {
        "input": item.name,
        "score": round(result.score, 6),
        **({"threshold": round(result.threshold, 6)} if result.threshold is not None else {}),  # label's threshold
        "label": "anomalous" if result.label else "normal",
        "timings_ms": {**result.timings_ms, "total": round(batch_ms, 3)},
        **({"rechecked_fp32": True} if result.rechecked else {}),
        **({"exit_stage": result.exit_stage} if result.exit_stage is not None else {}),  # the cascade's
        **({"tiles_run": result.tiles_run} if result.tiles_run is not None else {}),  # the coarse stage's
    }


def _write_pictures(
    predictor: Predictor, out: Path, item: Item, result: Result, record: dict, pictures: Pictures
) -> None:
    """Write the overlay and mask of a scored item and name them in its record."""
    stem = output_stem(item.name)
    if pictures.overlays:
        heat = overlay(
            item.image, result.anomaly_map, result.mask, predictor.thresholds.pixel, result.score,
            result.threshold, bool(result.label), pictures.side_by_side,
        )  # fmt: skip
        record["overlay"] = _write_picture(out, f"overlays/{stem}.png", heat)
    if pictures.masks:
        record["mask"] = _write_picture(out, f"masks/{stem}.png", full_size_mask(result, item.image.shape[:2]))


def _write_picture(out: Path, relative: str, picture: np.ndarray) -> str:
    try:
        write_png(out / relative, picture)
    except OSError as error:
        raise TilecoreError(f"--out {out / relative}: cannot write ({error.strerror or error})") from None
    return relative


@dataclass(frozen=True)
class BatchScorer:
    """Scores batches of images; up to `in_flight` batches may be submitted before the oldest is collected.

    Collecting in submission order keeps results.jsonl in input order however many batches are in flight.
    """

    submit: Callable[[list[np.ndarray]], object]  # start scoring a batch of item.image arrays; returns a handle
    collect: Callable[[object], tuple[list[Result], float]]  # wait for a handle: one Result an image, ms an image
    in_flight: int = 1


def timed_batch(predictor: Predictor, images: list[np.ndarray]) -> tuple[list[Result], float]:
    """`predictor.predict_batch(images)` and the milliseconds it took per image."""
    started = time.perf_counter()
    results = predictor.predict_batch(images)
    return results, 1000 * (time.perf_counter() - started) / len(images)


def local_scorer(predictor: Predictor) -> BatchScorer:
    """Scores each batch in this process as it is submitted (the handle is the finished outcome)."""
    return BatchScorer(submit=lambda images: timed_batch(predictor, images), collect=lambda outcome: outcome)


@dataclass
class _Submitted:
    """A batch on its way: its items, the reasons its unusable ones are refused, and its scorer handle."""

    batch: list[Item]
    errors: dict[int, str]  # position in batch -> why that item is not scored
    handle: object | None  # None: no usable image, nothing was submitted


def _submit(scorer: BatchScorer, tile_hw: tuple[int, int], batch: list[Item]) -> _Submitted:
    """Validate the batch's items here, and submit its usable images (in input order) for scoring."""
    errors = {}
    for position, item in enumerate(batch):
        reason = item.error or validate_image(item.image, tile_hw)
        if reason:
            errors[position] = reason
    usable = [item.image for position, item in enumerate(batch) if position not in errors]
    return _Submitted(batch, errors, scorer.submit(usable) if usable else None)


def _batch_records(
    predictor: Predictor, scorer: BatchScorer, out: Path, submitted: _Submitted, pictures: Pictures
) -> list[dict]:
    """One record per item of a submitted batch, in input order (waits for its scores)."""
    batch, errors = submitted.batch, submitted.errors
    records = {position: {"input": batch[position].name, "error": reason} for position, reason in errors.items()}
    if submitted.handle is not None:
        results, ms_per_image = scorer.collect(submitted.handle)
        usable = [(position, item) for position, item in enumerate(batch) if position not in errors]
        for (position, item), result in zip(usable, results, strict=True):
            record = _scored_record(item, result, ms_per_image)
            if "error" not in record:
                _write_pictures(predictor, out, item, result, record, pictures)  # the driver still holds item.image
            records[position] = record
    return [records[position] for position in sorted(records)]


def run_stream(
    predictor: Predictor,
    spec: str,
    out: Path,
    batch_size: int = 4,
    overlays: bool = False,
    masks: bool = False,
    on_item: Callable[[dict], None] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_batch: Callable[[dict], None] | None = None,
    side_by_side: bool = False,
    scorer: BatchScorer | None = None,
) -> dict:
    """Score every input of `spec`; returns the summary also written to out/summary.json.

    `on_item` is called with each record as it is written, `on_batch` after each batch with the running
    summary (the counts so far, `seconds`, this run's `images_per_second`): progress for the caller to show.

    `resume`: keep the records already in out/results.jsonl and score only the inputs they do not name
    (a name recorded k times skips its first k occurrences). `overwrite`: replace an earlier run's results.
    Without either, a folder holding results is refused.

    `scorer`: what scores the batches (None: `predictor`, in this process; runtime.ray_run: Ray actors).
    `predictor` still decides everything else: thresholds, tile size, the run's identity, the pictures.
    """
    if resume and overwrite:
        raise TilecoreError("--resume and --overwrite: pick one (continue the earlier run, or replace it)")
    if resume and is_camera(spec):  # frame names restart at #0 each run: resuming would drop live frames
        raise TilecoreError(f"--resume with camera {spec}: a camera has no earlier frames to skip; use --overwrite")
    done: Counter[str] = Counter()  # the earlier run's inputs (--resume), filled before the first item is read
    # files are read by the bundle's bit-depth rule; raises TilecoreError now when the spec names nothing,
    # before --out is touched
    items = stream(spec, skip=done, bit_depth=predictor.bit_depth)
    try:
        lock = lock_out(out)
        try:
            args = (batch_size, Pictures(overlays, masks, side_by_side), on_item, resume, overwrite, on_batch)
            return _run_locked(predictor, scorer or local_scorer(predictor), spec, items, done, out, *args)
        finally:
            os.close(lock)  # releases the lock
    finally:
        items.close()


def _run_locked(
    predictor: Predictor,
    scorer: BatchScorer,
    spec: str,
    items: Iterator[Item],
    done: Counter[str],
    out: Path,
    batch_size: int,
    pictures: Pictures,
    on_item: Callable[[dict], None] | None,
    resume: bool,
    overwrite: bool,
    on_batch: Callable[[dict], None] | None,
) -> dict:
    # resuming with another --threshold would mix two runs' labels in one results.jsonl
    identity = {
        "input": spec,
        "bundle_sha256": predictor.manifest_sha256,
        "image_threshold": predictor.thresholds.image,
        "cascade": predictor.cascade is not None,  # early exits on (the bundle's cascade) or every member
    }
    if resume:
        check_same_run(out, identity)
    results, earlier = open_results(out, resume, overwrite)
    counts = Counter(count_records(earlier))
    done.update(record["input"] for record in earlier)  # the stream never reads these (a name k times: k)
    started = time.perf_counter()
    scored_now = 0

    def summary(completed: bool) -> dict:
        elapsed = time.perf_counter() - started
        exits = {key.removeprefix(EXIT_KEY): n for key, n in sorted(counts.items()) if key.startswith(EXIT_KEY)}
        return {
            "completed": completed,
            **{key: n for key, n in counts.items() if not key.startswith(EXIT_KEY)},
            **({"exits_per_stage": exits} if exits else {}),  # images that left the cascade at each stage
            "resumed": len(earlier),  # lines kept from an earlier run
            "seconds": round(elapsed, 3),
            "images_per_second": round(scored_now / elapsed, 3) if elapsed > 0 else None,  # this run's
            "providers": predictor.providers,
            "bundle": str(predictor.bundle),
            **identity,
            "thresholds": predictor.thresholds.to_dict(),
        }

    def write_oldest() -> None:
        """Wait for the oldest batch in flight and write its records."""
        nonlocal scored_now, last_summary
        for record in _batch_records(predictor, scorer, out, pending.popleft(), pictures):
            try:
                line = record_line(record)
            except ValueError:  # a non-finite number somewhere in the record
                record = {"input": record["input"], "error": "result holds a non-finite number"}
                line = record_line(record)
            results.append(line)
            for key, value in count_records([record]).items():
                counts[key] += value
            scored_now += "error" not in record
            if on_item:
                on_item(record)
        if on_batch:
            on_batch(summary(False))
        if time.monotonic() - last_summary >= SUMMARY_EVERY_S:
            results.sync()  # the summary never counts lines that are not on disk
            write_summary(out, summary(False))
            last_summary = time.monotonic()

    tile_hw = (predictor.grid.tile_h, predictor.grid.tile_w)
    pending: deque[_Submitted] = deque()  # batches read, oldest first; at most scorer.in_flight submitted
    try:
        write_summary(out, summary(False))  # replaces a stale summary before any new line
        last_summary = time.monotonic()
        for batch in batches(items, batch_size):
            pending.append(_submit(scorer, tile_hw, batch))
            # a full pipeline waits for its oldest batch; batches with nothing submitted never wait
            while pending and (
                pending[0].handle is None or sum(s.handle is not None for s in pending) >= scorer.in_flight
            ):
                write_oldest()
        while pending:
            write_oldest()
        results.sync()
        final = summary(True)
        write_summary(out, final)
        return final
    except BaseException:  # interrupted, full disk, a bug: say so, with the counts of the lines on disk
        try:
            counts.clear()  # the lines on disk are the truth (a Counter's update would add)
            counts.update(count_records(read_results(results.path)[0]))
            write_summary(out, summary(False))
        except (TilecoreError, OSError):
            pass  # the folder itself is failing; the error being raised says so
        raise
    finally:
        results.close()
