"""Tile geometry, cutting, merging and seam handling against hand-worked numbers and brute-force loops."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.tiling import (
    TileGrid,
    cut_tiles,
    seam_band_mask,
    seam_lines,
    single_tile,
    smooth_seams,
    tile_grid,
    untile_mean,
)

# (image_hw, tile_hw, stride_hw): overlapping, non-overlapping, padded, rectangular, stride 1, single tile.
GRIDS = [
    ((16, 16), (8, 8), (8, 8)),
    ((16, 16), (8, 8), (4, 4)),
    ((20, 17), (8, 6), (5, 4)),
    ((13, 11), (5, 7), (3, 7)),
    ((9, 10), (4, 3), (1, 2)),
    ((7, 5), (7, 5), (7, 5)),
]


def tile_boxes(grid: TileGrid) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of every tile, row-major, written out independently of TileGrid's helpers."""
    return [
        (r * grid.stride_h, r * grid.stride_h + grid.tile_h, c * grid.stride_w, c * grid.stride_w + grid.tile_w)
        for r in range(grid.rows)
        for c in range(grid.cols)
    ]


# --- tile_grid ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "tile", "stride", "rows", "cols", "padded"),
    [
        ((512, 512), (256, 256), (256, 256), 2, 2, (512, 512)),  # exact fit, no padding
        ((512, 512), (256, 256), (128, 128), 3, 3, (512, 512)),  # half overlap: origins 0, 128, 256
        # rows: origins 0, 200, 400 (0..456 does not reach 500), 400 + 256 = 656;
        # cols: origins 0, 100, 200 (100 + 128 = 228 < 300), 200 + 128 = 328.
        ((500, 300), (256, 128), (200, 100), 3, 3, (656, 328)),
        ((256, 256), (256, 256), (256, 256), 1, 1, (256, 256)),  # tile == image
        ((256, 512), (256, 128), (256, 128), 1, 4, (256, 512)),  # rectangular tiles
        ((300, 300), (100, 100), (70, 70), 4, 4, (310, 310)),  # origins 0, 70, 140, 210; 210 + 100 = 310
        ((10, 10), (4, 4), (3, 3), 3, 3, (10, 10)),  # origins 0, 3, 6; 6 + 4 = 10
        ((11, 10), (4, 4), (3, 3), 4, 3, (13, 10)),  # one more row: origins 0, 3, 6, 9; 9 + 4 = 13
    ],
)
def test_grid_geometry(
    image: tuple[int, int],
    tile: tuple[int, int],
    stride: tuple[int, int],
    rows: int,
    cols: int,
    padded: tuple[int, int],
) -> None:
    grid = tile_grid(image, tile, stride)
    assert (grid.rows, grid.cols) == (rows, cols)
    assert (grid.padded_h, grid.padded_w) == padded
    assert grid.count == rows * cols
    assert grid.locations() == [(r, c) for r in range(rows) for c in range(cols)]
    assert grid.origin(rows - 1, cols - 1) == ((rows - 1) * stride[0], (cols - 1) * stride[1])


@pytest.mark.parametrize(("image", "tile", "stride"), GRIDS)
def test_grid_is_the_smallest_that_covers_the_image(
    image: tuple[int, int], tile: tuple[int, int], stride: tuple[int, int]
) -> None:
    grid = tile_grid(image, tile, stride)
    # brute force: the smallest number of tile origins 0, s, 2s, ... whose last tile reaches the border
    rows = next(n for n in range(1, 1000) if (n - 1) * stride[0] + tile[0] >= image[0])
    cols = next(n for n in range(1, 1000) if (n - 1) * stride[1] + tile[1] >= image[1])
    assert (grid.rows, grid.cols) == (rows, cols)


def test_single_tile_is_the_whole_image() -> None:
    grid = single_tile((120, 80))
    assert (grid.rows, grid.cols, grid.padded_h, grid.padded_w) == (1, 1, 120, 80)
    assert (grid.tile_h, grid.tile_w) == (120, 80)


