"""Tests of tilecore.train.metrics, each against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from tilecore.runtime.errors import TilecoreError
from tilecore.train.metrics import aupro, f1_max, image_auroc, pixel_auroc, pro_curve, summarize

# ---------------------------------------------------------------------------------------------------------
# independent reference implementations (slow, written for clarity)


def pairwise_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the probability that an anomalous sample outscores a normal one (ties count 1/2)."""
    positive = scores[labels == 1]
    negative = scores[labels == 0]
    greater = (positive[:, None] > negative[None, :]).sum()
    equal = (positive[:, None] == negative[None, :]).sum()
    wins = greater + 0.5 * equal
    return float(wins / (positive.size * negative.size))


def brute_force_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over every candidate threshold, precision and recall counted by hand."""
    best = 0.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        tp = int(np.sum(predicted & (labels == 1)))
        fp = int(np.sum(predicted & (labels == 0)))
        fn = int(np.sum(~predicted & (labels == 1)))
        if tp == 0:
            continue
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def f1_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    predicted = scores >= threshold
    tp = np.sum(predicted & (labels == 1))
    return float(2 * tp / (predicted.sum() + (labels == 1).sum()))


def brute_force_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """AUPRO with one full pass over the data per distinct threshold; regions from scipy.ndimage.label."""
    regions = []  # (image index, bool [H, W] region)
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask)  # default structure: 4-connectivity
        regions.extend((index, labelled == r) for r in range(1, count + 1))
    normal = ~masks

    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        pros.append(np.mean([predicted[index][region].sum() / region.sum() for index, region in regions]))
    fpr = np.array(fprs)
    pro = np.array(pros)

    inside = int(np.sum(fpr <= fpr_limit))  # fpr is non-decreasing, so this is a prefix
    x, y = list(fpr[:inside]), list(pro[:inside])
    if x[-1] < fpr_limit:
        x.append(fpr_limit)
        y.append(np.interp(fpr_limit, fpr[inside - 1 : inside + 1], pro[inside - 1 : inside + 1]))
    return float(np.trapezoid(y, x) / fpr_limit)


def random_pixel_data(seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Small masks [6, 10, 12] with varied regions, and maps loosely correlated with them."""
    rng = np.random.default_rng(seed)
    n, h, w = 6, 10, 12
    masks = np.zeros((n, h, w), dtype=bool)
    # image 0: no defect; image 1: two separate rectangles
    masks[1, 1:3, 1:4] = True
    masks[1, 6:9, 7:11] = True
    # image 2: sparse pixels, many touching only diagonally (separate regions under 4-connectivity)
    masks[2] = rng.random((h, w)) < 0.2
    masks[2, 0, 0] = masks[2, 1, 1] = True
    masks[2, 0, 1] = masks[2, 1, 0] = False
    # images 3-4: one to three random rectangles; image 5: no defect
    for index in (3, 4):
        for _ in range(rng.integers(1, 4)):
            top, left = rng.integers(0, h - 2), rng.integers(0, w - 2)
            masks[index, top : top + rng.integers(1, 4), left : left + rng.integers(1, 5)] = True
    maps = rng.normal(size=(n, h, w)) + 1.5 * masks
    if ties:
        maps = np.round(maps * 2) / 2  # few distinct values, ties between normal and anomalous pixels
    return masks, maps


# ---------------------------------------------------------------------------------------------------------
# image AUROC and pixel AUROC


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn_and_pair_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=40)
    labels[:2] = [0, 1]
    scores = rng.normal(size=40) + labels
    scores[5] = scores[6]  # a tie
    result = image_auroc(labels, scores)
    assert result == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)


def test_image_auroc_perfect_and_inverted() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    scores = labels.astype(float) + np.linspace(0, 0.5, 6)
    assert image_auroc(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn(seed: int) -> None:
    masks, maps = random_pixel_data(seed, ties=seed == 0)
    result = pixel_auroc(masks, maps)
    assert result == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert result == pytest.approx(pairwise_auroc(masks.ravel().astype(int), maps.ravel()), abs=1e-12)


def test_pixel_auroc_perfect_and_inverted() -> None:
    masks, _ = random_pixel_data(0, ties=False)
    maps = masks * 2.0 + np.random.default_rng(1).random(masks.shape)
    assert pixel_auroc(masks, maps) == 1.0
    assert pixel_auroc(masks.astype(np.uint8) * 255, -maps) == 0.0  # 0/255 masks count as bool


# ---------------------------------------------------------------------------------------------------------
# F1


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=30)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=30) + labels, 1)  # rounding makes ties
    best, threshold = f1_max(labels, scores)
    assert best == pytest.approx(brute_force_f1(labels, scores), abs=1e-12)
    assert f1_at(labels, scores, threshold) == pytest.approx(best, abs=1e-12)


def test_f1_max_perfect_separation() -> None:
    labels = np.array([0, 1, 0, 1, 1])
    scores = np.array([0.1, 0.7, 0.3, 0.9, 0.6])
    assert f1_max(labels, scores) == (1.0, 0.6)


# ---------------------------------------------------------------------------------------------------------
# AUPRO


