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

import cv2
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score

from tilecore.runtime.errors import TilecoreError

__all__ = ["aupro", "f1_max", "image_auroc", "pixel_auroc", "pro_curve", "summarize"]


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


def _check_maps(masks: np.ndarray, maps: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate pixel-level inputs; return (masks as bool [N, H, W], maps as float64 [N, H, W])."""
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise TilecoreError(
            f"{metric}: masks {masks.shape} and maps {maps.shape} must both be [N, H, W] of the same shape"
        )
    masks = masks != 0
    maps = maps.astype(np.float64)
    if not np.isfinite(maps).all():
        raise TilecoreError(f"{metric}: anomaly maps contain NaN or infinity")
    n_anomalous = int(masks.sum())
    if n_anomalous == 0:
        raise TilecoreError(f"{metric}: the masks have no anomalous pixel; it needs at least one defect")
    if n_anomalous == masks.size:
        raise TilecoreError(f"{metric}: the masks have no normal pixel; it needs at least one normal pixel")
    return masks, maps


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


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Area under the ROC curve over all pixels of all images pooled together.

    Args:
        masks: [N, H, W] ground-truth masks (bool, or integer with non-zero = anomalous).
        maps: [N, H, W] anomaly maps.

    Returns:
        AUROC in [0, 1].
    """
    masks, maps = _check_maps(masks, maps, "pixel AUROC")
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


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


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve, one point per distinct map value, from the highest threshold down.

    For a threshold ``t``, PRO(t) is the mean over all defect regions (4-connected components of each
    mask, all images together) of the fraction of the region's pixels with ``map >= t``, and FPR(t) is
    the fraction of normal pixels (all images) with ``map >= t``.

    All pixels are sorted once by score, highest first. Each anomalous pixel of region r adds
    1 / (|r| * R) to PRO and each normal pixel adds 1 / N_normal to FPR, so cumulative sums give both
    curves at every prefix of the sorted order; a point is kept only at the end of each run of tied
    scores, since a threshold cannot split a tie. (FPR is accumulated as an integer count and divided once,
    which is the same sum without rounding drift.)

    Args:
        masks: [N, H, W] ground-truth masks; at least one anomalous and one normal pixel.
        maps: [N, H, W] anomaly maps.

    Returns:
        (fpr, pro): float64 [K + 1] each, starting at (0, 0) and ending at (1, 1), with fpr non-decreasing;
        K is the number of distinct map values.
    """
    masks, maps = _check_maps(masks, maps, "AUPRO")
    ids, n_regions = _region_ids(masks)
    scores = maps.ravel()

    sizes = np.bincount(ids, minlength=n_regions + 1).astype(np.float64)
    pro_weight = np.zeros(ids.size, dtype=np.float64)
    anomalous = ids > 0
    pro_weight[anomalous] = 1.0 / (sizes[ids[anomalous]] * n_regions)
    n_normal = int(ids.size - np.count_nonzero(anomalous))

    order = np.argsort(-scores)  # highest score first; the order within ties does not matter
    sorted_scores = scores[order]
    pro = np.cumsum(pro_weight[order])
    normal_count = np.cumsum(~anomalous[order], dtype=np.int64)

    # last index of each group of equal scores
    group_end = np.flatnonzero(np.diff(sorted_scores) != 0)
    group_end = np.append(group_end, sorted_scores.size - 1)

    fpr = np.concatenate(([0.0], normal_count[group_end] / n_normal))
    pro = np.concatenate(([0.0], pro[group_end]))
    return fpr, pro


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to a false-positive rate of ``fpr_limit`` (Bergmann et al.).

    The PRO-vs-FPR curve of :func:`pro_curve` is integrated with the trapezoid rule from FPR 0 to
    ``fpr_limit``, the last point being linearly interpolated exactly at ``fpr_limit``, and divided by
    ``fpr_limit`` so a perfect map scores 1.0.

    Args:
        masks: [N, H, W] ground-truth masks (bool, or integer with non-zero = anomalous); at least one
            anomalous and one normal pixel. Images without defects contribute only normal pixels.
        maps: [N, H, W] anomaly maps, higher = more anomalous.
        fpr_limit: upper FPR bound of the integral, in (0, 1].

    Returns:
        AUPRO in [0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise TilecoreError(f"AUPRO: fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps)

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
    masks: np.ndarray | None,
    maps: np.ndarray | None,
) -> dict[str, float | None]:
    """All metrics of an evaluation run as plain floats.

    Args:
        labels: [N] image ground truth, 0 = normal, 1 = anomalous.
        scores: [N] image anomaly scores.
        masks: [N, H, W] ground-truth masks, or None when the data set has none.
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
        result["pixel_auroc"] = pixel_auroc(masks, maps)
        result["aupro"] = aupro(masks, maps)
    return result
