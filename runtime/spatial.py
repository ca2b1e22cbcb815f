"""Spatial early exit for tiled ensembles: a coarse single-tile model decides which fine tiles run.

The coarse stage is one member that sees the whole image resized to its backbone input (e.g. preset
SM256 beside ENS9). Its anomaly map [B, H, W] at image size, normalised with its own image-level pixel
statistics, is the z-map. For each fine tile location j, c[i, j] is the z-map's max over tile j's region
(clipped to the image). Only the (image, location) pairs with c >= tile_threshold go through the fine
members' engines and kNN; a skipped pair gets, for each fine member, a substitute raw tile output that
looks like a normal tile there: tile score = the location's normal mean, tile map = the location's normal
pixel mean + pixel std x the coarse z-map's crop of that tile. Then the ensemble merges as usual
(runtime.merge.ensemble_result). With tile_threshold = -inf every tile runs and the result is the full
ensemble's exactly.

The threshold is calibrated at export (export.coarse, never test data) on the fine run's validation
images and the synthetic defects painted into them: the largest candidate whose labels agree with the
full ensemble's on a target share of those images (`calibrate_gate`), lowered by a margin. `run_spatial`
and `spatial_member_outputs` are the one scoring loop; the runtime (Predictor) and export's PyTorch
computation both call them, with their own way of computing a fine tile's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from tilecore.runtime.calibration import NormalStats, normalise
from tilecore.runtime.cascade import DEFAULT_AGREEMENT, DEFAULT_MARGIN
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.merge import MemberCalibration, MergeRule, TileOutputs, ensemble_result
from tilecore.runtime.stage_timer import StageTimer
from tilecore.runtime.tiling import TileGrid, cut_tiles

# fine_outputs(member, location, batch positions) -> (raw tile scores [n], raw tile maps [n, th, tw])
FineOutputs = Callable[[int, int, list[int]], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class GateScores:
    """What a gate is calibrated on, kept in the bundle so that `tilecore calibrate` can refit it (refit_gate):
    per calibration image, the coarse maxima c, whether it is normal, and each fine member's raw tile scores."""

    maxima: tuple[tuple[float, ...], ...]  # [N][T]
    normal: tuple[bool, ...]  # [N]
    tile_scores: tuple[tuple[tuple[float, ...], ...], ...]  # [M][N][T]

    @classmethod
    def of(cls, maxima: np.ndarray, normal: np.ndarray, tile_scores: list[np.ndarray]) -> GateScores:
        return cls(
            tuple(map(tuple, np.asarray(maxima, dtype=np.float64).tolist())),
            tuple(bool(v) for v in normal),
            tuple(tuple(map(tuple, np.asarray(t, dtype=np.float64).tolist())) for t in tile_scores),
        )

    def arrays(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(maxima [N, T], normal [N], tile scores [M] x [N, T]) as arrays."""
        return (np.asarray(self.maxima, dtype=np.float32), np.asarray(self.normal, dtype=bool),
                [np.asarray(t, dtype=np.float32) for t in self.tile_scores])  # fmt: skip

    def to_dict(self) -> dict:
        return {"maxima": [list(r) for r in self.maxima], "normal": list(self.normal),
                "tile_scores": [[list(r) for r in m] for m in self.tile_scores]}  # fmt: skip


@dataclass(frozen=True)
class TileGate:
    """The coarse stage's rule (a fine tile runs when c >= tile_threshold) and what it did at calibration."""

    tile_threshold: float  # on the coarse z-map's max over a tile; -inf: every tile runs
    target_agreement: float
    margin: float  # the threshold was lowered by margin x std of c over the normal calibration images
    agreement: float  # share of calibration images whose label equals the full ensemble's
    tile_share: float  # share of the calibration images' (image, location) pairs that ran the fine members
    calibration_images: int  # normal validation images + synthetic defects (+ a line's good images)
    scores: GateScores | None = None  # export's calibration images, for refit_gate; None: not recorded

    def to_dict(self) -> dict:
        threshold = self.tile_threshold if math.isfinite(self.tile_threshold) else None  # JSON has no -inf
        return {
            "tile_threshold": threshold,
            "target_agreement": self.target_agreement,
            "margin": self.margin,
            "agreement": self.agreement,
            "tile_share": self.tile_share,
            "calibration_images": self.calibration_images,
            "gate_scores": None if self.scores is None else self.scores.to_dict(),
        }


def coarse_zmaps(maps: np.ndarray, stats: NormalStats) -> np.ndarray:
    """The coarse member's raw maps [B, H, W] -> z-maps [B, H, W] with its image-level pixel statistics
    (a standard score whatever the fusion rule: the substitutes scale it back with each location's spread)."""
    return normalise(np.asarray(maps, dtype=np.float32), stats.pixel_mean, stats.pixel_std, "mean")


def coarse_tile_maxima(z_maps: np.ndarray, grid: TileGrid) -> np.ndarray:
    """z_maps [B, H, W] -> c [B, T]: the max over each fine tile's region, clipped to the image."""
    b, h, w = z_maps.shape
    if (h, w) != (grid.image_h, grid.image_w):
        raise TilecoreError(f"coarse stage: map {h}x{w} does not match the grid's {grid.image_h}x{grid.image_w}")
    maxima = np.empty((b, grid.count), dtype=np.float32)
    for j, (r, c) in enumerate(grid.locations()):
        y, x = grid.origin(r, c)
        maxima[:, j] = z_maps[:, y : y + grid.tile_h, x : x + grid.tile_w].max(axis=(1, 2))
    return maxima


def tile_selection(maxima: np.ndarray, tile_threshold: float) -> np.ndarray:
    """bool [B, T]: the (image, location) pairs the fine members run."""
    return np.asarray(maxima) >= tile_threshold


def substitute_outputs(z_maps: np.ndarray, grid: TileGrid, calibration: MemberCalibration) -> TileOutputs:
    """One fine member's stand-in raw outputs for every tile of a batch: scores [B, T] = each location's
    normal mean, maps [B, T, th, tw] = the location's pixel mean + pixel std x the z-map's crop of the tile
    (zero padded outside the image, as tiles are cut)."""
    b = len(z_maps)
    stats = calibration.per_location
    if len(stats) != grid.count:
        raise TilecoreError(f"coarse stage: statistics for {len(stats)} tile locations, the grid has {grid.count}")
    crops = np.stack([cut_tiles(z[None], grid)[:, 0] for z in z_maps]) if b else np.zeros((0, grid.count, 1, 1))
    means = np.array([s.image_mean for s in stats], dtype=np.float32)
    pixel_mean = np.array([s.pixel_mean for s in stats], dtype=np.float32)[None, :, None, None]
    pixel_std = np.array([s.pixel_std for s in stats], dtype=np.float32)[None, :, None, None]
    scores = np.broadcast_to(means, (b, grid.count)).copy()
    maps = (pixel_mean + pixel_std * crops.reshape(b, grid.count, grid.tile_h, grid.tile_w)).astype(np.float32)
    return TileOutputs(scores, maps)


def spatial_member_outputs(
    member: int,
    positions: list[int],
    z_maps: np.ndarray,
    selection: np.ndarray,
    grid: TileGrid,
    calibration: MemberCalibration,
    fine_outputs: FineOutputs,
) -> TileOutputs:
    """Fine member `member`'s raw TileOutputs for the batch positions `positions`: its own outputs where
    `selection` [B, T] says a pair runs (fine_outputs, one call per location with the selected images),
    substitutes elsewhere. What runtime.cascade.run_cascade asks a member for, when both stages are on."""
    outputs = substitute_outputs(z_maps[positions], grid, calibration)
    chosen_rows = np.asarray(selection)[positions]  # [n, T]
    for j in range(grid.count):
        rows = np.flatnonzero(chosen_rows[:, j])
        if len(rows):
            scores, maps = fine_outputs(member, j, [positions[k] for k in rows])  # [n'], [n', th, tw]
            outputs.scores[rows, j], outputs.maps[rows, j] = scores, maps
    return outputs


def run_spatial(
    count: int,
    z_maps: np.ndarray,
    fine_outputs: FineOutputs,
    selection: np.ndarray,
    grid: TileGrid,
    rule: MergeRule,
    calibrations: list[MemberCalibration],
    timer: StageTimer | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Score a batch of `count` images: every fine member's outputs on the selected pairs, substitutes on
    the rest, merged and fused as the full ensemble is -> (scores [B], maps [B, H, W], tiles_run [B]: the
    fine tile locations each image ran)."""
    timer = timer or StageTimer()
    positions = list(range(count))
    raw = [
        spatial_member_outputs(m, positions, z_maps, selection, grid, c, fine_outputs)
        for m, c in enumerate(calibrations)
    ]
    with timer("merge"):
        scores, maps = ensemble_result(raw, grid, rule, calibrations)
    return scores, maps, np.asarray(selection).sum(axis=1).astype(np.int64)


def score_grid(grid: TileGrid, rule: MergeRule) -> tuple[TileGrid, MergeRule]:
    """The same tile locations with 1-pixel tiles, and the rule without map smoothing: image scores read
    tile scores only, so ensemble_result's scores on these equal the real grid's at a fraction of the cost
    (what calibration searches thresholds with)."""
    return TileGrid(grid.rows, grid.cols, 1, 1, 1, 1), replace(rule, blur_sigma=0.0, seam_band=0.0)


def spatial_scores(
    tile_scores: list[np.ndarray],
    maxima: np.ndarray,
    tile_threshold: float,
    grid: TileGrid,
    rule: MergeRule,
    calibrations: list[MemberCalibration],
) -> np.ndarray:
    """Fused image scores [N] with the gate at `tile_threshold`, from each fine member's raw tile scores
    [N, T] and the coarse maxima c [N, T] (run_spatial on the score grid: no maps needed)."""
    small, small_rule = score_grid(grid, rule)
    count = len(maxima)

    def fine(member: int, location: int, positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return tile_scores[member][positions, location], np.zeros((len(positions), 1, 1), dtype=np.float32)

    flat = np.zeros((count, small.image_h, small.image_w), dtype=np.float32)  # substitutes' maps: unused
    selection = tile_selection(maxima, tile_threshold)
    return run_spatial(count, flat, fine, selection, small, small_rule, calibrations)[0]


def calibrate_gate(
    maxima: np.ndarray,
    normal: np.ndarray,
    full_labels: np.ndarray,
    labels_at: Callable[[float], np.ndarray],
    target_agreement: float = DEFAULT_AGREEMENT,
    margin: float = DEFAULT_MARGIN,
) -> TileGate:
    """The gate from the calibration images' coarse maxima c [N, T], which of them are normal [N] and the
    full ensemble's labels [N]. `labels_at(t)`: the spatial cascade's labels [N] at threshold t.

    Candidates are the sorted unique c values and -inf (every tile runs, the full ensemble's labels
    exactly); the largest whose agreement reaches the target is lowered by `margin` standard deviations of
    c over the normal images' pairs. Agreement need not grow as the threshold falls (a stand-in tile can
    push a score either way), so the lowered threshold must reach the target too: if it does not, the
    largest candidate below it that does is taken, down to -inf."""
    maxima = np.asarray(maxima, dtype=np.float32)
    full_labels = np.asarray(full_labels, dtype=bool)
    if not 0.0 < target_agreement <= 1.0:
        raise TilecoreError(f"coarse stage agreement {target_agreement}: expected 0 < value <= 1")
    if margin < 0:
        raise TilecoreError(f"coarse stage margin {margin}: expected >= 0")
    chosen = -math.inf
    for candidate in np.unique(maxima)[::-1]:  # largest first: the first that keeps the labels wins
        if float(np.mean(labels_at(float(candidate)) == full_labels)) >= target_agreement:
            chosen = float(candidate)
            break
    normal_maxima = maxima[np.asarray(normal, dtype=bool)]
    spread = float(np.std(normal_maxima)) if normal_maxima.size else 0.0
    threshold = chosen - margin * spread if math.isfinite(chosen) else -math.inf
    agreement = float(np.mean(labels_at(threshold) == full_labels))
    if agreement < target_agreement:  # the margin moved it onto a threshold that misses the target
        below = [float(c) for c in np.unique(maxima)[::-1] if c < threshold]
        threshold = next((c for c in below if np.mean(labels_at(c) == full_labels) >= target_agreement), -math.inf)
        agreement = float(np.mean(labels_at(threshold) == full_labels))
    share = float(np.mean(tile_selection(maxima, threshold))) if maxima.size else 1.0
    return TileGate(threshold, target_agreement, margin, agreement, share, len(full_labels))


def fit_gate(
    maxima: np.ndarray,
    normal: np.ndarray,
    tile_scores: list[np.ndarray],
    threshold: float,
    grid: TileGrid,
    rule: MergeRule,
    calibrations: list[MemberCalibration],
    target_agreement: float = DEFAULT_AGREEMENT,
    margin: float = DEFAULT_MARGIN,
) -> TileGate:
    """calibrate_gate for images with coarse maxima c [N, T], normal flags [N] and each fine member's raw
    tile scores [N, T], against the full ensemble's labels at the image `threshold`."""

    def labels_at(tile_threshold: float) -> np.ndarray:
        return spatial_scores(tile_scores, maxima, tile_threshold, grid, rule, calibrations) >= threshold

    full = labels_at(-math.inf)  # every tile runs: the full ensemble's labels
    return calibrate_gate(maxima, normal, full, labels_at, target_agreement, margin)


def refit_gate(
    gate: TileGate,
    maxima: np.ndarray,
    tile_scores: np.ndarray,
    threshold: float,
    grid: TileGrid,
    rule: MergeRule,
    calibrations: list[MemberCalibration],
) -> TileGate:
    """The gate calibrated again at image `threshold` (tilecore calibrate) on export's calibration images
    (gate.scores) plus good images with coarse maxima [K, T] and raw fine tile scores [M, K, T]."""
    if gate.scores is None:
        raise TilecoreError("coarse stage: the bundle records no calibration scores to refit its gate on")
    old_maxima, old_normal, old_tiles = gate.scores.arrays()
    both = np.concatenate([old_maxima, np.asarray(maxima, dtype=np.float32)])  # [N + K, T]
    normal = np.concatenate([old_normal, np.ones(len(maxima), dtype=bool)])  # good images are normal
    tiles = [np.concatenate([old, np.asarray(new, dtype=np.float32)]) for old, new in zip(old_tiles, tile_scores,
                                                                                          strict=True)]  # fmt: skip
    fitted = fit_gate(both, normal, tiles, threshold, grid, rule, calibrations, gate.target_agreement, gate.margin)
    return replace(fitted, scores=gate.scores)
