"""The tile merge against a reference written here from README's rules, with numpy and scipy.ndimage only.

README "Rules training and runtime share", Maps: bilinear upsampling (half-pixel centres) of each
tile's patch scores to the tile, Gaussian blur (radius 4 sigma, SciPy's `reflect` padding), tiles
untiled by pixel averaging, then a second Gaussian applied only in a band of 10% of the tile size on
each side of every seam, both at i*stride and at i*stride + tile. The image score is the mean (or max)
of the tile scores. Nothing below calls the runtime's tiling or map helpers to build its expectation:
the parity test shares them with PyTorch and so cannot see a mistake in them. Random maps, and a seam
sigma unlike the blur sigma, so that skipping the seam pass or using the wrong sigma shows.
"""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from tilecore.runtime.calibration import NormalStats
from tilecore.runtime.knn import BankScorer
from tilecore.runtime.merge import (
    MemberCalibration,
    MergeRule,
    TileOutputs,
    ensemble_result,
    merge_tiles,
    score_locations,
    tile_outputs,
)
from tilecore.runtime.tiling import tile_grid

BLUR_SIGMA = 1.5
SEAM_SIGMA = 3.0  # unlike BLUR_SIGMA: a merge that blurs seams with the other one is caught
SEAM_BAND = 0.15

# 50 x 44 image, 20 x 16 tiles every 10 x 12: 4 x 4 tiles, padded to 50 x 52 (the last column of tiles
# reaches 8 columns past the border). Seams (tile starts and ends inside the image), worked by hand:
#   rows: starts 10, 20, 30; ends 20, 30, 40 (50 is the border)            -> 10, 20, 30, 40
#   cols: starts 12, 24, 36; ends 16, 28, 40 (52 lies outside)             -> 12, 16, 24, 28, 36, 40
# Band: round(0.15 * 20) = 3 rows and round(0.15 * 16) = 2 columns on each side of a seam.
IMAGE_HW, TILE_HW, STRIDE_HW = (50, 44), (20, 16), (10, 12)
SEAM_ROWS, SEAM_COLS = [10, 20, 30, 40], [12, 16, 24, 28, 36, 40]
BAND_ROWS, BAND_COLS = 3, 2


def tile_origins(image_hw, tile_hw, stride_hw) -> list[tuple[int, int]]:
    """(y, x) of every tile, row-major: origins every stride until a tile reaches the border."""
    ys = [0]
    while ys[-1] + tile_hw[0] < image_hw[0]:
        ys.append(ys[-1] + stride_hw[0])
    xs = [0]
    while xs[-1] + tile_hw[1] < image_hw[1]:
        xs.append(xs[-1] + stride_hw[1])
    return [(y, x) for y in ys for x in xs]


def bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] -> [height, width]: half-pixel centres, source coordinates clamped to the grid (float64)."""
    h, w = grid.shape
    y = np.clip((np.arange(height) + 0.5) * h / height - 0.5, 0, h - 1)
    x = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    g = grid.astype(np.float64)
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x1] * fx
    bottom = g[y1][:, x0] * (1 - fx) + g[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def reference_tile_map(patch_scores: np.ndarray, tile_hw, blur_sigma: float) -> np.ndarray:
    """Patch scores [h, w] -> tile map [th, tw]: bilinear, then SciPy's Gaussian with reflect padding."""
    return gaussian_filter(bilinear(patch_scores, *tile_hw), blur_sigma, mode="reflect", truncate=4.0)


def reference_untile(tile_maps: np.ndarray, image_hw, tile_hw, stride_hw) -> np.ndarray:
    """Tile maps [T, th, tw] -> [H, W]: each pixel the mean of every tile covering it (padding dropped)."""
    h, w = image_hw
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for tile, (y, x) in zip(tile_maps, tile_origins(image_hw, tile_hw, stride_hw), strict=True):
        for dy in range(tile_hw[0]):
            for dx in range(tile_hw[1]):
                if y + dy < h and x + dx < w:
                    total[y + dy, x + dx] += tile[dy, dx]
                    count[y + dy, x + dx] += 1
    return total / count


