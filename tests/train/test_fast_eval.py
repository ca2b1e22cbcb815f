"""The one-sort pixel metrics `tilecore eval` uses (PixelTruth, pixel_curves, pixel_metrics) against the
implementation they replaced, kept here as the slow reference: a float64 argsort per metric for AUPRO and
scikit-learn's roc_auc_score for pixel AUROC.

Tolerance: 1e-9. AUPRO's cumulative PRO sums add a run of tied pixels in another order than the reference
(the key sort orders ties by index, the reference's argsort does not), and scikit-learn drops collinear ROC
points before its trapezoid sum; both change only the float summation order (differences seen: ~1e-16)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.train.test_metrics import brute_force_aupro, random_pixel_data
from tilecore.runtime.errors import TilecoreError
from tilecore.train.metrics import (
    _descending_order,
    _region_ids,
    aupro,
    pixel_auroc,
    pixel_curves,
    pixel_metrics,
    pixel_truth,
    summarize,
)

TOLERANCE = 1e-9

# ---------------------------------------------------------------------------------------------------------
# the replaced implementation (train/metrics.py before issue 16), the slow reference


def reference_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = masks != 0
    maps = maps.astype(np.float64)
    ids, n_regions = _region_ids(masks)
    scores = maps.ravel()
    sizes = np.bincount(ids, minlength=n_regions + 1).astype(np.float64)
    pro_weight = np.zeros(ids.size, dtype=np.float64)
    anomalous = ids > 0
    pro_weight[anomalous] = 1.0 / (sizes[ids[anomalous]] * n_regions)
    n_normal = int(ids.size - np.count_nonzero(anomalous))
    order = np.argsort(-scores)
    sorted_scores = scores[order]
    pro = np.cumsum(pro_weight[order])
    normal_count = np.cumsum(~anomalous[order], dtype=np.int64)
    group_end = np.append(np.flatnonzero(np.diff(sorted_scores) != 0), sorted_scores.size - 1)
    return np.concatenate(([0.0], normal_count[group_end] / n_normal)), np.concatenate(([0.0], pro[group_end]))


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    fpr, pro = reference_pro_curve(masks, maps)
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:inside], pro[:inside]
    if x[-1] < fpr_limit:
        x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
        x = np.append(x, fpr_limit)
        y = np.append(y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(np.trapezoid(y, x) / fpr_limit)


def reference_pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    return float(roc_auc_score((masks != 0).ravel(), maps.astype(np.float64).ravel()))


# ---------------------------------------------------------------------------------------------------------
# data


def eval_like_data(seed: int, ties: bool, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Masks [12, 48, 40] as an eval sees them (normal images, blobs of several sizes, some touching the
    border, one image with many small regions) and smooth-ish maps that partly follow them."""
    rng = np.random.default_rng(seed)
    n, h, w = 12, 48, 40
    masks = np.zeros((n, h, w), dtype=bool)
    for index in range(4, n):
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, h - 4), rng.integers(0, w - 4)
            masks[index, top : top + rng.integers(2, 20), left : left + rng.integers(2, 20)] = True
    masks[3] = rng.random((h, w)) < 0.05  # many one-pixel regions
    maps = rng.normal(size=(n, h, w)) + 2.0 * masks + rng.normal(size=(n, 1, 1))
    maps[1] -= 5.0  # negative values, so the key sort sees both signs
    if ties:
        maps = np.round(maps * 4) / 4  # few distinct values, ties across normal and anomalous pixels
    return masks, maps.astype(dtype)


CASES = [(seed, ties, dtype) for seed in range(3) for ties in (False, True) for dtype in (np.float32, np.float64)]


# ---------------------------------------------------------------------------------------------------------
# the new metrics against the reference


@pytest.mark.parametrize(("seed", "ties", "dtype"), CASES)
def test_pixel_metrics_match_the_replaced_implementation(seed: int, ties: bool, dtype: type) -> None:
    masks, maps = eval_like_data(seed, ties, dtype)
    got = pixel_metrics(pixel_truth(masks), maps)
    assert got["aupro"] == pytest.approx(reference_aupro(masks, maps), abs=TOLERANCE)
    assert got["pixel_auroc"] == pytest.approx(reference_pixel_auroc(masks, maps), abs=TOLERANCE)
    # the one-call functions give the same numbers as the shared-truth path
    assert aupro(masks, maps) == got["aupro"]
    assert pixel_auroc(masks, maps) == got["pixel_auroc"]


@pytest.mark.parametrize(("seed", "ties", "dtype"), CASES)
@pytest.mark.parametrize("fpr_limit", [0.05, 1.0])
def test_aupro_at_other_limits_matches_the_replaced_implementation(
    seed: int, ties: bool, dtype: type, fpr_limit: float
) -> None:
    masks, maps = eval_like_data(seed, ties, dtype)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(reference_aupro(masks, maps, fpr_limit), abs=TOLERANCE)


