"""The batched map and merge paths against the per-tile, per-image code they replaced (kept here, not in the
package): OpenCV resize + blur per tile, untiling one image at a time, seams blurred over the whole map.

Tolerances: the tile maps are float32 matrix products instead of OpenCV's float32 filters, so they differ by
float32 rounding: atol 1e-5 on maps of values up to 5 (observed: about 2e-6). Untiling sums in float64 as
before and is compared exactly. Seam strips run the same OpenCV filter on part of the map: atol 1e-6.
"""

import cv2
import numpy as np
import pytest

from tilecore.runtime.anomaly_map import axis_operator, batch_to_maps, blur_kernel_size
from tilecore.runtime.anomaly_map import patch_scores_to_map as slow_tile_map  # one tile at a time, in OpenCV
from tilecore.runtime.calibration import NormalStats, fuse, normalise_outputs
from tilecore.runtime.merge import MemberCalibration, MergeRule, TileOutputs, ensemble_result, merge_tiles, tile_outputs
from tilecore.runtime.tiling import seam_band_mask, smooth_seams_batch, tile_grid, untile_mean, untile_mean_batch

MAP_ATOL = 1e-5
SEAM_ATOL = 1e-6

# (image, tile, stride): ENS9's geometry scaled down, no overlap, padding at the bottom/right, stride 1
GRIDS = [
    ((64, 64), (32, 32), (16, 16)),
    ((48, 64), (16, 16), (16, 16)),
    ((50, 44), (20, 16), (10, 12)),
    ((9, 10), (4, 3), (1, 2)),
]


def slow_untile(tiles: np.ndarray, grid) -> np.ndarray:
    """The former untile_mean: one image's tiles [T, th, tw] summed into the padded map in float64."""
    total = np.zeros((grid.padded_h, grid.padded_w), dtype=np.float64)
    count = np.zeros((grid.padded_h, grid.padded_w), dtype=np.float64)
    for tile, (r, c) in zip(tiles, grid.locations(), strict=True):
        y, x = grid.origin(r, c)
        total[y : y + grid.tile_h, x : x + grid.tile_w] += tile
        count[y : y + grid.tile_h, x : x + grid.tile_w] += 1.0
    return (total / count)[: grid.image_h, : grid.image_w].astype(np.float32)


def slow_seams(image_map: np.ndarray, grid, band: float, sigma: float) -> np.ndarray:
    """The former smooth_seams: blur the whole map, keep the blurred values in the band mask."""
    if band <= 0 or sigma <= 0 or grid.count == 1:
        return image_map
    size = blur_kernel_size(sigma)
    blurred = cv2.GaussianBlur(image_map, (size, size), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    return np.where(seam_band_mask(grid, band), blurred, image_map).astype(np.float32)


@pytest.mark.parametrize(
    ("patch_hw", "map_hw", "sigma"),
    [
        ((32, 32), (256, 256), 4.0),  # ENS9's tiles
        ((8, 6), (64, 48), 2.3),
        ((3, 5), (17, 9), 1.5),  # uneven scale factors
        ((4, 4), (4, 4), 4.0),  # kernel longer than the map: reflected again, as OpenCV does
        ((1, 1), (7, 7), 4.0),
        ((5, 5), (3, 3), 1.0),  # shrinking
        ((2, 2), (40, 30), 0.0),  # no blur
    ],
)
def test_batched_maps_equal_opencv_per_tile(patch_hw, map_hw, sigma) -> None:
    scores = np.random.default_rng(0).uniform(0, 5, size=(6, *patch_hw)).astype(np.float32)
    fast = batch_to_maps(scores, *map_hw, sigma)
    slow = np.stack([slow_tile_map(s, *map_hw, sigma) for s in scores])
    assert fast.shape == slow.shape and fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, atol=MAP_ATOL, rtol=0)
    assert not np.allclose(fast[0], fast[1])  # distinct inputs stay distinct: nothing mixed across the batch


def test_axis_operator_rows_sum_to_one_and_are_read_only() -> None:
    operator = axis_operator(32, 256, 4.0)  # [256, 32]
    np.testing.assert_allclose(operator.sum(axis=1), 1.0, atol=1e-6)  # a constant map stays constant
    assert not operator.flags.writeable  # shared through the cache


@pytest.mark.parametrize(("image", "tile", "stride"), GRIDS)
def test_batched_untile_equals_per_image_untile_exactly(image, tile, stride) -> None:
    grid = tile_grid(image, tile, stride)
    tiles = np.random.default_rng(1).normal(size=(3, grid.count, *tile)).astype(np.float32)
    fast = untile_mean_batch(tiles, grid)
    assert fast.shape == (3, *image) and fast.dtype == np.float32
    for b in range(3):
        np.testing.assert_array_equal(fast[b], slow_untile(tiles[b], grid))
        np.testing.assert_array_equal(untile_mean(tiles[b], grid), fast[b])


