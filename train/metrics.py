"""Anomaly-detection metrics: image AUROC, pixel AUROC, AUPRO and the best F1.

Conventions shared by every function here:

* image level: ``labels`` [N] with 0 = normal and 1 = anomalous (bool or integer), ``scores`` [N] float,
  higher = more anomalous;
* pixel level: ``masks`` [N, H, W] ground truth (any non-zero pixel is anomalous), ``maps`` [N, H, W]
  float anomaly maps, higher = more anomalous;
* a pixel / image counts as predicted anomalous at threshold ``t`` when its score is ``>= t``.

Only numpy, scikit-learn and OpenCV are used, so the metrics run without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score

from tilecore.runtime.errors import TilecoreError

__all__ = [
    "PixelCurves",
    "PixelTruth",
    "aupro",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "pixel_curves",
    "pixel_metrics",
    "pixel_truth",
    "pro_curve",
    "summarize",
]


def _check_labels(labels: np.ndarray, scores: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs; return (labels as int64 [N], scores as float64 [N])."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise TilecoreError(
            f"{metric}: labels {labels.shape} and scores {scores.shape} must be 1-D arrays of the same length"
        )
    if labels.dtype != np.bool_ and not np.issubdtype(labels.dtype, np.integer):
        raise TilecoreError(f"{metric}: labels have dtype {labels.dtype}, expected bool or integer 0/1")
    labels = labels.astype(np.int64)
    if not np.isin(labels, (0, 1)).all():
        raise TilecoreError(f"{metric}: labels must be 0 (normal) or 1 (anomalous), got {np.unique(labels)}")
    n_anomalous = int(labels.sum())
    if n_anomalous == 0 or n_anomalous == labels.size:
        kind = "anomalous" if n_anomalous else "normal"
        raise TilecoreError(f"{metric}: all {labels.size} labels are {kind}; both classes are needed")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise TilecoreError(f"{metric}: scores contain NaN or infinity")
    return labels, scores


def _check_maps(maps: np.ndarray, shape: tuple[int, ...], metric: str) -> np.ndarray:
    """Validate anomaly maps against their masks' `shape`; return them as float32 when they are float32 (so the
    pixel sort can take its fast path) and as float64 otherwise, [N, H, W] either way."""
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape != shape:
        raise TilecoreError(f"{metric}: masks {shape} and maps {maps.shape} must both be [N, H, W] of the same shape")
    if maps.dtype != np.float32:
        maps = np.asarray(maps, dtype=np.float64)  # no copy when already float64
    if not np.isfinite(maps).all():
        raise TilecoreError(f"{metric}: anomaly maps contain NaN or infinity")
    return maps


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores.

    Args:
        labels: [N] ground truth, 0 = normal, 1 = anomalous; both classes must be present.
        scores: [N] anomaly scores, higher = more anomalous.

    Returns:
        AUROC in [0, 1].
    """
    labels, scores = _check_labels(labels, scores, "image AUROC")
    return float(roc_auc_score(labels, scores))


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Number the defect regions of all masks.

    Regions are the 4-connected components of each image's mask, numbered 1..R across all images.

    Args:
        masks: [N, H, W] bool.

    Returns:
        (ids, R): ids is int64 [N * H * W] in C order, 0 for normal pixels and the region number of each
        anomalous pixel; R is the number of regions.
    """
    ids = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for index, mask in enumerate(masks):
        if not mask.any():
            continue
        count, components = cv2.connectedComponents(mask.astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
        ids[index] = np.where(components > 0, components.astype(np.int64) + n_regions, 0)
        n_regions += count - 1  # label 0 is the background
    return ids.ravel(), n_regions


@dataclass(frozen=True)
class PixelTruth:
    """Pixel ground truth prepared once for every set of maps scored against it (a run's full ensemble and
    its cascade): which pixels are anomalous and what each adds to PRO. All arrays are [N * H * W] in C order.

    Each anomalous pixel of region r adds 1 / (|r| * R) to PRO, R being the number of defect regions
    (4-connected components of each mask, all images together)."""

    shape: tuple[int, int, int]  # (N, H, W) of the masks
    anomalous: np.ndarray  # bool
    pro_weight: np.ndarray  # float64, 0 for normal pixels
    n_normal: int
    n_regions: int


def pixel_truth(masks: np.ndarray, metric: str = "pixel metrics") -> PixelTruth:
    """Masks [N, H, W] (bool, or integer with non-zero = anomalous) -> PixelTruth; `metric` names the
    refusals (masks not [N, H, W], no anomalous or no normal pixel)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise TilecoreError(f"{metric}: masks {masks.shape} must be [N, H, W]")
    masks = masks != 0
    n_anomalous = int(masks.sum())
    if n_anomalous == 0:
        raise TilecoreError(f"{metric}: the masks have no anomalous pixel; it needs at least one defect")
    if n_anomalous == masks.size:
        raise TilecoreError(f"{metric}: the masks have no normal pixel; it needs at least one normal pixel")
    ids, n_regions = _region_ids(masks)
    anomalous = ids > 0
    sizes = np.bincount(ids, minlength=n_regions + 1).astype(np.float64)
    pro_weight = np.zeros(ids.size, dtype=np.float64)
    pro_weight[anomalous] = 1.0 / (sizes[ids[anomalous]] * n_regions)
    shape = (masks.shape[0], masks.shape[1], masks.shape[2])
    return PixelTruth(shape, anomalous, pro_weight, masks.size - n_anomalous, n_regions)