@pytest.mark.parametrize(("seed", "ties", "dtype"), CASES)
def test_curves_match_the_replaced_curve_point_by_point(seed: int, ties: bool, dtype: type) -> None:
    masks, maps = eval_like_data(seed, ties, dtype)
    curves = pixel_curves(pixel_truth(masks), maps)
    fpr, pro = reference_pro_curve(masks, maps)
    np.testing.assert_array_equal(curves.fpr, fpr)  # integer counts divided once: exact
    np.testing.assert_allclose(curves.pro, pro, rtol=0, atol=TOLERANCE)
    assert curves.tpr[0] == 0.0 and curves.tpr[-1] == 1.0 and np.all(np.diff(curves.tpr) >= 0)


@pytest.mark.parametrize("seed", range(3))
def test_small_maps_match_the_brute_force_in_both_dtypes(seed: int) -> None:
    masks, maps = random_pixel_data(seed, ties=True)
    expected = brute_force_aupro(masks, maps)  # one pass per threshold, regions from scipy
    for dtype in (np.float32, np.float64):
        assert aupro(masks, maps.astype(dtype)) == pytest.approx(expected, abs=TOLERANCE)


def test_float32_and_float64_copies_of_one_map_agree() -> None:
    masks, maps = eval_like_data(5, ties=True, dtype=np.float32)  # float32 values are exact in float64
    truth = pixel_truth(masks)
    fast = pixel_metrics(truth, maps)  # key sort
    slow = pixel_metrics(truth, maps.astype(np.float64))  # argsort
    assert fast == pytest.approx(slow, abs=TOLERANCE)


def test_one_truth_serves_several_maps_as_fresh_masks_would() -> None:
    # as evaluate_run scores the full ensemble's maps and then the cascade's against one PixelTruth
    masks, maps = eval_like_data(1, ties=False, dtype=np.float32)
    other = np.round(maps * 2 + np.random.default_rng(9).normal(size=maps.shape), 0).astype(np.float32)
    labels = masks.any(axis=(1, 2)).astype(int)
    truth = pixel_truth(masks)
    for each in (maps, other, maps):
        scores = each.max(axis=(1, 2))
        assert summarize(labels, scores, truth, each) == summarize(labels, scores, masks, each)
    assert pixel_metrics(truth, maps) != pixel_metrics(truth, other)  # the maps do differ


# ---------------------------------------------------------------------------------------------------------
# the key sort


def test_descending_order_of_float32_is_a_stable_descending_argsort() -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate(
        [
            rng.normal(size=500) * 1e3,
            np.round(rng.normal(size=500), 1) + 0.0,  # ties (+ 0.0 turns the -0.0 of rounding into 0.0)
            [np.finfo(np.float32).max, -np.finfo(np.float32).max, np.finfo(np.float32).tiny, -1e-40, 1e-40],
        ]
    ).astype(np.float32)
    np.testing.assert_array_equal(_descending_order(scores), np.argsort(-scores, kind="stable"))


def test_descending_order_puts_signed_zeros_together() -> None:
    scores = np.array([0.0, -1.0, -0.0, 2.0, 0.0, -0.0, 1e-30], dtype=np.float32)
    order = _descending_order(scores)
    assert sorted(order.tolist()) == list(range(scores.size))
    assert np.all(np.diff(scores[order]) <= 0)
    curves = pixel_curves(pixel_truth(np.array([[[0, 0, 1, 1, 0, 0, 0]]])), scores[None, None, :])
    assert curves.fpr.size == 1 + 4  # distinct values 2, 1e-30, 0 (both signs), -1


# ---------------------------------------------------------------------------------------------------------
# refusals


def test_refusals_name_the_metric_and_what_was_expected() -> None:
    masks, maps = eval_like_data(0, ties=False, dtype=np.float32)
    truth = pixel_truth(masks)
    with pytest.raises(TilecoreError, match="pixel metrics: masks .* same shape"):
        pixel_metrics(truth, maps[:, :-1])
    with pytest.raises(TilecoreError, match=r"must be \[N, H, W\]"):
        pixel_truth(masks[0])
    with pytest.raises(TilecoreError, match="no anomalous pixel"):
        pixel_truth(np.zeros_like(masks))
    with pytest.raises(TilecoreError, match="fpr_limit"):
        pixel_metrics(truth, maps, fpr_limit=1.5)
    bad = maps.copy()
    bad[2, 3, 4] = np.inf
    with pytest.raises(TilecoreError, match="NaN or infinity"):
        pixel_metrics(truth, bad)
