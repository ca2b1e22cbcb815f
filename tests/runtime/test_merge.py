"""Per-tile outputs to image outputs, and members to the ensemble, against hand-worked numbers."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from tilecore.runtime.calibration import NormalStats
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.merge import (
    MemberCalibration,
    MergeRule,
    TileOutputs,
    ensemble_result,
    member_result,
    merge_tiles,
    tile_outputs,
)
from tilecore.runtime.tiling import single_tile, tile_grid

# One row of two side-by-side 4 x 4 tiles, no overlap: the left half of the image is tile 0, the right tile 1.
PAIR = tile_grid((4, 8), (4, 4), (4, 4))
NO_SEAMS = {"seam_band": 0.0}  # seam smoothing off, so merged maps can be checked exactly


def pair_outputs(scores: list[float], levels: list[float]) -> TileOutputs:
    """One image on PAIR: tile scores and constant tile maps."""
    maps = np.stack([np.full((4, 4), v, dtype=np.float32) for v in levels])[None]
    return TileOutputs(np.array([scores], dtype=np.float32), maps)


def halves(left: float, right: float) -> np.ndarray:
    return np.concatenate([np.full((4, 4), left), np.full((4, 4), right)], axis=1)


def bilinear_half_pixel(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), written out per output pixel."""
    h, w = grid.shape
    out = np.empty((height, width))
    for i in range(height):
        y = min(max((i + 0.5) * h / height - 0.5, 0.0), h - 1)
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(width):
            x = min(max((j + 0.5) * w / width - 0.5, 0.0), w - 1)
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
            bottom = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


# --- MergeRule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("image_score", "median"), ("normalisation", "pixel")])
def test_merge_rule_refuses_unknown_values(field: str, value: str) -> None:
    with pytest.raises(TilecoreError, match=field):
        MergeRule(**{field: value})


def test_merge_rule_refuses_unknown_fusion() -> None:
    with pytest.raises(TilecoreError, match="fusion"):
        MergeRule(fusion="median")


def test_merge_rule_defaults() -> None:
    rule = MergeRule()
    assert (rule.image_score, rule.normalisation, rule.fusion) == ("mean", "image", "mean")
    assert rule.to_dict()["seam_band"] == pytest.approx(0.1)


# --- tile_outputs ------------------------------------------------------------------------------------------


def test_tile_outputs_hand_worked_upsampling() -> None:
    grid = tile_grid((4, 8), (4, 4), (4, 4))
    patch = np.array([[0.0, 1.0], [0.0, 1.0]])
    patch_scores = np.stack([patch, 2 * patch])[None]  # [B=1, T=2, 2, 2]
    out = tile_outputs(patch_scores, np.array([[1.0, 2.0]]), grid, sigma=0)
    # half-pixel centres: output x = 0..3 samples input x = -0.25, 0.25, 0.75, 1.25 -> 0, 0.25, 0.75, 1 (clamped)
    np.testing.assert_allclose(out.maps[0, 0], np.tile([0.0, 0.25, 0.75, 1.0], (4, 1)), atol=1e-6)
    np.testing.assert_allclose(out.maps[0, 1], np.tile([0.0, 0.5, 1.5, 2.0], (4, 1)), atol=1e-6)
    np.testing.assert_array_equal(out.scores, [[1.0, 2.0]])
    assert out.scores.dtype == np.float32 and out.maps.dtype == np.float32