@pytest.mark.parametrize(
    ("tile", "stride", "message"),
    [
        ((300, 100), (100, 100), "tile size"),  # taller than the image
        ((100, 300), (100, 100), "tile size"),  # wider than the image
        ((0, 100), (1, 1), "tile size"),
        ((100, 100), (0, 100), "stride"),
        ((100, 100), (100, 0), "stride"),
        ((100, 100), (-5, 50), "stride"),
        ((100, 100), (101, 100), "stride"),  # stride larger than the tile would leave gaps
        ((100, 100), (100, 150), "stride"),
    ],
)
def test_invalid_grids_are_refused(tile: tuple[int, int], stride: tuple[int, int], message: str) -> None:
    with pytest.raises(TilecoreError, match=message):
        tile_grid((200, 200), tile, stride)


# --- cut_tiles ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "tile", "stride"), GRIDS)
def test_tiles_are_crops_of_the_zero_padded_image(
    image: tuple[int, int], tile: tuple[int, int], stride: tuple[int, int]
) -> None:
    grid = tile_grid(image, tile, stride)
    h, w = image
    picture = np.random.default_rng(0).uniform(1.0, 2.0, size=(3, h, w)).astype(np.float32)  # never zero
    tiles = cut_tiles(picture, grid)
    assert tiles.shape == (grid.count, 3, tile[0], tile[1])
    assert tiles.dtype == picture.dtype
    for i, (y0, y1, x0, x1) in enumerate(tile_boxes(grid)):  # row-major order
        for y in range(y0, y1):
            for x in range(x0, x1):
                inside = y < h and x < w
                expected = picture[:, y, x] if inside else np.zeros(3, dtype=np.float32)
                np.testing.assert_array_equal(tiles[i, :, y - y0, x - x0], expected)


def test_padding_is_zero_and_order_is_row_major() -> None:
    grid = tile_grid((5, 5), (3, 3), (2, 2))  # 2 x 2 tiles at 0 and 2, padded to 5: no padding
    grid_padded = tile_grid((6, 6), (3, 3), (2, 2))  # origins 0, 2, 4 -> padded to 7
    assert (grid.padded_h, grid_padded.padded_h) == (5, 7)
    picture = np.arange(36, dtype=np.float32).reshape(1, 6, 6) + 1
    tiles = cut_tiles(picture, grid_padded)
    assert tiles.shape == (9, 1, 3, 3)
    np.testing.assert_array_equal(tiles[1, 0], picture[0, 0:3, 2:5])  # row 0, col 1
    np.testing.assert_array_equal(tiles[3, 0], picture[0, 2:5, 0:3])  # row 1, col 0
    last = tiles[8, 0]  # row 2, col 2: image rows/cols 4, 5 then one padded row/col
    np.testing.assert_array_equal(last[:2, :2], picture[0, 4:6, 4:6])
    assert np.all(last[2, :] == 0) and np.all(last[:, 2] == 0)


def test_cut_refuses_an_image_of_the_wrong_size() -> None:
    grid = tile_grid((16, 16), (8, 8), (8, 8))
    with pytest.raises(TilecoreError, match="tiling"):
        cut_tiles(np.zeros((3, 16, 15), dtype=np.float32), grid)


# --- untile_mean -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "tile", "stride"), GRIDS)
def test_untile_of_constant_tiles_is_constant(
    image: tuple[int, int], tile: tuple[int, int], stride: tuple[int, int]
) -> None:
    grid = tile_grid(image, tile, stride)
    merged = untile_mean(np.full((grid.count, *tile), 2.75, dtype=np.float32), grid)
    assert merged.shape == image
    assert merged.dtype == np.float32
    np.testing.assert_array_equal(merged, 2.75)


