"""From one model's per-tile outputs to image outputs, and from members' outputs to the ensemble's.

Per tile location: patch scores [h, w] -> tile map [th, tw] (bilinear upsampling + blur, as a single
PatchCore model does) and tile score (max patch score). Per image: tile maps are untiled by pixel averaging
and the seams smoothed; the image score is the mean (the paper's default), the max or the mean of the top 3
of the tile scores (IMAGE_SCORE_RULES).
Normalisation happens per tile location before merging ("tile") or per member after it ("image").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from tilecore.runtime.anomaly_map import batch_to_maps
from tilecore.runtime.calibration import FUSION_RULES, NormalStats, fuse, normalise_outputs
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.stage_timer import StageTimer
from tilecore.runtime.tiling import TileGrid, smooth_seams_batch, untile_mean_batch


def top_k_mean(k: int) -> Callable[[np.ndarray], np.ndarray]:
    """scores [B, T] -> [B]: the mean of each row's k highest (of all T when T < k)."""

    def reduce(scores: np.ndarray) -> np.ndarray:
        return np.mean(np.sort(scores, axis=1)[:, -k:], axis=1)

    return reduce


# image_score rule -> how tile scores [B, T] become image scores [B]
IMAGE_SCORE_REDUCERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda scores: np.mean(scores, axis=1),
    "max": lambda scores: np.max(scores, axis=1),
    "top3": top_k_mean(3),
}
IMAGE_SCORE_RULES = tuple(IMAGE_SCORE_REDUCERS)
NORMALISATION_LEVELS = ("image", "tile")


@dataclass(frozen=True)
class MergeRule:
    image_score: str = "mean"  # how tile scores become the image score
    normalisation: str = "image"  # where member outputs are normalised: per tile location or per image
    fusion: str = "mean"  # how members' normalised outputs are combined
    blur_sigma: float = 4.0  # per-tile map blur
    seam_band: float = 0.1  # seam band half-width, as a fraction of the tile size
    seam_sigma: float = 4.0

    def __post_init__(self) -> None:
        if self.image_score not in IMAGE_SCORE_RULES:
            raise TilecoreError(f"image_score {self.image_score!r}: expected one of {', '.join(IMAGE_SCORE_RULES)}")
        if self.fusion not in FUSION_RULES:
            raise TilecoreError(f"fusion {self.fusion!r}: expected one of {', '.join(FUSION_RULES)}")
        if self.normalisation not in NORMALISATION_LEVELS:
            raise TilecoreError(
                f"normalisation {self.normalisation!r}: expected one of {', '.join(NORMALISATION_LEVELS)}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TileOutputs:
    """Raw outputs of one model for a batch: scores [B, T] and maps [B, T, th, tw]."""

    scores: np.ndarray
    maps: np.ndarray


def tile_outputs(patch_scores: np.ndarray, tile_scores: np.ndarray, grid: TileGrid, sigma: float) -> TileOutputs:
    """patch_scores [B, T, h, w], tile_scores [B, T] -> TileOutputs with maps at tile size."""
    b, t, h, w = patch_scores.shape
    maps = batch_to_maps(patch_scores.reshape(b * t, h, w), grid.tile_h, grid.tile_w, sigma)  # [B*T, th, tw]
    return TileOutputs(tile_scores.astype(np.float32), maps.reshape(b, t, grid.tile_h, grid.tile_w))


def score_locations(
    embed: Callable[[list[int]], np.ndarray],
    scorers: list,
    grid: TileGrid,
    sigma: float,
    chunk: int,
    timer: StageTimer | None = None,
) -> TileOutputs:
    """One member's raw TileOutputs, each tile location against its own bank.

    `embed(locations)` returns the batch's patch embeddings at those locations, [B, T', h, w, D]; asking
    for `chunk` locations at a time keeps memory at a few tiles' embeddings however large the grid.
    The timer, when given, gets each bank's kNN time ("knn <bank name>") and the tile maps' ("maps").
    """
    timer = timer or StageTimer()
    patch_scores, tile_scores = [], []
    for start in range(0, grid.count, chunk):
        locations = list(range(start, min(start + chunk, grid.count)))
        embeddings = embed(locations)  # [B, T', h, w, D]
        for j, location in enumerate(locations):
            with timer(f"knn {scorers[location].name}"):
                patches, scores = scorers[location].score(embeddings[:, j])  # [B, h, w], [B]
            patch_scores.append(patches)
            tile_scores.append(scores)
    with timer("maps"):
        return tile_outputs(np.stack(patch_scores, axis=1), np.stack(tile_scores, axis=1), grid, sigma)


def merge_tiles(outputs: TileOutputs, grid: TileGrid, rule: MergeRule) -> tuple[np.ndarray, np.ndarray]:
    """TileOutputs -> (image scores [B], image maps [B, H, W])."""
    if grid.count == 1:
        return outputs.scores[:, 0], outputs.maps[:, 0, : grid.image_h, : grid.image_w]
    scores = IMAGE_SCORE_REDUCERS[rule.image_score](outputs.scores).astype(np.float32)  # [B]
    maps = smooth_seams_batch(untile_mean_batch(outputs.maps, grid), grid, rule.seam_band, rule.seam_sigma)
    return scores, maps


def normalise_tiles(outputs: TileOutputs, per_location: list[NormalStats], fusion: str) -> TileOutputs:
    """Normalise each tile location's scores and maps with that location's validation statistics."""
    if len(per_location) != outputs.scores.shape[1]:
        raise TilecoreError(
            f"calibration: statistics for {len(per_location)} tile locations, the grid has {outputs.scores.shape[1]}"
        )
    scores = np.empty_like(outputs.scores)
    maps = np.empty_like(outputs.maps)
    for j, stats in enumerate(per_location):
        scores[:, j], maps[:, j] = normalise_outputs(outputs.scores[:, j], outputs.maps[:, j], stats, fusion)
    return TileOutputs(scores, maps)


@dataclass
class MemberCalibration:
    """One member's validation statistics: per tile location and for the merged image."""

    per_location: list[NormalStats]
    image: NormalStats

    def to_dict(self) -> dict:
        return {"per_location": [s.to_dict() for s in self.per_location], "image": self.image.to_dict()}

    @classmethod
    def from_dict(cls, raw: dict) -> MemberCalibration:
        return cls([NormalStats.from_dict(s) for s in raw["per_location"]], NormalStats.from_dict(raw["image"]))


def member_result(
    outputs: TileOutputs, grid: TileGrid, rule: MergeRule, calibration: MemberCalibration
) -> tuple[np.ndarray, np.ndarray]:
    """One member's normalised (image scores [B], maps [B, H, W]) at the configured level."""
    if rule.normalisation == "tile":
        return merge_tiles(normalise_tiles(outputs, calibration.per_location, rule.fusion), grid, rule)
    scores, maps = merge_tiles(outputs, grid, rule)
    return normalise_outputs(scores, maps, calibration.image, rule.fusion)


def ensemble_result(
    members: list[TileOutputs],
    grid: TileGrid,
    rule: MergeRule,
    calibrations: list[MemberCalibration],
    member_scores: list | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All members' raw tile outputs -> fused (image scores [B], maps [B, H, W]). `member_scores`: each
    member's normalised image scores [M, B] are appended to it."""
    results = [member_result(o, grid, rule, c) for o, c in zip(members, calibrations, strict=True)]
    if member_scores is not None:
        member_scores.append(np.stack([r[0] for r in results]))  # [M, B]
    return fuse([r[0] for r in results], rule.fusion), fuse([r[1] for r in results], rule.fusion)