def _truth_for(masks: np.ndarray | PixelTruth, maps: np.ndarray, metric: str) -> PixelTruth:
    """`masks` as a PixelTruth, refused first when masks and maps are not [N, H, W] of one shape."""
    if isinstance(masks, PixelTruth):
        return masks
    masks = np.asarray(masks)
    _check_maps(maps, masks.shape, metric)
    return pixel_truth(masks, metric)


def _descending_order(scores: np.ndarray) -> np.ndarray:
    """Indices that sort scores [P] from the highest down; the order within ties is not specified.

    float32 scores (as the ensemble's maps are) are sorted as one uint64 key per pixel, the score's bits
    mapped to an unsigned integer in the same order (then inverted, highest first) above the pixel's index:
    a plain sort of those keys is several times faster than an argsort and gives a stable argsort's order
    (ties by index; only 0.0 and -0.0, equal but of different bits, come as two adjacent runs, 0.0 first).
    Other dtypes take the argsort."""
    if scores.dtype != np.float32 or scores.size >= 2**32:
        return np.argsort(-scores)
    bits = scores.view(np.uint32)
    ordered = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))  # uint32 [P] in the floats' order
    keys = (~ordered).astype(np.uint64) << np.uint64(32) | np.arange(scores.size, dtype=np.uint64)  # [P]
    return (np.sort(keys) & np.uint64(0xFFFFFFFF)).astype(np.intp)


@dataclass(frozen=True)
class PixelCurves:
    """ROC and PRO curves of one set of maps, one point per distinct map value from the highest threshold
    down, float64 [K + 1] each, starting at (0, 0) and ending at (1, 1), with fpr non-decreasing."""

    fpr: np.ndarray  # fraction of normal pixels with map >= t
    tpr: np.ndarray  # fraction of anomalous pixels with map >= t
    pro: np.ndarray  # mean over defect regions of the fraction of the region's pixels with map >= t


def pixel_curves(truth: PixelTruth, maps: np.ndarray, metric: str = "pixel metrics") -> PixelCurves:
    """Both pixel curves of `maps` [N, H, W] against `truth`, from one sort of all pixels.

    All pixels are sorted once by score, highest first; cumulative sums of the PRO weights and counts of the
    normal pixels give PRO and FPR at every prefix of that order (TPR is the prefix length less the normal
    count), and a point is kept only at the end of each run of tied scores, since a threshold cannot split a
    tie. (The counts are integers divided once, the same sums without rounding drift.)
    """
    scores = _check_maps(maps, truth.shape, metric).ravel()
    order = _descending_order(scores)  # [P]
    sorted_scores = scores[order]
    pro = np.cumsum(truth.pro_weight[order])
    normal_count = np.cumsum(~truth.anomalous[order], dtype=np.int64)

    # last index of each group of equal scores
    group_end = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    group_end = np.append(group_end, sorted_scores.size - 1)  # [K]

    normal_at = normal_count[group_end]
    anomalous_at = group_end + 1 - normal_at
    n_anomalous = scores.size - truth.n_normal
    return PixelCurves(
        np.concatenate(([0.0], normal_at / truth.n_normal)),
        np.concatenate(([0.0], anomalous_at / n_anomalous)),
        np.concatenate(([0.0], pro[group_end])),
    )


def pixel_auroc(masks: np.ndarray | PixelTruth, maps: np.ndarray) -> float:
    """Area under the ROC curve over all pixels of all images pooled together.

    Args:
        masks: [N, H, W] ground-truth masks (bool, or integer with non-zero = anomalous), or their PixelTruth.
        maps: [N, H, W] anomaly maps.

    Returns:
        AUROC in [0, 1]: the trapezoid area under :func:`pixel_curves`' ROC curve, which counts ties 1/2.
    """
    truth = _truth_for(masks, maps, "pixel AUROC")
    return _roc_area(pixel_curves(truth, maps, "pixel AUROC"))