@pytest.mark.parametrize(("image", "tile", "stride"), GRIDS)
@pytest.mark.parametrize(("band", "sigma"), [(0.1, 4.0), (0.25, 1.0), (0.5, 2.5), (0.05, 0.5)])
def test_seam_strips_equal_blurring_the_whole_map(image, tile, stride, band, sigma) -> None:
    grid = tile_grid(image, tile, stride)
    maps = np.random.default_rng(2).random((2, *image)).astype(np.float32)
    fast = smooth_seams_batch(maps, grid, band, sigma)
    for b in range(2):
        slow = slow_seams(maps[b], grid, band, sigma)
        np.testing.assert_allclose(fast[b], slow, atol=SEAM_ATOL, rtol=0)
        outside = ~seam_band_mask(grid, band)
        np.testing.assert_array_equal(fast[b][outside], maps[b][outside])  # untouched outside the bands


def test_seam_strips_on_random_grids() -> None:
    rng = np.random.default_rng(3)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(4, 60, 2))
        th, tw = int(rng.integers(2, h + 1)), int(rng.integers(2, w + 1))
        grid = tile_grid((h, w), (th, tw), (int(rng.integers(1, th + 1)), int(rng.integers(1, tw + 1))))
        band, sigma = float(rng.choice([0.05, 0.2, 0.5])), float(rng.choice([0.5, 1.5, 4.0]))
        image_map = rng.random((1, h, w)).astype(np.float32)
        fast = smooth_seams_batch(image_map, grid, band, sigma)[0]
        np.testing.assert_allclose(fast, slow_seams(image_map[0], grid, band, sigma), atol=SEAM_ATOL, rtol=0)


def slow_merge(outputs: TileOutputs, grid, rule: MergeRule) -> np.ndarray:
    return np.stack([slow_seams(slow_untile(m, grid), grid, rule.seam_band, rule.seam_sigma) for m in outputs.maps])


@pytest.mark.parametrize("normalisation", ["image", "tile"])
@pytest.mark.parametrize("fusion", ["mean", "max", "geometric"])
def test_member_to_ensemble_equals_the_per_tile_path(normalisation: str, fusion: str) -> None:
    grid = tile_grid((64, 64), (32, 32), (16, 16))  # 3 x 3 tiles of 32 every 16: ENS9 at an eighth
    rule = MergeRule(normalisation=normalisation, fusion=fusion, blur_sigma=1.5, seam_band=0.2, seam_sigma=2.0)
    rng = np.random.default_rng(4)
    patches = rng.uniform(1, 5, size=(2, grid.count, 4, 4)).astype(np.float32)  # [B, T, h, w]
    scores = patches.max(axis=(2, 3))
    outputs = tile_outputs(patches, scores, grid, rule.blur_sigma)
    slow_maps = np.stack([[slow_tile_map(p, 32, 32, rule.blur_sigma) for p in image] for image in patches])
    np.testing.assert_allclose(outputs.maps, slow_maps, atol=MAP_ATOL, rtol=0)

    merged_scores, merged = merge_tiles(outputs, grid, rule)
    np.testing.assert_allclose(merged, slow_merge(outputs, grid, rule), atol=SEAM_ATOL, rtol=0)
    np.testing.assert_allclose(merged_scores, scores.mean(axis=1), rtol=1e-6)

    stats = [NormalStats(2.0 + 0.1 * j, 0.5, 2.5, 0.7 + 0.05 * j) for j in range(grid.count)]
    calibration = MemberCalibration(stats, NormalStats(3.0, 0.4, 2.8, 0.6))
    one_scores, one_maps = ensemble_result([outputs], grid, rule, [calibration])  # one member: no fusion pass
    if normalisation == "tile":
        normalised = [normalise_outputs(scores[:, j], outputs.maps[:, j], s, fusion) for j, s in enumerate(stats)]
        tile_scores = np.stack([n[0] for n in normalised], axis=1)
        tile_maps = np.stack([n[1] for n in normalised], axis=1)
        expected_scores = tile_scores.mean(axis=1)
        expected_maps = slow_merge(TileOutputs(tile_scores, tile_maps), grid, rule)
    else:
        expected_scores, expected_maps = normalise_outputs(scores.mean(axis=1), merged, calibration.image, fusion)
    np.testing.assert_allclose(one_scores, fuse([expected_scores], fusion), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one_maps, fuse([expected_maps], fusion), rtol=1e-5, atol=1e-5)
    assert one_scores.dtype == np.float32 and one_maps.dtype == np.float32

    two_scores, two_maps = ensemble_result([outputs, outputs], grid, rule, [calibration, calibration])
    np.testing.assert_allclose(two_scores, one_scores, rtol=1e-6)  # fusing a member with itself changes nothing
    np.testing.assert_allclose(two_maps, one_maps, rtol=1e-6, atol=1e-6)