def test_tile_outputs_maps_at_tile_size_with_blur() -> None:
    grid = tile_grid((40, 60), (20, 30), (10, 15))  # 3 x 3 tiles of 20 x 30
    rng = np.random.default_rng(0)
    patch_scores = rng.random((2, grid.count, 5, 6)).astype(np.float32)
    out = tile_outputs(patch_scores, rng.random((2, grid.count)), grid, sigma=2.0)
    assert out.maps.shape == (2, 9, 20, 30)
    assert out.scores.shape == (2, 9)
    for b, t in [(0, 0), (1, 4), (1, 8)]:
        expected = gaussian_filter(bilinear_half_pixel(patch_scores[b, t], 20, 30), 2.0, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(out.maps[b, t], expected, atol=1e-5)


# --- merge_tiles -------------------------------------------------------------------------------------------


def nine_tiles(scores: list[float]) -> TileOutputs:
    maps = np.stack([np.full((4, 4), 1.0, dtype=np.float32)] * 9)[None]
    return TileOutputs(np.array([scores], dtype=np.float32), maps)


def test_mean_image_score_dilutes_one_anomalous_tile_of_nine() -> None:
    grid = tile_grid((12, 12), (4, 4), (4, 4))
    outputs = nine_tiles([0.0] * 4 + [9.0] + [0.0] * 4)
    mean_score, _ = merge_tiles(outputs, grid, MergeRule(image_score="mean"))
    max_score, _ = merge_tiles(outputs, grid, MergeRule(image_score="max"))
    np.testing.assert_allclose(mean_score, [1.0])  # 9 / 9
    np.testing.assert_allclose(max_score, [9.0])


def test_image_scores_per_batch_item() -> None:
    grid = tile_grid((8, 8), (4, 4), (4, 4))
    scores = np.array([[1.0, 2.0, 3.0, 6.0], [-1.0, -2.0, -3.0, -6.0]], dtype=np.float32)
    outputs = TileOutputs(scores, np.zeros((2, 4, 4, 4), dtype=np.float32))
    np.testing.assert_allclose(merge_tiles(outputs, grid, MergeRule(image_score="mean"))[0], [3.0, -3.0])
    np.testing.assert_allclose(merge_tiles(outputs, grid, MergeRule(image_score="max"))[0], [6.0, -1.0])


def test_merged_maps_average_overlaps() -> None:
    grid = tile_grid((6, 10), (4, 4), (2, 3))  # 2 x 3 tiles at y 0, 2 and x 0, 3, 6
    levels = np.arange(1.0, 7.0)
    maps = np.stack([np.full((4, 4), v) for v in levels])[None].astype(np.float32)
    _, merged = merge_tiles(TileOutputs(np.zeros((1, 6), np.float32), maps), grid, MergeRule(**NO_SEAMS))
    total, count = np.zeros((6, 10)), np.zeros((6, 10))
    for k, (y, x) in enumerate([(y, x) for y in (0, 2) for x in (0, 3, 6)]):
        total[y : y + 4, x : x + 4] += levels[k]
        count[y : y + 4, x : x + 4] += 1
    assert merged.shape == (1, 6, 10)
    np.testing.assert_allclose(merged[0], total / count, rtol=1e-6)


def test_merged_constant_maps_stay_constant_with_seam_smoothing() -> None:
    grid = tile_grid((32, 32), (16, 16), (8, 8))
    maps = np.full((2, grid.count, 16, 16), 0.75, dtype=np.float32)
    _, merged = merge_tiles(TileOutputs(np.zeros((2, grid.count), np.float32), maps), grid, MergeRule(seam_sigma=2.0))
    assert merged.shape == (2, 32, 32)
    np.testing.assert_allclose(merged, 0.75, rtol=1e-6)


@pytest.mark.parametrize("image_score", ["mean", "max"])
def test_single_tile_grid_passes_outputs_through(image_score: str) -> None:
    rng = np.random.default_rng(1)
    scores = np.array([[0.7], [0.2]], dtype=np.float32)
    maps = rng.random((2, 1, 8, 6)).astype(np.float32)
    merged_scores, merged_maps = merge_tiles(TileOutputs(scores, maps), single_tile((8, 6)), MergeRule(image_score))
    np.testing.assert_array_equal(merged_scores, scores[:, 0])
    np.testing.assert_array_equal(merged_maps, maps[:, 0])


# --- member_result -----------------------------------------------------------------------------------------

PER_LOCATION = [
    NormalStats(image_mean=1.0, image_std=2.0, pixel_mean=1.0, pixel_std=1.0),
    NormalStats(image_mean=10.0, image_std=5.0, pixel_mean=4.0, pixel_std=2.0),
]
IMAGE_STATS = NormalStats(image_mean=5.0, image_std=2.0, pixel_mean=3.0, pixel_std=0.5)
CALIBRATION = MemberCalibration(PER_LOCATION, IMAGE_STATS)


@pytest.mark.parametrize(
    ("image_score", "expected_score"),
    [("mean", 0.5), ("max", 1.0)],  # z per tile: (3 - 1) / 2 = 1, (10 - 10) / 5 = 0
)
def test_member_tile_normalisation(image_score: str, expected_score: float) -> None:
    rule = MergeRule(image_score=image_score, normalisation="tile", **NO_SEAMS)
    scores, maps = member_result(pair_outputs([3.0, 10.0], [2.0, 6.0]), PAIR, rule, CALIBRATION)
    np.testing.assert_allclose(scores, [expected_score], rtol=1e-6)
    np.testing.assert_allclose(maps[0], halves((2 - 1) / 1, (6 - 4) / 2), rtol=1e-6)


@pytest.mark.parametrize(
    ("image_score", "expected_score"),
    [("mean", 0.75), ("max", 2.5)],  # mean (3 + 10) / 2 = 6.5 -> (6.5 - 5) / 2; max 10 -> (10 - 5) / 2
)
def test_member_image_normalisation(image_score: str, expected_score: float) -> None:
    rule = MergeRule(image_score=image_score, normalisation="image", **NO_SEAMS)
    scores, maps = member_result(pair_outputs([3.0, 10.0], [2.0, 6.0]), PAIR, rule, CALIBRATION)
    np.testing.assert_allclose(scores, [expected_score], rtol=1e-6)
    np.testing.assert_allclose(maps[0], halves((2 - 3) / 0.5, (6 - 3) / 0.5), rtol=1e-6)


def test_member_geometric_normalisation_uses_ratios() -> None:
    outputs = pair_outputs([3.0, 10.0], [2.0, 6.0])
    tile_rule = MergeRule(normalisation="tile", fusion="geometric", **NO_SEAMS)
    scores, maps = member_result(outputs, PAIR, tile_rule, CALIBRATION)
    np.testing.assert_allclose(scores, [(3 / 1 + 10 / 10) / 2], rtol=1e-6)
    np.testing.assert_allclose(maps[0], halves(2 / 1, 6 / 4), rtol=1e-6)
    image_rule = MergeRule(normalisation="image", fusion="geometric", **NO_SEAMS)
    scores, maps = member_result(outputs, PAIR, image_rule, CALIBRATION)
    np.testing.assert_allclose(scores, [6.5 / 5], rtol=1e-6)
    np.testing.assert_allclose(maps[0], halves(2 / 3, 6 / 3), rtol=1e-6)


def test_member_tile_normalisation_refuses_mismatched_calibration() -> None:
    short = MemberCalibration(PER_LOCATION[:1], IMAGE_STATS)
    rule = MergeRule(normalisation="tile", **NO_SEAMS)
    with pytest.raises(TilecoreError, match="statistics for 1 tile locations, the grid has 2"):
        member_result(pair_outputs([3.0, 10.0], [2.0, 6.0]), PAIR, rule, short)


def test_member_calibration_round_trip() -> None:
    assert MemberCalibration.from_dict(CALIBRATION.to_dict()) == CALIBRATION


# --- ensemble_result ---------------------------------------------------------------------------------------

MEMBER_A = pair_outputs([2.0, 6.0], [1.0, 3.0])
MEMBER_B = pair_outputs([5.0, 1.0], [4.0, 1.0])
CAL_A = MemberCalibration(PER_LOCATION, NormalStats(image_mean=2.0, image_std=2.0, pixel_mean=1.0, pixel_std=1.0))
CAL_B = MemberCalibration(PER_LOCATION, NormalStats(image_mean=1.0, image_std=1.0, pixel_mean=2.0, pixel_std=2.0))


@pytest.mark.parametrize(
    ("fusion", "expected_score", "left", "right"),
    [
        # image score = max tile score; A: 6 -> (6 - 2) / 2 = 2, maps (1 - 1) / 1 = 0 | (3 - 1) / 1 = 2
        #                              B: 5 -> (5 - 1) / 1 = 4, maps (4 - 2) / 2 = 1 | (1 - 2) / 2 = -0.5
        ("mean", 3.0, 0.5, 0.75),
        ("max", 4.0, 1.0, 2.0),
        # ratios: A: 6 / 2 = 3, maps 1 / 1 = 1 | 3 / 1 = 3; B: 5 / 1 = 5, maps 4 / 2 = 2 | 1 / 2 = 0.5
        ("geometric", np.sqrt(15.0), np.sqrt(2.0), np.sqrt(1.5)),
    ],
)
def test_ensemble_fuses_two_members(fusion: str, expected_score: float, left: float, right: float) -> None:
    rule = MergeRule(image_score="max", normalisation="image", fusion=fusion, **NO_SEAMS)
    scores, maps = ensemble_result([MEMBER_A, MEMBER_B], PAIR, rule, [CAL_A, CAL_B])
    assert scores.shape == (1,) and maps.shape == (1, 4, 8)
    np.testing.assert_allclose(scores, [expected_score], rtol=1e-6)
    np.testing.assert_allclose(maps[0], halves(left, right), rtol=1e-6)


def test_ensemble_with_tile_normalisation() -> None:
    # both members use PER_LOCATION; A z-scores: (2 - 1) / 2 = 0.5, (6 - 10) / 5 = -0.8 -> mean -0.15
    #                                 B z-scores: (5 - 1) / 2 = 2, (1 - 10) / 5 = -1.8 -> mean 0.1
    # maps A: (1 - 1) / 1 = 0 | (3 - 4) / 2 = -0.5;  B: (4 - 1) / 1 = 3 | (1 - 4) / 2 = -1.5
    rule = MergeRule(image_score="mean", normalisation="tile", fusion="mean", **NO_SEAMS)
    scores, maps = ensemble_result([MEMBER_A, MEMBER_B], PAIR, rule, [CAL_A, CAL_B])
    np.testing.assert_allclose(scores, [(-0.15 + 0.1) / 2], rtol=1e-5)
    np.testing.assert_allclose(maps[0], halves(1.5, -1.0), rtol=1e-6)


def test_ensemble_of_one_member_is_that_member() -> None:
    rule = MergeRule(image_score="max", fusion="mean", **NO_SEAMS)
    scores, maps = ensemble_result([MEMBER_A], PAIR, rule, [CAL_A])
    np.testing.assert_allclose(scores, [2.0], rtol=1e-6)  # (6 - 2) / 2
    np.testing.assert_allclose(maps[0], halves(0.0, 2.0), atol=1e-6)


def test_ensemble_needs_one_calibration_per_member() -> None:
    with pytest.raises(ValueError, match="shorter"):  # zip(..., strict=True): one calibration is missing
        ensemble_result([MEMBER_A, MEMBER_B], PAIR, MergeRule(), [CAL_A])
