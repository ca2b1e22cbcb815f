"""Preprocessing against references written here in numpy, independent of OpenCV and of runtime/preprocess.py.

README "Rules training and runtime share": RGB, OpenCV INTER_AREA resize to image_size, the weights' own
mean/std; tiles cut from the normalised image with zero padding at the bottom/right, resized to the
backbone input. The parity test cannot see a mistake here (PyTorch and the runtime share this code), so
each rule is pinned against its definition: a random image with distinct channels (a channel swap
shows), an asymmetric mean/std (a swap of mean and std, or of channels' statistics, shows) and area
resizes computed from the overlap of pixel footprints (nearest or bilinear sampling shows).
"""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from tilecore.runtime.image_io import read_rgb
from tilecore.runtime.preprocess import Preprocess, normalise_rgb, preprocess_batch, resize_rgb, tiles_at
from tilecore.runtime.tiling import tile_grid

MEAN = (0.2, 0.5, 0.7)  # every channel different, and mean != std for each
STD = (0.1, 0.3, 0.05)


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3] with each channel drawn from its own range, so no two channels look alike."""
    rng = np.random.default_rng(seed)
    low, high = (0, 90, 170), (80, 160, 256)
    return np.stack([rng.integers(lo, hi, size=(h, w)) for lo, hi in zip(low, high, strict=True)], axis=2).astype(
        np.uint8
    )


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: output pixel i averages input pixels over [i * s, (i + 1) * s), s = n_in / n_out,
    each weighted by the length of its overlap with that interval (the definition of an area resize)."""
    s = n_in / n_out
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = i * s, (i + 1) * s
        for j in range(n_in):
            weights[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
    return weights / s


def area_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] -> [height, width, C] float64 by exact fractional areas (shrinking only)."""
    assert height <= image.shape[0] and width <= image.shape[1]
    rows, cols = area_weights(image.shape[0], height), area_weights(image.shape[1], width)
    return np.einsum("ij,jkc,lk->ilc", rows, image.astype(np.float64), cols)


def block_means(image: np.ndarray, factor: int) -> np.ndarray:
    """[H, W, C] -> [H / f, W / f, C] float64: the mean of each f x f block (integer shrink factor)."""
    h, w, c = image.shape
    return image.astype(np.float64).reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))


def normalise_reference(resized_uint8_values: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    """[H, W, 3] values on the 0..255 scale -> [3, H, W] float64: (x / 255 - mean[c]) / std[c]."""
    out = resized_uint8_values.astype(np.float64) / 255.0
    out = (out - np.array(mean)) / np.array(std)
    return out.transpose(2, 0, 1)


# One uint8 step in normalised units, per channel: how far OpenCV's rounding to uint8 may move a value.
HALF_STEP = 0.5 / (255.0 * np.array(STD))[:, None, None] + 1e-5


def test_area_weights_reference_is_itself_right() -> None:
    """The reference's own check: rows sum to 1, and an integer factor gives equal weights on its block."""
    np.testing.assert_allclose(area_weights(10, 4).sum(axis=1), 1.0)
    np.testing.assert_allclose(area_weights(6, 2), [[1 / 3] * 3 + [0] * 3, [0] * 3 + [1 / 3] * 3])
    # 5 -> 2: s = 2.5, output 0 covers pixels 0, 1 and half of 2
    np.testing.assert_allclose(area_weights(5, 2)[0], [0.4, 0.4, 0.2, 0.0, 0.0])


# --- normalisation -----------------------------------------------------------------------------------------


def test_normalisation_is_per_channel_in_rgb_order_without_resize() -> None:
    image = random_rgb(12, 10)
    spec = Preprocess(12, 10, MEAN, STD)
    out = normalise_rgb(image, spec)
    assert out.shape == (3, 12, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, normalise_reference(image), rtol=1e-5, atol=1e-5)
    # hand-worked pixel: channel 0 of pixel (0, 0) is (x / 255 - 0.2) / 0.1
    assert out[0, 0, 0] == pytest.approx((image[0, 0, 0] / 255 - 0.2) / 0.1, abs=1e-5)
    assert out[2, 3, 4] == pytest.approx((image[3, 4, 2] / 255 - 0.7) / 0.05, abs=1e-4)


def test_batch_is_the_images_in_order() -> None:
    images = [random_rgb(8, 8, seed) for seed in (1, 2)]
    batch = preprocess_batch(images, Preprocess(8, 8, MEAN, STD))
    assert batch.shape == (2, 3, 8, 8)
    for b, image in enumerate(images):
        np.testing.assert_allclose(batch[b], normalise_reference(image), rtol=1e-5, atol=1e-5)


# --- resize to image_size ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("hw", "factor"), [((64, 48), 4), ((30, 30), 3), ((32, 16), 2)])
def test_integer_downscale_is_block_means(hw: tuple[int, int], factor: int) -> None:
    image = random_rgb(*hw, seed=factor)
    out_h, out_w = hw[0] // factor, hw[1] // factor
    expected = block_means(image, factor)  # [out_h, out_w, 3] on the 0..255 scale
    resized = resize_rgb(image, out_h, out_w)
    assert resized.shape == (out_h, out_w, 3) and resized.dtype == np.uint8
    assert np.abs(resized - expected).max() <= 0.5 + 1e-9  # only the rounding to uint8
    normalised = normalise_rgb(image, Preprocess(out_h, out_w, MEAN, STD))
    assert np.all(np.abs(normalised - normalise_reference(expected)) <= HALF_STEP)