def reference_band(image_hw, seam_rows, seam_cols, band_rows: int, band_cols: int) -> np.ndarray:
    """bool [H, W]: within `band` pixels of a seam on either side (a seam at e lies between e - 1 and e)."""
    ys, xs = np.arange(image_hw[0])[:, None], np.arange(image_hw[1])[None, :]
    near_row = np.zeros((image_hw[0], 1), dtype=bool)
    for e in seam_rows:
        near_row |= (ys >= e - band_rows) & (ys < e + band_rows)
    near_col = np.zeros((1, image_hw[1]), dtype=bool)
    for e in seam_cols:
        near_col |= (xs >= e - band_cols) & (xs < e + band_cols)
    return near_row | near_col


def reference_seams(image_hw, tile_hw, stride_hw) -> tuple[list[int], list[int]]:
    """Rows / columns where a tile starts or ends strictly inside the image."""
    origins = tile_origins(image_hw, tile_hw, stride_hw)
    rows = sorted({e for y, _ in origins for e in (y, y + tile_hw[0]) if 0 < e < image_hw[0]})
    cols = sorted({e for _, x in origins for e in (x, x + tile_hw[1]) if 0 < e < image_hw[1]})
    return rows, cols


def reference_merge(tile_maps: np.ndarray, seam_sigma: float, band: np.ndarray, geometry=None) -> np.ndarray:
    """Untile by averaging, then keep SciPy's Gaussian (reflect) of the whole map inside the band only."""
    image_hw, tile_hw, stride_hw = geometry or (IMAGE_HW, TILE_HW, STRIDE_HW)
    merged = reference_untile(tile_maps, image_hw, tile_hw, stride_hw)
    smoothed = gaussian_filter(merged, seam_sigma, mode="reflect", truncate=4.0)
    return np.where(band, smoothed, merged)


GRID = tile_grid(IMAGE_HW, TILE_HW, STRIDE_HW)
BAND = reference_band(IMAGE_HW, SEAM_ROWS, SEAM_COLS, BAND_ROWS, BAND_COLS)
RULE = MergeRule(image_score="mean", blur_sigma=BLUR_SIGMA, seam_band=SEAM_BAND, seam_sigma=SEAM_SIGMA)


def test_reference_geometry_agrees_with_the_hand_worked_numbers() -> None:
    """The reference's own check, before it judges the runtime."""
    origins = tile_origins(IMAGE_HW, TILE_HW, STRIDE_HW)
    assert len(origins) == 16 and origins[-1] == (30, 36)  # 36 + 16 = 52 > 44: padded
    assert reference_seams(IMAGE_HW, TILE_HW, STRIDE_HW) == (SEAM_ROWS, SEAM_COLS)
    assert round(SEAM_BAND * TILE_HW[0]) == BAND_ROWS and round(SEAM_BAND * TILE_HW[1]) == BAND_COLS
    # bilinear with half-pixel centres, hand-worked: [0, 1] -> 4 samples at x = -0.25, 0.25, 0.75, 1.25
    np.testing.assert_allclose(bilinear(np.array([[0.0, 1.0]]), 1, 4), [[0.0, 0.25, 0.75, 1.0]])


def test_grid_matches_the_reference_geometry() -> None:
    assert (GRID.rows, GRID.cols, GRID.padded_h, GRID.padded_w) == (4, 4, 50, 52)
    assert [GRID.origin(r, c) for r, c in GRID.locations()] == tile_origins(IMAGE_HW, TILE_HW, STRIDE_HW)


# --- random tile maps --------------------------------------------------------------------------------------


def random_tile_maps(seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, GRID.count, *TILE_HW)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_merged_random_maps_equal_the_reference(seed: int) -> None:
    maps = random_tile_maps(seed)
    scores = np.random.default_rng(seed + 10).normal(size=(2, GRID.count)).astype(np.float32)
    merged_scores, merged = merge_tiles(TileOutputs(scores, maps), GRID, RULE)
    assert merged.shape == (2, *IMAGE_HW) and merged.dtype == np.float32
    for b in range(2):
        np.testing.assert_allclose(merged[b], reference_merge(maps[b], SEAM_SIGMA, BAND), atol=2e-5)
    np.testing.assert_allclose(merged_scores, scores.astype(np.float64).mean(axis=1), rtol=1e-5)


