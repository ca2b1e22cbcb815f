"""Normal statistics, normalisation, fusion and thresholds against numpy and hand-worked numbers."""

import numpy as np
import pytest

from tilecore.runtime.calibration import (
    NormalStats,
    balanced_f1_threshold,
    calibrate_threshold,
    f1_threshold,
    fuse,
    normalise,
    normalise_outputs,
    quantile_threshold,
)
from tilecore.runtime.errors import TilecoreError


def brute_force_f1(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """F1 of 'anomalous when score >= threshold', from precision and recall."""
    tp = fp = fn = 0
    for label, score in zip(labels, scores, strict=True):
        predicted = score >= threshold
        tp += int(predicted and label)
        fp += int(predicted and not label)
        fn += int(label and not predicted)
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


# --- NormalStats -------------------------------------------------------------------------------------------


def test_measure_hand_worked() -> None:
    stats = NormalStats.measure(np.array([1.0, 3.0]), np.array([[[0.0, 2.0]], [[4.0, 6.0]]]))
    # image scores: mean 2, population std 1; pixels 0, 2, 4, 6: mean 3, std sqrt((9 + 1 + 1 + 9) / 4) = sqrt(5)
    assert stats.image_mean == pytest.approx(2.0)
    assert stats.image_std == pytest.approx(1.0)
    assert stats.pixel_mean == pytest.approx(3.0)
    assert stats.pixel_std == pytest.approx(np.sqrt(5.0))


def test_measure_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(3.0, 0.5, size=20).astype(np.float32)
    maps = rng.normal(1.0, 2.0, size=(20, 16, 12)).astype(np.float32)
    stats = NormalStats.measure(scores, maps)
    assert stats.image_mean == pytest.approx(float(np.mean(scores.astype(np.float64))), rel=1e-6)
    assert stats.image_std == pytest.approx(float(np.std(scores.astype(np.float64))), rel=1e-5)
    assert stats.pixel_mean == pytest.approx(float(np.mean(maps.astype(np.float64))), rel=1e-9)
    assert stats.pixel_std == pytest.approx(float(np.std(maps.astype(np.float64))), rel=1e-9)
    assert all(isinstance(v, float) for v in stats.to_dict().values())


@pytest.mark.parametrize("n", [0, 1])
def test_measure_needs_at_least_two_images(n: int) -> None:
    with pytest.raises(TilecoreError, match="calibration"):
        NormalStats.measure(np.ones(n), np.ones((n, 4, 4)))


def test_stats_round_trip_through_dict() -> None:
    stats = NormalStats(1.5, 0.25, -2.0, 3.0)
    assert NormalStats.from_dict(stats.to_dict()) == stats
    assert NormalStats.from_dict({"image_mean": "1", "image_std": 2, "pixel_mean": 3, "pixel_std": 4}) == NormalStats(
        1.0, 2.0, 3.0, 4.0
    )


# --- normalise ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["mean", "max"])
def test_normalise_is_a_standard_score(rule: str) -> None:
    out = normalise(np.array([1.0, 5.0, 9.0]), mean=5.0, std=2.0, rule=rule)
    np.testing.assert_allclose(out, [-2.0, 0.0, 2.0])
    assert out.dtype == np.float32


def test_normalise_geometric_is_a_ratio_to_the_normal_mean() -> None:
    out = normalise(np.array([1.0, 5.0, 10.0]), mean=4.0, std=100.0, rule="geometric")
    np.testing.assert_allclose(out, [0.25, 1.25, 2.5])


def test_normalise_zero_spread_stays_finite() -> None:
    # a zero spread (or mean, for ratios) is replaced by 1e-12: large but finite values, in order
    np.testing.assert_allclose(normalise(np.array([1.0, 2.0]), mean=1.0, std=0.0, rule="mean"), [0.0, 1e12], rtol=1e-6)
    np.testing.assert_allclose(
        normalise(np.array([1.0, 2.0]), mean=0.0, std=1.0, rule="geometric"), [1e12, 2e12], rtol=1e-6
    )


def test_normalise_outputs_uses_image_stats_for_scores_and_pixel_stats_for_maps() -> None:
    stats = NormalStats(image_mean=10.0, image_std=5.0, pixel_mean=1.0, pixel_std=0.5)
    scores, maps = normalise_outputs(np.array([20.0]), np.full((1, 2, 2), 2.0), stats, "mean")
    np.testing.assert_allclose(scores, [2.0])  # (20 - 10) / 5
    np.testing.assert_allclose(maps, 2.0)  # (2 - 1) / 0.5
    scores, maps = normalise_outputs(np.array([20.0]), np.full((1, 2, 2), 2.0), stats, "geometric")
    np.testing.assert_allclose(scores, [2.0])  # 20 / 10
    np.testing.assert_allclose(maps, 2.0)  # 2 / 1


# --- fuse --------------------------------------------------------------------------------------------------


def test_fuse_hand_worked() -> None:
    a = np.array([1.0, 4.0, 2.0])
    b = np.array([4.0, 1.0, 8.0])
    c = np.array([2.0, 2.0, 4.0])
    np.testing.assert_allclose(fuse([a, b], "mean"), [2.5, 2.5, 5.0])
    np.testing.assert_allclose(fuse([a, b], "max"), [4.0, 4.0, 8.0])
    np.testing.assert_allclose(fuse([a, b], "geometric"), [2.0, 2.0, 4.0], rtol=1e-6)  # sqrt(4), sqrt(4), sqrt(16)
    np.testing.assert_allclose(fuse([a, b, c], "geometric"), [2.0, 2.0, 4.0], rtol=1e-6)  # cbrt(8), cbrt(8), cbrt(64)
    np.testing.assert_allclose(fuse([a, b, c], "mean"), [7 / 3, 7 / 3, 14 / 3], rtol=1e-6)


def test_fuse_keeps_shape_of_maps() -> None:
    maps = [np.full((2, 3, 4), 1.0), np.full((2, 3, 4), 9.0)]
    fused = fuse(maps, "geometric")
    assert fused.shape == (2, 3, 4) and fused.dtype == np.float32
    np.testing.assert_allclose(fused, 3.0, rtol=1e-6)


def test_fuse_of_one_member_is_the_identity() -> None:
    x = np.array([0.5, 1.5, 3.0])
    for rule in ("mean", "max", "geometric"):
        np.testing.assert_allclose(fuse([x], rule), x, rtol=1e-6)


def test_fuse_unknown_rule_is_refused() -> None:
    with pytest.raises(TilecoreError, match="median"):
        fuse([np.ones(2), np.ones(2)], "median")


# --- thresholds --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_quantile_threshold_matches_numpy(q: float) -> None:
    scores = np.random.default_rng(1).normal(size=37)
    assert quantile_threshold(scores, q) == pytest.approx(float(np.quantile(scores, q)))


def test_quantile_threshold_hand_worked() -> None:
    # sorted 1, 2, 3, 4, 5: the 0.9 quantile lies at position 0.9 * 4 = 3.6 -> 4 + 0.6 * (5 - 4)
    assert quantile_threshold(np.array([5.0, 1.0, 4.0, 2.0, 3.0]), 0.9) == pytest.approx(4.6)


def test_quantile_threshold_needs_scores() -> None:
    with pytest.raises(TilecoreError, match="threshold"):
        quantile_threshold(np.array([]), 0.9)


def test_f1_threshold_hand_worked() -> None:
    labels = np.array([0, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    # t = 0.4: tp 3, fp 1 -> F1 = 6 / 7; t = 0.6: tp 2, fp 0, fn 1 -> 0.8; t = 0.1: 6 / 10; so 0.4
    assert f1_threshold(labels, scores) == pytest.approx(0.4)


@pytest.mark.parametrize("seed", range(5))
def test_f1_threshold_maximises_f1_over_all_thresholds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = np.array([0] * 15 + [1] * 10)
    scores = np.round(rng.normal(size=25) + 1.2 * labels, 1)  # rounded: ties included
    threshold = f1_threshold(labels, scores)
    best = max(brute_force_f1(labels, scores, t) for t in np.concatenate([scores, scores + 0.05, [scores.max() + 1]]))
    assert threshold in scores
    assert brute_force_f1(labels, scores, threshold) == pytest.approx(best)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_f1_threshold_needs_both_classes(labels: list[int]) -> None:
    with pytest.raises(TilecoreError, match="both"):
        f1_threshold(np.array(labels), np.array([0.1, 0.2, 0.3]))


def test_calibrate_auto_uses_f1_with_both_classes() -> None:
    labels = np.array([0, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    threshold, how = calibrate_threshold(labels, scores, "auto", 0.99)
    assert how == "f1"
    assert threshold == pytest.approx(0.4)


def test_calibrate_auto_uses_the_quantile_of_normals_only() -> None:
    scores = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    threshold, how = calibrate_threshold(np.zeros(5), scores, "auto", 0.9)
    assert how.startswith("quantile") and "0.9" in how
    assert threshold == pytest.approx(4.6)


def test_calibrate_quantile_ignores_anomalous_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([1.0, 2.0, 3.0, 100.0, 200.0])
    threshold, how = calibrate_threshold(labels, scores, "quantile", 0.5)
    assert how.startswith("quantile")
    assert threshold == pytest.approx(2.0)  # median of 1, 2, 3


def test_calibrate_f1_rule_is_explicit() -> None:
    labels = np.array([0, 1])
    threshold, how = calibrate_threshold(labels, np.array([0.2, 0.8]), "f1", 0.99)
    assert (threshold, how) == (pytest.approx(0.8), "f1")
    with pytest.raises(TilecoreError, match="F1 calibration needs both normal and anomalous"):
        calibrate_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3]), "f1", 0.99)


def test_calibrate_unknown_rule_is_refused() -> None:
    with pytest.raises(TilecoreError, match="youden"):
        calibrate_threshold(np.array([0, 1]), np.array([0.1, 0.9]), "youden", 0.99)


# --- synthetic anomalies: balanced F1 ----------------------------------------------------------------------


def balanced_f1(normal: np.ndarray, anomalous: np.ndarray, threshold: float) -> float:
    """F1 of 'anomalous when score >= threshold' with each normal weighted len(anomalous) / len(normal)."""
    tp = float(np.sum(anomalous >= threshold))
    fp = float(np.sum(normal >= threshold)) * len(anomalous) / len(normal)
    return 2 * tp / (tp + fp + len(anomalous))


def test_balanced_f1_threshold_hand_worked() -> None:
    # normals 0, 1, 2, 3; anomalies 2.5, 4, 5, 6 (each normal weighs 1): t = 4 gives tp 3, fp 0, F1 6/7;
    # t = 2.5 gives tp 4, fp 1, F1 8/9, the best; the threshold sits midway to the next lower score, 2
    threshold = balanced_f1_threshold(np.array([0.0, 1.0, 2.0, 3.0]), np.array([2.5, 4.0, 5.0, 6.0]))
    assert threshold == pytest.approx(2.25)


@pytest.mark.parametrize("seed", range(5))
def test_balanced_f1_threshold_maximises_balanced_f1(seed: int) -> None:
    rng = np.random.default_rng(seed)
    normal = rng.normal(0.0, 1.0, size=6)
    anomalous = rng.normal(1.5, 1.5, size=30)  # five times as many: the weighting must not favour them
    threshold = balanced_f1_threshold(normal, anomalous)
    candidates = np.unique(np.concatenate([normal, anomalous]))
    best = max(balanced_f1(normal, anomalous, t) for t in candidates)
    assert balanced_f1(normal, anomalous, threshold) == pytest.approx(best)


def test_balanced_f1_does_not_depend_on_how_many_anomalies_were_painted() -> None:
    normal = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    anomalous = np.array([1.2, 2.8, 3.0, 3.5])
    once = balanced_f1_threshold(normal, anomalous)
    assert balanced_f1_threshold(normal, np.tile(anomalous, 5)) == pytest.approx(once)
    assert balanced_f1_threshold(np.tile(normal, 3), anomalous) == pytest.approx(once)


def test_calibrate_auto_uses_synthetic_anomalies_without_real_ones() -> None:
    normal = np.array([0.0, 1.0, 2.0, 3.0])
    synthetic = np.array([2.5, 4.0, 5.0, 6.0])
    threshold, how = calibrate_threshold(np.zeros(4), normal, "auto", 0.99, synthetic)
    assert threshold == pytest.approx(balanced_f1_threshold(normal, synthetic))
    assert how.startswith("synthetic balanced f1") and "4 normal" in how and "4 synthetic" in how
    # real anomalous validation images still come first
    labels = np.array([0, 0, 1, 1])
    _, how = calibrate_threshold(labels, np.array([0.1, 0.2, 0.8, 0.9]), "auto", 0.99, synthetic)
    assert how == "f1"
    # and the quantile rule ignores the synthetic scores
    threshold, how = calibrate_threshold(np.zeros(4), normal, "quantile", 0.5, synthetic)
    assert (threshold, how) == (pytest.approx(1.5), "quantile 0.5")


def test_calibrate_synthetic_rule_needs_synthetic_scores() -> None:
    with pytest.raises(TilecoreError, match="no synthetic anomaly scores"):
        calibrate_threshold(np.zeros(3), np.array([0.1, 0.2, 0.3]), "synthetic", 0.99, None)
    with pytest.raises(TilecoreError, match="balanced F1 needs both"):
        balanced_f1_threshold(np.array([0.1]), np.zeros(0))
