"""`tilecore calibrate`: new thresholds for a bundle from known-good images taken on the line (no torch).

What operators do after a lighting or camera change: score a folder, glob or list of good images with the
bundle's own Predictor, then set

- the image threshold so that at most `target_fpr` of them are flagged (anomalous when score >= threshold):
  just above the (k+1)-th highest score, k = floor(target_fpr * N), midway to the k-th when they differ;
- the pixel threshold at the `pixel_quantile` of all their anomaly-map pixels (default: the quantile the
  bundle's pixel_rule names, else DEFAULT_PIXEL_QUANTILE), computed exactly from a bounded top-K buffer.

Fewer than ceil(1 / target_fpr) readable images are refused: with fewer, no image may be flagged at all
and the target cannot be met on the images themselves. Unreadable images are listed, skipped and counted.

The result is a NEW bundle: the old files (each copied from bytes that passed its sha256) and a new
manifest whose thresholds record how they were made (manifest.Recalibration), written into a staging
folder beside `out` and renamed into place complete (export.staging). The old signature does not cover
the new manifest: with a signing key the new bundle is signed, else it is unsigned.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tilecore.runtime.artifacts import atomic_write_bytes
from tilecore.runtime.cascade import refit
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.manifest import (
    SIGNATURE_FILE,
    Manifest,
    Recalibration,
    Thresholds,
    read_checked,
    write_manifest,
)
from tilecore.runtime.sources import is_camera, iter_sources, validate_image
from tilecore.runtime.spatial import refit_gate

DEFAULT_PIXEL_QUANTILE = 0.999  # when the bundle's pixel_rule names no quantile (train's fusion.pixel_quantile)
_FPR_EPS = 1e-9  # keeps floor(0.01 * 100) at 1 despite binary fractions


def min_good_images(target_fpr: float) -> int:
    """The fewest good images on which at most `target_fpr` of them flagged still allows one flagged."""
    return math.ceil(1.0 / target_fpr - _FPR_EPS)


def fewest(target_fpr: float) -> str:
    """The refusal's explanation of min_good_images."""
    needed = min_good_images(target_fpr)
    return f"--target-fpr {target_fpr:g} needs at least {needed} (1 / target_fpr) so one flagged image is within it"