@pytest.mark.parametrize(("image", "tile", "stride"), GRIDS)
def test_cut_then_untile_reproduces_the_image(
    image: tuple[int, int], tile: tuple[int, int], stride: tuple[int, int]
) -> None:
    grid = tile_grid(image, tile, stride)
    picture = np.random.default_rng(1).normal(size=(1, *image)).astype(np.float32)
    merged = untile_mean(cut_tiles(picture, grid)[:, 0], grid)
    np.testing.assert_array_equal(merged, picture[0])


@pytest.mark.parametrize(("image", "tile", "stride"), GRIDS)
def test_untile_averages_every_tile_covering_a_pixel(
    image: tuple[int, int], tile: tuple[int, int], stride: tuple[int, int]
) -> None:
    grid = tile_grid(image, tile, stride)
    values = np.random.default_rng(2).uniform(-5, 5, size=grid.count)  # one distinct constant per tile
    tiles = np.stack([np.full(tile, v, dtype=np.float32) for v in values])
    total = np.zeros(image)
    count = np.zeros(image)
    for v, (y0, y1, x0, x1) in zip(np.float32(values), tile_boxes(grid), strict=True):
        for y in range(y0, min(y1, image[0])):
            for x in range(x0, min(x1, image[1])):
                total[y, x] += v
                count[y, x] += 1
    assert count.min() >= 1  # every image pixel is covered
    np.testing.assert_allclose(untile_mean(tiles, grid), total / count, rtol=1e-6, atol=1e-6)


def test_untile_hand_worked_overlap() -> None:
    grid = tile_grid((4, 6), (4, 4), (4, 2))  # one row, tiles at x = 0 and 2: columns 2, 3 are shared
    tiles = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)]).astype(np.float32)
    np.testing.assert_array_equal(untile_mean(tiles, grid), np.tile([1, 1, 2, 2, 3, 3], (4, 1)))


# --- seam_lines / seam_band_mask ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "tile", "stride", "edges"),
    [
        (512, 256, 128, [128, 256, 384]),
        (512, 256, 256, [256]),
        # tile starts 70, 140, 210 and tile ends 100, 170, 240 (310 lies outside)
        (300, 100, 70, [70, 100, 140, 170, 210, 240]),
        (256, 256, 256, []),
    ],
)
def test_seams_at_both_edges_of_every_tile(size: int, tile: int, stride: int, edges: list[int]) -> None:
    rows, cols = seam_lines(tile_grid((size, size), (tile, tile), (stride, stride)))
    assert rows == edges
    assert cols == edges


def test_seams_include_tile_ends_that_are_not_tile_starts() -> None:
    rows, cols = seam_lines(tile_grid((300, 300), (100, 100), (70, 70)))
    assert {100, 170, 240} <= set(rows)  # ends of tiles; no tile starts there
    assert {100, 170, 240} <= set(cols)


def test_seams_of_rectangular_grid() -> None:
    # rows: starts 200, 400; ends 256, 456 (656 outside); cols: starts 100, 200; ends 128, 228 (328 outside)
    rows, cols = seam_lines(tile_grid((500, 300), (256, 128), (200, 100)))
    assert rows == [200, 256, 400, 456]
    assert cols == [100, 128, 200, 228]


def test_band_is_26_pixels_either_side_of_a_seam() -> None:
    grid = tile_grid((512, 512), (256, 256), (256, 256))  # one seam, at 256, in each direction
    mask = seam_band_mask(grid, 0.1)  # 0.1 * 256 = 25.6 -> 26
    assert mask.shape == (512, 512)
    far = 100  # a row / column far from every seam
    # rows: a seam at 256 separates rows 255 and 256; 26 rows on either side
    assert mask[256 - 26 : 256 + 26, far].all()
    assert not mask[256 - 27, far] and not mask[256 + 26, far]
    assert mask[230, far] and mask[281, far]
    assert not mask[:230, far].any() and not mask[282:, far].any()
    # columns alike
    assert mask[far, 230:282].all()
    assert not mask[far, :230].any() and not mask[far, 282:].any()
    # brute force: True exactly within 26 of the seam (distance counted to the boundary between e-1 and e)
    ys = np.arange(512)
    near = (ys >= 256 - 26) & (ys < 256 + 26)
    np.testing.assert_array_equal(mask, near[:, None] | near[None, :])