def test_seam_pass_changes_every_band_and_nothing_else() -> None:
    """Outside the band the merge is the plain average; inside it, the seam blur moved the values."""
    maps = random_tile_maps(2, batch=1)
    _, merged = merge_tiles(TileOutputs(np.zeros((1, GRID.count), np.float32), maps), GRID, RULE)
    averaged = reference_untile(maps[0], IMAGE_HW, TILE_HW, STRIDE_HW)
    np.testing.assert_allclose(merged[0][~BAND], averaged[~BAND], atol=1e-5)
    far = 5  # a column away from every column band (bands cover 10-13, 14-17, ...)
    assert not BAND[:, far].all()
    for e in SEAM_ROWS:  # seams at tile starts (10, 20, 30) and at tile ends only (40)
        rows = slice(e - BAND_ROWS, e + BAND_ROWS)
        assert np.abs(merged[0, rows, far] - averaged[rows, far]).min() > 1e-4, e
    for e in SEAM_COLS:  # 16, 28 and 40 are tile ends, not tile starts
        cols = slice(e - BAND_COLS, e + BAND_COLS)
        assert np.abs(merged[0, 2, cols] - averaged[2, cols]).min() > 1e-4, e


def test_seam_sigma_is_the_seam_blurs_not_the_map_blurs() -> None:
    maps = random_tile_maps(3, batch=1)
    _, merged = merge_tiles(TileOutputs(np.zeros((1, GRID.count), np.float32), maps), GRID, RULE)
    right = reference_merge(maps[0], SEAM_SIGMA, BAND)
    wrong = reference_merge(maps[0], BLUR_SIGMA, BAND)
    assert np.abs(right - wrong)[BAND].max() > 0.05  # the two sigmas are told apart by this data
    np.testing.assert_allclose(merged[0], right, atol=2e-5)


def test_max_image_score_is_the_largest_tile_score() -> None:
    scores = np.random.default_rng(4).normal(size=(2, GRID.count)).astype(np.float32)
    rule = MergeRule(image_score="max", blur_sigma=BLUR_SIGMA, seam_band=SEAM_BAND, seam_sigma=SEAM_SIGMA)
    merged_scores, _ = merge_tiles(TileOutputs(scores, random_tile_maps(4)), GRID, rule)
    np.testing.assert_array_equal(merged_scores, scores.max(axis=1))


@pytest.mark.parametrize(
    ("image_hw", "tile_hw", "stride_hw", "band", "sigma"),
    [
        ((32, 32), (16, 16), (16, 16), 0.125, 2.0),  # no overlap: seams at the tile starts only
        ((31, 27), (12, 10), (6, 8), 0.3, 1.25),  # overlap, padded to 36 x 34, rectangular
    ],
)
def test_other_geometries_equal_the_reference(image_hw, tile_hw, stride_hw, band: float, sigma: float) -> None:
    grid = tile_grid(image_hw, tile_hw, stride_hw)
    rows, cols = reference_seams(image_hw, tile_hw, stride_hw)
    mask = reference_band(image_hw, rows, cols, round(band * tile_hw[0]), round(band * tile_hw[1]))
    maps = np.random.default_rng(5).random((1, grid.count, *tile_hw)).astype(np.float32)
    rule = MergeRule(blur_sigma=0.5, seam_band=band, seam_sigma=sigma)
    _, merged = merge_tiles(TileOutputs(np.zeros((1, grid.count), np.float32), maps), grid, rule)
    expected = reference_merge(maps[0], sigma, mask, (image_hw, tile_hw, stride_hw))
    np.testing.assert_allclose(merged[0], expected, atol=2e-5)


# --- patch scores to merged maps: both sigmas in one pass --------------------------------------------------