@pytest.mark.parametrize(("hw", "out_hw"), [((10, 15), (4, 6)), ((37, 29), (16, 16)), ((50, 21), (20, 8))])
def test_fractional_downscale_is_the_exact_area_average(hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    image = random_rgb(*hw, seed=hw[0])
    expected = area_resize(image, *out_hw)
    resized = resize_rgb(image, *out_hw)
    assert resized.shape == (*out_hw, 3)
    assert np.abs(resized - expected).max() <= 0.5 + 1e-9
    normalised = normalise_rgb(image, Preprocess(*out_hw, MEAN, STD))
    assert np.all(np.abs(normalised - normalise_reference(expected)) <= HALF_STEP)


def test_downscale_hand_worked_fractional_footprint() -> None:
    """1 x 5 -> 1 x 2: output 0 = 0.4 * a + 0.4 * b + 0.2 * c over the first 2.5 input pixels."""
    row = np.array([[10, 20, 30, 200, 250]], dtype=np.uint8)
    image = np.stack([row, row // 2, 255 - row], axis=2)  # [1, 5, 3]
    resized = resize_rgb(np.repeat(image, 2, axis=0), 2, 2)[0]  # 2 x 5 -> 2 x 2: rows are identical
    # channel 0: 0.4 * 10 + 0.4 * 20 + 0.2 * 30 = 18; 0.2 * 30 + 0.4 * 200 + 0.4 * 250 = 186
    assert resized[:, 0].tolist() == [18, 186]
    assert resized[:, 2].tolist() == [255 - 18, 255 - 186]


# --- tiles: zero padding after normalisation, area resize to the backbone input ----------------------------


def padded_crop(normalised: np.ndarray, y: int, x: int, th: int, tw: int) -> np.ndarray:
    """[3, H, W] -> [3, th, tw] crop at (y, x) of the image zero padded (in normalised units) past its edge."""
    c, h, w = normalised.shape
    padded = np.zeros((c, max(h, y + th), max(w, x + tw)))
    padded[:, :h, :w] = normalised
    return padded[:, y : y + th, x : x + tw]


@pytest.mark.parametrize(
    ("image_hw", "tile", "stride", "input_hw"),
    [
        ((11, 11), (4, 4), (3, 3), (4, 4)),  # padded to 13 x 13, no resize
        ((11, 11), (4, 4), (3, 3), (2, 2)),  # padded, then halved: block means that mix padding zeros in
        ((14, 12), (6, 5), (4, 4), (4, 2)),  # rectangular, padded to 14 x 13, fractional shrink 6 -> 4, 5 -> 2
    ],
)
def test_tiles_are_zero_padded_after_normalisation_then_area_resized(
    image_hw: tuple[int, int], tile: tuple[int, int], stride: tuple[int, int], input_hw: tuple[int, int]
) -> None:
    image = random_rgb(*image_hw, seed=7)
    spec = Preprocess(*image_hw, MEAN, STD)
    normalised = normalise_rgb(image, spec)  # [3, H, W]
    grid = tile_grid(image_hw, tile, stride)
    assert (grid.padded_h, grid.padded_w) != image_hw  # the grid pads: the padding is under test
    reference_image = normalise_reference(image)
    locations = [grid.count - 1, 0, 1]  # the padded corner tile first: the order asked for is kept
    tiles = tiles_at(normalised, grid, locations, input_hw)
    assert tiles.shape == (3, 3, *input_hw) and tiles.dtype == np.float32
    for i, location in enumerate(locations):
        r, c = divmod(location, grid.cols)
        crop = padded_crop(reference_image, r * stride[0], c * stride[1], *tile)  # [3, th, tw]
        expected = area_resize(crop.transpose(1, 2, 0), *input_hw).transpose(2, 0, 1)
        np.testing.assert_allclose(tiles[i], expected, rtol=1e-5, atol=1e-4)
    corner = tiles[0]
    if input_hw == tile:  # unresized: the padding itself is exactly zero, never the mean colour
        pad_rows = grid.padded_h - image_hw[0]
        assert pad_rows > 0 and np.all(corner[:, -pad_rows:, :] == 0)


# --- decoding to RGB ---------------------------------------------------------------------------------------


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG written by hand from the format (no OpenCV), so channel order is the file's own."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb.shape
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, colour type 2 (RGB)
    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_decoded_images_are_rgb_in_the_files_channel_order(tmp_path: Path) -> None:
    image = random_rgb(6, 5, seed=3)
    (tmp_path / "rgb.png").write_bytes(png_bytes(image))
    decoded = read_rgb(tmp_path / "rgb.png")
    np.testing.assert_array_equal(decoded, image)
    assert decoded[0, 0, 0] < 80 <= decoded[0, 0, 1] < 160 <= decoded[0, 0, 2]  # red low, blue high