def test_band_brute_force_on_overlapping_rectangular_grid() -> None:
    grid = tile_grid((60, 50), (20, 10), (15, 8))
    mask = seam_band_mask(grid, 0.2)  # band 4 rows (0.2 * 20), 2 columns (0.2 * 10)
    starts_y = [r * 15 for r in range(grid.rows)]
    starts_x = [c * 8 for c in range(grid.cols)]
    seams_y = {e for s in starts_y for e in (s, s + 20) if 0 < e < 60}
    seams_x = {e for s in starts_x for e in (s, s + 10) if 0 < e < 50}
    expected = np.zeros((60, 50), dtype=bool)
    for y in range(60):
        for x in range(50):
            expected[y, x] = any(e - 4 <= y < e + 4 for e in seams_y) or any(e - 2 <= x < e + 2 for e in seams_x)
    np.testing.assert_array_equal(mask, expected)


def test_band_is_empty_for_a_single_tile() -> None:
    assert not seam_band_mask(single_tile((32, 32)), 0.1).any()


# --- smooth_seams ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_smoothing_blurs_inside_the_band_only(sigma: float) -> None:
    grid = tile_grid((64, 48), (32, 24), (16, 12))
    band = 0.125
    image_map = np.random.default_rng(3).random((64, 48)).astype(np.float32)
    smoothed = smooth_seams(image_map, grid, band, sigma)
    assert smoothed.shape == image_map.shape and smoothed.dtype == np.float32
    reference = gaussian_filter(image_map.astype(np.float64), sigma=sigma, mode="reflect", truncate=4.0)
    # band rows: within 4 (0.125 * 32) of a seam; columns: within 3 (0.125 * 24); seams at 16, 32, 48 / 12, 24, 36
    rows = np.zeros(64, dtype=bool)
    cols = np.zeros(48, dtype=bool)
    for e in (16, 32, 48):
        rows[e - 4 : e + 4] = True
    for e in (12, 24, 36):
        cols[e - 3 : e + 3] = True
    inside = rows[:, None] | cols[None, :]
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(smoothed[~inside], image_map[~inside])
    np.testing.assert_allclose(smoothed[inside], reference[inside], atol=1e-5)
    assert not np.allclose(smoothed[inside], image_map[inside])  # the blur did change something


def test_smoothing_leaves_a_single_tile_grid_alone() -> None:
    image_map = np.random.default_rng(4).random((32, 32)).astype(np.float32)
    np.testing.assert_array_equal(smooth_seams(image_map, single_tile((32, 32)), 0.1, 4.0), image_map)
    np.testing.assert_array_equal(smooth_seams(image_map, tile_grid((32, 32), (32, 32), (1, 1)), 0.1, 4.0), image_map)


def test_smoothing_off_when_band_or_sigma_is_zero() -> None:
    grid = tile_grid((32, 32), (16, 16), (8, 8))
    image_map = np.random.default_rng(5).random((32, 32)).astype(np.float32)
    np.testing.assert_array_equal(smooth_seams(image_map, grid, 0.0, 4.0), image_map)
    np.testing.assert_array_equal(smooth_seams(image_map, grid, 0.1, 0.0), image_map)


def test_smoothing_keeps_a_constant_map() -> None:
    grid = tile_grid((40, 40), (20, 20), (10, 10))
    smoothed = smooth_seams(np.full((40, 40), -1.5, dtype=np.float32), grid, 0.1, 2.0)
    np.testing.assert_allclose(smoothed, -1.5, rtol=1e-6)