def test_patch_scores_to_merged_map_uses_each_sigma_where_it_belongs() -> None:
    rng = np.random.default_rng(6)
    patch_scores = rng.random((1, GRID.count, 5, 4)).astype(np.float32)  # [B, T, h, w]
    tile_scores = patch_scores.reshape(1, GRID.count, -1).max(axis=2)  # tile score = max patch score
    outputs = tile_outputs(patch_scores, tile_scores, GRID, BLUR_SIGMA)
    tile_maps = np.stack([reference_tile_map(p, TILE_HW, BLUR_SIGMA) for p in patch_scores[0]])
    np.testing.assert_allclose(outputs.maps[0], tile_maps, atol=1e-5)
    scores, merged = merge_tiles(outputs, GRID, RULE)
    np.testing.assert_allclose(merged[0], reference_merge(tile_maps, SEAM_SIGMA, BAND), atol=2e-5)
    np.testing.assert_allclose(scores, [tile_scores.astype(np.float64).mean()], rtol=1e-6)


# --- kNN, merge, normalisation and fusion of a two-member ensemble -----------------------------------------


def brute_force_distances(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Queries [m, D] -> Euclidean distance to the nearest bank row [m] (float64)."""
    diffs = queries[:, None, :].astype(np.float64) - bank[None, :, :].astype(np.float64)
    return np.sqrt((diffs**2).sum(axis=2)).min(axis=1)


@pytest.mark.parametrize("normalisation", ["image", "tile"])
def test_two_member_ensemble_equals_the_reference(normalisation: str) -> None:
    rng = np.random.default_rng(7)
    batch, (h, w), dim = 2, (5, 4), 6
    embeddings = [rng.normal(size=(batch, GRID.count, h, w, dim)).astype(np.float32) for _ in range(2)]
    banks = [[rng.normal(size=(30, dim)).astype(np.float32) for _ in range(GRID.count)] for _ in range(2)]
    per_location = [
        [NormalStats(1.0 + 0.1 * j, 0.5 + 0.05 * j, 0.8 + m, 0.3 + 0.02 * j) for j in range(GRID.count)]
        for m in range(2)
    ]
    image_stats = [NormalStats(2.0, 0.4, 1.1, 0.6), NormalStats(2.5, 0.7, 0.9, 0.2)]
    calibrations = [MemberCalibration(per_location[m], image_stats[m]) for m in range(2)]
    rule = MergeRule("mean", normalisation, "mean", BLUR_SIGMA, SEAM_BAND, SEAM_SIGMA)

    raw = []
    for m in range(2):
        scorers = [BankScorer.from_bank(bank) for bank in banks[m]]
        embed = lambda locations, m=m: embeddings[m][:, locations]  # noqa: E731  [B, T', h, w, D]
        raw.append(score_locations(embed, scorers, GRID, BLUR_SIGMA, chunk=3))
    scores, maps = ensemble_result(raw, GRID, rule, calibrations)

    expected_scores, expected_maps = np.zeros(batch), np.zeros((batch, *IMAGE_HW))
    for m in range(2):
        for b in range(batch):
            patch = [  # per tile location: nearest-bank distances of its patches [h, w]
                brute_force_distances(banks[m][t], embeddings[m][b, t].reshape(-1, dim)).reshape(h, w)
                for t in range(GRID.count)
            ]
            tile_scores = np.array([p.max() for p in patch])
            tile_maps = np.stack([reference_tile_map(p, TILE_HW, BLUR_SIGMA) for p in patch])
            if normalisation == "tile":  # standard scores per location, then merge
                stats = per_location[m]
                tile_scores = np.array(
                    [(s - st.image_mean) / st.image_std for s, st in zip(tile_scores, stats, strict=True)]
                )
                tile_maps = np.stack(
                    [(t - st.pixel_mean) / st.pixel_std for t, st in zip(tile_maps, stats, strict=True)]
                )
                score, image_map = tile_scores.mean(), reference_merge(tile_maps, SEAM_SIGMA, BAND)
            else:  # merge, then standard scores against the member's image statistics
                st = image_stats[m]
                score = (tile_scores.mean() - st.image_mean) / st.image_std
                image_map = (reference_merge(tile_maps, SEAM_SIGMA, BAND) - st.pixel_mean) / st.pixel_std
            expected_scores[b] += score / 2  # fusion: the mean of the two members
            expected_maps[b] += image_map / 2
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-4)