def fpr_threshold(scores: np.ndarray, target_fpr: float) -> float:
    """The image threshold flagging at most floor(target_fpr * N) of `scores` [N] (score >= threshold)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]  # descending
    allowed = math.floor(target_fpr * len(ordered) + _FPR_EPS)
    if allowed >= len(ordered):
        return float(ordered[-1])
    below = ordered[allowed]  # the highest score that must stay unflagged
    if allowed > 0 and ordered[allowed - 1] > below:
        return float((ordered[allowed - 1] + below) / 2)
    return float(np.nextafter(below, np.inf))


class TailQuantile:
    """The `quantile` (numpy's linear interpolation) of up to `total` values seen in chunks, keeping only
    the highest K values: the quantile's two neighbours always lie among the top ceil((1-q)(total-1)) + 2."""

    def __init__(self, quantile: float, total: int) -> None:
        self.quantile = quantile
        self.keep = math.ceil((1.0 - quantile) * max(total - 1, 0)) + 2
        self.top = np.zeros(0, dtype=np.float64)
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        self.count += len(values)
        pool = np.concatenate([self.top, values])
        if len(pool) > self.keep:
            pool = np.partition(pool, len(pool) - self.keep)[len(pool) - self.keep :]  # the K highest
        self.top = pool

    def value(self) -> float:
        if self.count == 0:
            raise TilecoreError("pixel threshold: no anomaly-map pixels to calibrate on")
        position = self.quantile * (self.count - 1)  # ascending index among all values
        low = math.floor(position)
        high = min(low + 1, self.count - 1)
        ordered = np.sort(self.top)  # ascending: the last K of all values
        offset = self.count - len(ordered)  # ascending index of ordered[0]
        a, b = ordered[low - offset], ordered[high - offset]
        return float(a + (position - low) * (b - a))


def bundle_pixel_quantile(thresholds: Thresholds) -> float:
    """The quantile the bundle's pixel threshold was set at ("quantile 0.999"), else DEFAULT_PIXEL_QUANTILE."""
    if thresholds.recalibrated is not None:
        return thresholds.recalibrated.pixel_quantile
    match = re.fullmatch(r"quantile ([0-9.]+)", thresholds.pixel_rule)
    return float(match.group(1)) if match else DEFAULT_PIXEL_QUANTILE


@dataclass
class GoodScores:
    """What the good images gave: their image scores, the pixel threshold, and what was left out."""

    scores: np.ndarray  # [N] fused image scores of the readable images
    pixel_threshold: float
    fingerprint: str  # sha256 over the sorted sha256s of the scored images' pixels
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    member_scores: np.ndarray | None = None  # [M, N] each member's normalised scores, for a cascade's refit
    tile_scores: np.ndarray | None = None  # [M, N, T] raw fine tile scores, for the coarse gate's refit
    coarse_maxima: np.ndarray | None = None  # [N, T] the coarse stage's maxima per fine tile


def score_good_images(
    predictor,
    spec: str,
    pixel_quantile: float,
    batch: int = 4,
    on_skip: Callable[[str, str], None] | None = None,
    target_fpr: float | None = None,
) -> GoodScores:
    """Score every image of `spec` with `predictor` (a runtime.predictor.Predictor); with `target_fpr`, fewer
    inputs than min_good_images are refused before any is read."""
    if is_camera(spec):
        raise TilecoreError(f"good images {spec}: a camera has no fixed set of images; save frames to a folder")
    sources = list(iter_sources(spec))  # (name, loader); nothing is read yet
    if target_fpr is not None and len(sources) < min_good_images(target_fpr):
        raise TilecoreError(f"good images {spec}: {len(sources)} found, {fewest(target_fpr)}")
    height, width = predictor.manifest.image_size
    pixels = TailQuantile(pixel_quantile, len(sources) * height * width)  # maps are at the bundle's image size
    tile_hw = (predictor.grid.tile_h, predictor.grid.tile_w)
    scores, digests, skipped = [], [], []
    passes = [] if refits(predictor.manifest) else None  # Predictor.calibration_pass per batch

    def flush(images: list[np.ndarray]) -> None:
        if passes is None:
            results = predictor.predict_batch(images)
        else:  # the cascade's windows and the gate are refit on these images too (recalibrated_manifest)
            full_pass = predictor.calibration_pass(images)
            results = full_pass.results  # used here and dropped: only the small score arrays are kept
            passes.append(replace(full_pass, results=[]))
        for result in results:
            scores.append(result.score)
            pixels.add(result.anomaly_map)

    pending: list[np.ndarray] = []
    for name, loader in sources:
        try:
            image = loader()
            reason = validate_image(image, tile_hw)
        except TilecoreError as exc:
            reason = str(exc)
        if reason:
            skipped.append((name, reason))
            if on_skip is not None:
                on_skip(name, reason)
            continue
        digests.append(hashlib.sha256(f"{image.shape}".encode() + image.tobytes()).hexdigest())
        pending.append(image)
        if len(pending) == batch:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    fingerprint = hashlib.sha256("\n".join(sorted(digests)).encode("ascii")).hexdigest()
    value = pixels.value() if scores else float("nan")
    good = GoodScores(np.asarray(scores, dtype=np.float64), value, fingerprint, skipped)
    if passes:
        good.member_scores = np.concatenate([p.member_scores for p in passes], axis=1)  # [M, N]
        good.tile_scores = np.concatenate([p.tile_scores for p in passes], axis=1)  # [M, N, T]
        if passes[0].coarse_maxima is not None:
            good.coarse_maxima = np.concatenate([p.coarse_maxima for p in passes])  # [N, T]
    return good


def refits(manifest: Manifest) -> bool:
    """Whether the bundle records what its cascade windows or tile gate are refit on."""
    cascade, coarse = manifest.cascade, manifest.coarse
    windows = cascade is not None and bool(cascade.calibration_scores)
    return windows or (coarse is not None and coarse.gate.scores is not None)


def check_request(bundle: Path, out: Path, target_fpr: float, pixel_quantile: float | None) -> None:
    """Refuse, before any image is read, what cannot give a usable bundle."""
    if not (isinstance(target_fpr, int | float) and 0.0 < target_fpr < 1.0):
        raise TilecoreError(f"--target-fpr {target_fpr}: expected a fraction between 0 and 1 (0.01: 1 in 100)")
    if pixel_quantile is not None and not 0.0 < pixel_quantile <= 1.0:
        raise TilecoreError(f"--pixel-quantile {pixel_quantile}: expected 0 < value <= 1")
    if out.resolve() == bundle.resolve():
        raise TilecoreError(f"--out {out}: is the input bundle; calibrate writes a new bundle beside it")
    if out.exists():
        raise TilecoreError(f"--out {out}: already exists; choose another --out or delete it")


def recalibrated_manifest(manifest: Manifest, good: GoodScores, target_fpr: float, pixel_quantile: float) -> Manifest:
    """`manifest` with thresholds set on the good images, recording how (Recalibration)."""
    n = len(good.scores)
    image = fpr_threshold(good.scores, target_fpr)
    record = Recalibration(
        images=n,
        images_sha256=good.fingerprint,
        target_fpr=float(target_fpr),
        fpr=float(np.mean(good.scores >= image)),
        pixel_quantile=float(pixel_quantile),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        previous=replace(manifest.thresholds, recalibrated=None),
    )
    thresholds = Thresholds(
        image=image,
        pixel=good.pixel_threshold,
        image_rule=f"calibrate: at most {target_fpr:g} of {n} good images flagged",
        pixel_rule=f"calibrate: quantile {pixel_quantile:g} of {n} good images' map pixels",
        recalibrated=record,
    )
    cascade = manifest.cascade
    if cascade is not None and cascade.calibration_scores and good.member_scores is not None:
        # windows set again at the new threshold, on export's calibration images and these good images
        cascade = refit(cascade, good.member_scores, image, manifest.postprocess.rule.fusion)
    elif cascade is not None:  # no calibration scores in the bundle: the windows move with the threshold
        cascade = cascade.shifted(image - manifest.thresholds.image)
    coarse = manifest.coarse
    if coarse is not None and coarse.gate.scores is not None and good.coarse_maxima is not None:
        calibrations = manifest.calibration.members  # the fine members', in member order
        gate = refit_gate(coarse.gate, good.coarse_maxima, good.tile_scores, image, manifest.tiling.tile_grid(),
                          manifest.postprocess.rule, calibrations)  # fmt: skip
        coarse = replace(coarse, gate=gate)
    return replace(manifest, thresholds=thresholds, cascade=cascade, coarse=coarse)


def write_recalibrated(bundle: Path, manifest: Manifest, out: Path, sign_key: Path | None) -> None:
    """Copy the bundle's files (each from checked bytes) and write `manifest` into a staging folder, sign it
    when asked, and rename it to `out`: the new bundle appears complete or not at all."""
    from tilecore.export.staging import remove_stale_staging, stage_bundle  # torch-free
    from tilecore.runtime.signing import load_private_key, sign_bundle

    signer = load_private_key(sign_key) if sign_key is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    stage = stage_bundle(out)
    try:
        for name in manifest.files:
            atomic_write_bytes(stage.folder / name, read_checked(bundle, manifest, name))
        write_manifest(stage.folder, manifest)
        if signer is not None:
            sign_bundle(stage.folder, signer)  # last: the signature covers the final manifest.json
        stage.folder.rename(out)
    except BaseException:
        shutil.rmtree(stage.folder, ignore_errors=True)
        raise
    finally:
        stage.release()


@dataclass
class Outcome:
    manifest: Manifest  # the new bundle's
    skipped: list[tuple[str, str]]
    was_signed: bool  # the input bundle carried a signature
    signed: bool  # the new bundle does


def recalibrate(
    bundle: str | Path,
    good_images: str,
    out: str | Path,
    target_fpr: float = 0.01,
    pixel_quantile: float | None = None,
    sign_key: str | Path | None = None,
    device: str = "auto",
    batch: int = 4,
    on_skip: Callable[[str, str], None] | None = None,
) -> Outcome:
    """Score `good_images` with `bundle`, set its thresholds on them, and write the new bundle `out`."""
    from tilecore.runtime.predictor import Predictor

    bundle, out = Path(bundle), Path(out)
    check_request(bundle, out, target_fpr, pixel_quantile)
    if sign_key is not None:
        from tilecore.runtime.signing import load_private_key

        load_private_key(sign_key)  # a bad key file is refused before the images are scored
    predictor = Predictor(bundle, device, cascade=False)  # thresholds are the full ensemble's
    manifest = predictor.manifest  # the one that scored; each file is checked against it again as it is copied
    quantile = pixel_quantile if pixel_quantile is not None else bundle_pixel_quantile(manifest.thresholds)
    good = score_good_images(predictor, good_images, quantile, batch, on_skip, target_fpr)
    if len(good.scores) < min_good_images(target_fpr):
        raise TilecoreError(
            f"good images {good_images}: {len(good.scores)} readable ({len(good.skipped)} skipped), "
            + fewest(target_fpr)
        )
    new = recalibrated_manifest(manifest, good, target_fpr, quantile)
    write_recalibrated(bundle, new, out, Path(sign_key) if sign_key is not None else None)
    was_signed = (bundle / SIGNATURE_FILE).is_file()
    return Outcome(new, good.skipped, was_signed, sign_key is not None)
