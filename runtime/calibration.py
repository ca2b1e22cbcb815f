"""Score normalisation, ensemble fusion and thresholds, all calibrated on held-out normal images.

Every statistic here comes from the validation split of normal training images (never test data), so a
single image can be scored on its own. Scores are normalised to standard scores against the normals:
z = (x - mean) / std. The geometric-mean fusion needs positive values and uses x / mean instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tilecore.runtime.errors import TilecoreError

FUSION_RULES = ("mean", "max", "geometric")
THRESHOLD_RULES = ("auto", "f1", "synthetic", "quantile")
MIN_CALIBRATION_IMAGES = 2
_EPS = 1e-12


@dataclass(frozen=True)
class NormalStats:
    """Location and spread of normal images' scores: image scores and anomaly-map pixels."""

    image_mean: float
    image_std: float
    pixel_mean: float
    pixel_std: float

    @classmethod
    def measure(cls, image_scores: np.ndarray, maps: np.ndarray) -> NormalStats:
        """image_scores [N], maps [N, ...] of normal validation images."""
        if len(image_scores) < MIN_CALIBRATION_IMAGES:
            raise TilecoreError(
                f"calibration: {len(image_scores)} validation images, expected at least {MIN_CALIBRATION_IMAGES}"
            )
        return cls(
            float(np.mean(image_scores)),
            float(np.std(image_scores)),
            float(np.mean(maps, dtype=np.float64)),
            float(np.std(maps, dtype=np.float64)),
        )

    @classmethod
    def from_dict(cls, raw: dict) -> NormalStats:
        return cls(**{k: float(raw[k]) for k in ("image_mean", "image_std", "pixel_mean", "pixel_std")})

    def to_dict(self) -> dict:
        return asdict(self)


def normalise(values: np.ndarray, mean: float, std: float, rule: str) -> np.ndarray:
    """Standard scores for mean/max fusion; ratios to the normal mean for the geometric mean."""
    if rule == "geometric":
        return (values / max(mean, _EPS)).astype(np.float32)
    return ((values - mean) / max(std, _EPS)).astype(np.float32)


def normalise_outputs(
    image_scores: np.ndarray, maps: np.ndarray, stats: NormalStats, rule: str
) -> tuple[np.ndarray, np.ndarray]:
    """(image scores [...], maps [...]) of one model -> the same, normalised for fusion `rule`."""
    return (
        normalise(image_scores, stats.image_mean, stats.image_std, rule),
        normalise(maps, stats.pixel_mean, stats.pixel_std, rule),
    )


def fuse(values: list[np.ndarray], rule: str) -> np.ndarray:
    """Fuse normalised member outputs of equal shape (scores or maps) element-wise."""
    if rule not in FUSION_RULES:
        raise TilecoreError(f"fusion rule {rule!r}: expected one of {', '.join(FUSION_RULES)}")
    if len(values) == 1 and rule != "geometric":  # the mean or max of one member is that member (a copy)
        return np.asarray(values[0]).astype(np.float32)
    stacked = np.stack(values)  # [M, ...]
    if rule == "mean":
        return stacked.mean(axis=0).astype(np.float32)
    if rule == "max":
        return stacked.max(axis=0).astype(np.float32)
    return np.exp(np.log(np.maximum(stacked, _EPS)).mean(axis=0)).astype(np.float32)


def quantile_threshold(normal_scores: np.ndarray, quantile: float) -> float:
    """The `quantile` of normal validation scores (linear interpolation)."""
    if len(normal_scores) == 0:
        raise TilecoreError("threshold: no normal validation scores to calibrate on")
    return float(np.quantile(np.asarray(normal_scores, dtype=np.float64), quantile))


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising F1 (anomalous when score >= threshold) over labelled validation images."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.all() or not labels.any():
        raise TilecoreError("threshold: F1 calibration needs both normal and anomalous validation images")
    candidates = np.unique(scores)
    best, best_f1 = candidates[0], -1.0
    for t in candidates:
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        f1 = 2 * tp / (predicted.sum() + labels.sum())
        if f1 > best_f1:
            best, best_f1 = t, f1
    return float(best)


def balanced_f1_threshold(normal_scores: np.ndarray, anomalous_scores: np.ndarray) -> float:
    """The threshold maximising F1 with the two classes weighted equally (each normal counts
    len(anomalous) / len(normal)), so the operating point does not depend on how many anomalies were painted.

    The threshold lies midway between the best candidate score and the next lower score, so a normal score
    just below it is not flagged by rounding.
    """
    normal = np.asarray(normal_scores, dtype=np.float64)
    anomalous = np.asarray(anomalous_scores, dtype=np.float64)
    if len(normal) == 0 or len(anomalous) == 0:
        raise TilecoreError("threshold: balanced F1 needs both normal and anomalous scores")
    weight = len(anomalous) / len(normal)  # each normal's weight: both classes weigh len(anomalous)
    candidates = np.unique(np.concatenate([normal, anomalous]))  # ascending
    best_index, best_f1 = 0, -1.0
    for i, t in enumerate(candidates):
        tp = float(np.sum(anomalous >= t))
        fp = weight * float(np.sum(normal >= t))
        f1 = 2 * tp / (tp + fp + len(anomalous))
        if f1 > best_f1:
            best_index, best_f1 = i, f1
    if best_index == 0:
        return float(candidates[0])
    return float((candidates[best_index] + candidates[best_index - 1]) / 2)


def calibrate_threshold(
    labels: np.ndarray,
    scores: np.ndarray,
    rule: str,
    quantile: float,
    synthetic_scores: np.ndarray | None = None,
) -> tuple[float, str]:
    """(threshold, how) from validation scores.

    `f1`: F1 over labelled (real) anomalous and normal validation images. `synthetic`: balanced F1 between
    the normal validation scores and `synthetic_scores`, the scores of synthetic defects painted into those
    normals (train.fit). `quantile`: a quantile of the normal scores. `auto`: f1 when anomalous validation
    images exist, else synthetic when synthetic scores were given, else the quantile.
    """
    if rule not in THRESHOLD_RULES:
        raise TilecoreError(f"threshold rule {rule!r}: expected one of {', '.join(THRESHOLD_RULES)}")
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores)
    if rule == "f1" or (rule == "auto" and labels.any() and not labels.all()):
        return f1_threshold(labels, scores), "f1"
    has_synthetic = synthetic_scores is not None and len(synthetic_scores) > 0
    if rule == "synthetic" and not has_synthetic:
        raise TilecoreError("threshold rule 'synthetic': no synthetic anomaly scores to calibrate on")
    if rule == "synthetic" or (rule == "auto" and has_synthetic):
        normal = scores[~labels]
        threshold = balanced_f1_threshold(normal, np.asarray(synthetic_scores))
        return threshold, f"synthetic balanced f1 ({len(normal)} normal, {len(synthetic_scores)} synthetic)"
    return quantile_threshold(scores[~labels], quantile), f"quantile {quantile}"
