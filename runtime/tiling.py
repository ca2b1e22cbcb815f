"""Tile geometry of the tiled ensemble (Rolih et al., CVPRW 2024), and the merge back to one map.

A grid covers an image of H x W with tiles of th x tw placed every sh (sw) pixels. When the tiles do not
end exactly on the image border, the image is zero padded at the bottom/right until they do; untiling
removes the padding again. Overlaps (stride < tile) are merged by pixel averaging with a count map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from tilecore.runtime.errors import TilecoreError


@dataclass(frozen=True)
class TileGrid:
    image_h: int
    image_w: int
    tile_h: int
    tile_w: int
    stride_h: int
    stride_w: int

    @property
    def rows(self) -> int:
        return math.ceil((self.image_h - self.tile_h) / self.stride_h) + 1

    @property
    def cols(self) -> int:
        return math.ceil((self.image_w - self.tile_w) / self.stride_w) + 1

    @property
    def padded_h(self) -> int:
        return (self.rows - 1) * self.stride_h + self.tile_h

    @property
    def padded_w(self) -> int:
        return (self.cols - 1) * self.stride_w + self.tile_w

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def locations(self) -> list[tuple[int, int]]:
        """(row, col) of every tile, row-major: the order tiles are cut, batched and merged in."""
        return [(r, c) for r in range(self.rows) for c in range(self.cols)]

    def origin(self, row: int, col: int) -> tuple[int, int]:
        return row * self.stride_h, col * self.stride_w

    def to_dict(self) -> dict:
        return {
            "image": [self.image_h, self.image_w],
            "tile": [self.tile_h, self.tile_w],
            "stride": [self.stride_h, self.stride_w],
            "grid": [self.rows, self.cols],
            "padding": "zeros after normalisation, bottom/right",
            "merge": "pixel mean over overlaps",
        }


def tile_grid(image_hw: tuple[int, int], tile_hw: tuple[int, int], stride_hw: tuple[int, int]) -> TileGrid:
    """Validated grid; a tile larger than the image or a stride outside 1..tile is refused."""
    (h, w), (th, tw), (sh, sw) = image_hw, tile_hw, stride_hw
    if th > h or tw > w or th < 1 or tw < 1:
        raise TilecoreError(f"tile size {th}x{tw}: expected 1..image size {h}x{w}")
    if not (1 <= sh <= th and 1 <= sw <= tw):
        raise TilecoreError(f"tile stride {sh}x{sw}: expected 1 <= stride <= tile size {th}x{tw}")
    return TileGrid(h, w, th, tw, sh, sw)


def single_tile(image_hw: tuple[int, int]) -> TileGrid:
    """The trivial grid of an untiled model: one tile, the whole image."""
    return TileGrid(image_hw[0], image_hw[1], image_hw[0], image_hw[1], image_hw[0], image_hw[1])


def cut_tiles(image: np.ndarray, grid: TileGrid, locations: list[int] | None = None) -> np.ndarray:
    """Image [C, H, W] -> tiles [T', C, th, tw] at the chosen locations (all by default), zero padded
    at the bottom/right where a tile reaches past the image."""
    c, h, w = image.shape
    if (h, w) != (grid.image_h, grid.image_w):
        raise TilecoreError(f"tiling: image {h}x{w} does not match the grid's {grid.image_h}x{grid.image_w}")
    chosen = list(range(grid.count)) if locations is None else locations
    all_locations = grid.locations()
    tiles = np.empty((len(chosen), c, grid.tile_h, grid.tile_w), dtype=image.dtype)
    for i, location in enumerate(chosen):
        y, x = grid.origin(*all_locations[location])
        inside = image[:, y : y + grid.tile_h, x : x + grid.tile_w]  # smaller than a tile at the padded edge
        ih, iw = inside.shape[1:]
        tiles[i, :, :ih, :iw] = inside
        tiles[i, :, ih:, :] = 0  # the padding, where the tile reaches past the image (empty slices elsewhere)
        tiles[i, :, :ih, iw:] = 0
    return tiles


@lru_cache(maxsize=16)
def cover_counts(grid: TileGrid) -> np.ndarray:
    """float64 [H, W]: how many tiles cover each image pixel (cached: read only)."""
    count = np.zeros((grid.padded_h, grid.padded_w))
    for r, c in grid.locations():
        y, x = grid.origin(r, c)
        count[y : y + grid.tile_h, x : x + grid.tile_w] += 1.0
    count = np.ascontiguousarray(count[: grid.image_h, : grid.image_w])
    count.setflags(write=False)
    return count


def untile_mean_batch(tiles: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Tile maps [B, T, th, tw] -> image maps [B, H, W] float32: the mean of every tile covering a pixel,
    padding removed; summed in float64, so a pixel's copies average back to exactly its value."""
    b, h, w = tiles.shape[0], grid.image_h, grid.image_w
    total = np.zeros((b, h, w))  # [B, H, W] float64: only the image, never the padding
    for j, (r, c) in enumerate(grid.locations()):
        y, x = grid.origin(r, c)
        inside_h, inside_w = min(grid.tile_h, h - y), min(grid.tile_w, w - x)  # the tile's part inside the image
        total[:, y : y + inside_h, x : x + inside_w] += tiles[:, j, :inside_h, :inside_w]
    merged = np.empty((b, h, w), dtype=np.float32)
    np.divide(total, cover_counts(grid), out=merged, casting="unsafe")  # divided in float64, then rounded
    return merged


def untile_mean(tiles: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Tile maps [T, th, tw] -> image map [H, W]: the mean of every tile covering a pixel, padding removed."""
    return untile_mean_batch(tiles[None], grid)[0]


def seam_lines(grid: TileGrid) -> tuple[list[int], list[int]]:
    """Rows and columns where a tile edge lies inside the image: both y and y + th of every tile (x alike)."""
    rows = {edge for r in range(grid.rows) for edge in (r * grid.stride_h, r * grid.stride_h + grid.tile_h)}
    cols = {edge for c in range(grid.cols) for edge in (c * grid.stride_w, c * grid.stride_w + grid.tile_w)}
    return sorted(e for e in rows if 0 < e < grid.image_h), sorted(e for e in cols if 0 < e < grid.image_w)


@lru_cache(maxsize=16)
def seam_band_mask(grid: TileGrid, band_fraction: float) -> np.ndarray:
    """bool [H, W]: pixels within band_fraction * tile width of a seam, on either side (cached: read only)."""
    mask = np.zeros((grid.image_h, grid.image_w), dtype=bool)
    band_h = max(1, round(band_fraction * grid.tile_h))
    band_w = max(1, round(band_fraction * grid.tile_w))
    rows, cols = seam_lines(grid)
    for e in rows:  # a seam at row e separates rows e-1 and e
        mask[max(0, e - band_h) : e + band_h, :] = True
    for e in cols:
        mask[:, max(0, e - band_w) : e + band_w] = True
    mask.setflags(write=False)  # shared through the cache
    return mask


@lru_cache(maxsize=16)
def seam_bands(grid: TileGrid, band_fraction: float) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """The seam bands of seam_band_mask as merged [start, stop) intervals: (rows, columns)."""
    band_h = max(1, round(band_fraction * grid.tile_h))
    band_w = max(1, round(band_fraction * grid.tile_w))
    rows, cols = seam_lines(grid)
    return (
        merged_intervals([(max(0, e - band_h), min(grid.image_h, e + band_h)) for e in rows]),
        merged_intervals([(max(0, e - band_w), min(grid.image_w, e + band_w)) for e in cols]),
    )


def merged_intervals(intervals: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted [start, stop) intervals with overlapping or touching ones joined."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return tuple(merged)


def smooth_seams(image_map: np.ndarray, grid: TileGrid, band_fraction: float, sigma: float) -> np.ndarray:
    """Gaussian-filter the map [H, W], keeping the filtered values only in the seam bands."""
    return smooth_seams_batch(image_map[None], grid, band_fraction, sigma)[0]


def smooth_seams_batch(maps: np.ndarray, grid: TileGrid, band_fraction: float, sigma: float) -> np.ndarray:
    """smooth_seams for maps [B, H, W] float32, filtering only the strips the bands need.

    A band [a, b) of rows reads the map's rows a - r .. b + r (r: the kernel radius), or up to the image
    border, where the filter's reflection is the whole map's own; so each pixel of a band gets exactly the
    value a filter over the whole map gives it. Columns alike."""
    if band_fraction <= 0 or sigma <= 0 or grid.count == 1:
        return maps
    from tilecore.runtime.anomaly_map import blur_kernel_size

    size = blur_kernel_size(sigma)
    radius = size // 2
    row_bands, col_bands = seam_bands(grid, band_fraction)
    h, w = maps.shape[1:]

    def blur(strip: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(strip, (size, size), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)

    source = np.ascontiguousarray(maps, dtype=np.float32)
    smoothed = source.copy()  # [B, H, W]; bands overwritten below, everything else kept as it was
    for image, out in zip(source, smoothed, strict=True):
        for a, b in row_bands:
            low, high = max(0, a - radius), min(h, b + radius)
            out[a:b] = blur(image[low:high])[a - low : b - low]
        for a, b in col_bands:
            low, high = max(0, a - radius), min(w, b + radius)
            out[:, a:b] = blur(np.ascontiguousarray(image[:, low:high]))[:, a - low : b - low]
    return smoothed