def _roc_area(curves: PixelCurves) -> float:
    return float(np.trapezoid(curves.tpr, curves.fpr))


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve, one point per distinct map value, from the highest threshold down.

    For a threshold ``t``, PRO(t) is the mean over all defect regions (4-connected components of each
    mask, all images together) of the fraction of the region's pixels with ``map >= t``, and FPR(t) is
    the fraction of normal pixels (all images) with ``map >= t`` (computed by :func:`pixel_curves`).

    Args:
        masks: [N, H, W] ground-truth masks; at least one anomalous and one normal pixel.
        maps: [N, H, W] anomaly maps.

    Returns:
        (fpr, pro): float64 [K + 1] each, starting at (0, 0) and ending at (1, 1), with fpr non-decreasing;
        K is the number of distinct map values.
    """
    curves = pixel_curves(_truth_for(masks, maps, "AUPRO"), maps, "AUPRO")
    return curves.fpr, curves.pro


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise TilecoreError(f"AUPRO: fpr_limit must be in (0, 1], got {fpr_limit}")


def _pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """The PRO curve's normalised area from FPR 0 to `fpr_limit` (see :func:`aupro`)."""
    # points up to the limit, then the curve's value at the limit, interpolated on the segment crossing it
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:inside] <= fpr_limit
    x = fpr[:inside]
    y = pro[:inside]
    if x[-1] < fpr_limit:  # the curve ends at fpr = 1 >= fpr_limit, so a next point exists
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.append(x, fpr_limit)
        y = np.append(y, y_limit)
    return float(np.trapezoid(y, x) / fpr_limit)


def aupro(masks: np.ndarray | PixelTruth, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to a false-positive rate of ``fpr_limit`` (Bergmann et al.).

    The PRO-vs-FPR curve of :func:`pro_curve` is integrated with the trapezoid rule from FPR 0 to
    ``fpr_limit``, the last point being linearly interpolated exactly at ``fpr_limit``, and divided by
    ``fpr_limit`` so a perfect map scores 1.0.

    Args:
        masks: [N, H, W] ground-truth masks (bool, or integer with non-zero = anomalous); at least one
            anomalous and one normal pixel. Images without defects contribute only normal pixels. Or the
            masks' PixelTruth.
        maps: [N, H, W] anomaly maps, higher = more anomalous.
        fpr_limit: upper FPR bound of the integral, in (0, 1].

    Returns:
        AUPRO in [0, 1].
    """
    _check_fpr_limit(fpr_limit)
    truth = _truth_for(masks, maps, "AUPRO")
    curves = pixel_curves(truth, maps, "AUPRO")
    return _pro_area(curves.fpr, curves.pro, fpr_limit)


def pixel_metrics(truth: PixelTruth, maps: np.ndarray, fpr_limit: float = 0.3) -> dict[str, float]:
    """{"pixel_auroc", "aupro"} of `maps` [N, H, W] from one sort of their pixels (:func:`pixel_curves`)."""
    _check_fpr_limit(fpr_limit)
    curves = pixel_curves(truth, maps)
    return {"pixel_auroc": _roc_area(curves), "aupro": _pro_area(curves.fpr, curves.pro, fpr_limit)}


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The best F1 over all thresholds and the threshold achieving it.

    Args:
        labels: [N] ground truth, 0 = normal, 1 = anomalous; both classes must be present.
        scores: [N] anomaly scores, higher = more anomalous.

    Returns:
        (f1, threshold): the highest F1 score and the lowest score threshold ``t`` reaching it, with images
        predicted anomalous when ``score >= t``.
    """
    labels, scores = _check_labels(labels, scores, "F1")
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # the last (precision, recall) = (1, 0) pair has no threshold
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def summarize(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | PixelTruth | None,
    maps: np.ndarray | None,
) -> dict[str, float | None]:
    """All metrics of an evaluation run as plain floats.

    Args:
        labels: [N] image ground truth, 0 = normal, 1 = anomalous.
        scores: [N] image anomaly scores.
        masks: [N, H, W] ground-truth masks, or their PixelTruth (prepared once when several sets of maps are
            scored against the same masks), or None when the data set has none.
        maps: [N, H, W] anomaly maps, or None; ignored when ``masks`` is None.

    Returns:
        {"image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold"}; the pixel metrics are None when
        ``masks`` is None.
    """
    best_f1, threshold = f1_max(labels, scores)
    result: dict[str, float | None] = {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": None,
        "aupro": None,
        "f1_max": best_f1,
        "f1_threshold": threshold,
    }
    if masks is not None:
        if maps is None:
            raise TilecoreError("metrics: ground-truth masks were given but no anomaly maps")
        result.update(pixel_metrics(_truth_for(masks, maps, "pixel metrics"), maps))
    return result