def test_aupro_hand_worked_example() -> None:
    # One 1x6 image: pixels 2-3 form the only region (|r| = 2, R = 1); 4 normal pixels, so FPR steps by 0.25.
    masks = np.array([[[0, 0, 1, 1, 0, 0]]], dtype=bool)
    maps = np.array([[[0.1, 0.8, 0.9, 0.6, 0.6, 0.2]]])
    # Thresholds from the top (map >= t):
    #   t = 0.9: region pixel 2                  -> FPR 0,    PRO 1/2
    #   t = 0.8: + normal pixel 1                -> FPR 1/4,  PRO 1/2
    #   t = 0.6: + region pixel 3, normal pixel 4 (tie) -> FPR 2/4, PRO 1
    #   t = 0.2, 0.1: + the other normal pixels  -> FPR 3/4, 1;  PRO 1
    # Curve: (0,0) (0,.5) (.25,.5) (.5,1) (.75,1) (1,1).
    # At FPR 0.3 on the segment (.25,.5)-(.5,1) (slope 2): PRO = .5 + 2 * .05 = .6.
    # Area to 0.3: 0.25 * 0.5 + 0.05 * (0.5 + 0.6) / 2 = 0.125 + 0.0275 = 0.1525; / 0.3 = 61/120 = 0.508333...
    assert aupro(masks, maps) == pytest.approx(61 / 120, abs=1e-12)
    # Full curve: 0.125 + 0.25 * (0.5 + 1) / 2 + 0.5 * 1 = 0.125 + 0.1875 + 0.5 = 0.8125.
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.8125, abs=1e-12)
    # Limit exactly on a curve point: area to 0.25 is 0.125; / 0.25 = 0.5.
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx(0.5, abs=1e-12)


def test_pro_curve_averages_regions_not_pixels() -> None:
    # Regions of 1 pixel (index 0) and 3 pixels (2-4); at t = 0.9 only the small one is found,
    # so PRO = (1 + 0) / 2 = 0.5 (pooling pixels would give 1/4).
    masks = np.array([[[1, 0, 1, 1, 1, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.1, 0.5, 0.5, 0.5, 0.1, 0.1]]])
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(pro, [0.0, 0.5, 1.0, 1.0], atol=1e-15)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed: int, ties: bool, fpr_limit: float) -> None:
    masks, maps = random_pixel_data(seed, ties)
    expected = brute_force_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_uses_4_connectivity() -> None:
    # Pixels (0,0),(0,1) and (1,2): (0,1) and (1,2) touch only diagonally, so under 4-connectivity there are
    # two regions (sizes 2 and 1); under 8-connectivity it would be one region of 3 pixels.
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 1, 2] = 1.0
    fpr, pro = pro_curve(masks, maps)
    # t = 1 finds only the single-pixel region: PRO = (0 + 1) / 2 = 1/2 (8-connected: 1/3)
    assert (fpr[1], pro[1]) == (0.0, pytest.approx(0.5, abs=1e-15))


def test_aupro_perfect_map_is_one() -> None:
    masks, _ = random_pixel_data(3, ties=False)
    maps = masks + 0.1 * np.random.default_rng(0).random(masks.shape)
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# errors and summary


def test_errors() -> None:
    masks, maps = random_pixel_data(0, ties=False)
    with pytest.raises(TilecoreError, match="same shape"):
        aupro(masks, maps[:, :-1])
    with pytest.raises(TilecoreError, match="same shape"):
        pixel_auroc(masks[0], maps[0])
    with pytest.raises(TilecoreError, match="no anomalous pixel"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(TilecoreError, match="no anomalous pixel"):
        pixel_auroc(np.zeros_like(masks), maps)
    with pytest.raises(TilecoreError, match="no normal pixel"):
        aupro(np.ones_like(masks), maps)
    with pytest.raises(TilecoreError, match="no normal pixel"):
        pixel_auroc(np.ones_like(masks), maps)
    with pytest.raises(TilecoreError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(TilecoreError, match="NaN"):
        aupro(masks, bad)

    scores = np.array([0.1, 0.2, 0.3])
    with pytest.raises(TilecoreError, match="both classes"):
        image_auroc(np.array([1, 1, 1]), scores)
    with pytest.raises(TilecoreError, match="both classes"):
        f1_max(np.array([0, 0, 0]), scores)
    with pytest.raises(TilecoreError, match="same length"):
        image_auroc(np.array([0, 1]), scores)
    with pytest.raises(TilecoreError, match="0 \\(normal\\) or 1"):
        image_auroc(np.array([0, 1, 2]), scores)


def test_summarize() -> None:
    masks, maps = random_pixel_data(1, ties=False)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    summary = summarize(labels, scores, masks, maps)
    assert set(summary) == {"image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold"}
    assert all(type(value) is float for value in summary.values())
    assert summary["aupro"] == aupro(masks, maps)
    assert (summary["f1_max"], summary["f1_threshold"]) == f1_max(labels, scores)

    image_only = summarize(labels, scores, None, None)
    assert image_only["pixel_auroc"] is None and image_only["aupro"] is None
    assert image_only["image_auroc"] == image_auroc(labels, scores)
