"""Reading images into the one layout every stage uses: RGB, uint8, [H, W, 3].

Every image and mask is read as bytes (`os.open`: any file name works, including names that are not
valid UTF-8, which OpenCV's own file functions crash on) and decoded from memory with `cv2.imdecode`,
after three checks that need no decoding:

1. **Header** (runtime.image_headers). Width and height come from the format's header: PNG (IHDR),
   JPEG (the first SOFn), BMP (the info header), WebP (VP8, VP8L or VP8X) and TIFF/BigTIFF (the first
   image directory). Any other content, or a header that cannot be read, is refused: nothing is
   decoded blind.
2. **Pixel limit.** width x height at most `max_pixels`: the argument, else the `TILECORE_MAX_PIXELS`
   environment variable, else `DEFAULT_MAX_PIXELS` (100 megapixels). So a small file that would decode
   to gigabytes (a 20000 x 20000 PNG of zeros is 1 MB) is refused before any pixel memory is allocated.
   The file itself may be at most `8 * limit + 64 MiB` bytes (more than an uncompressed 16-bit RGBA
   image within the limit needs), checked before it is read.
3. **Completeness.** The file holds all the data its structure promises: PNG chunks each pass their
   CRC and end with IEND; a JPEG's markers run, through every scan, to the end-of-image marker; an
   uncompressed BMP holds its whole pixel array; a WebP holds the RIFF size it declares; a TIFF holds
   every strip or tile of its first image. Truncated and cut-short files are refused with the reason.

What no check before decoding can see: damage inside compressed data that keeps the structure intact.
JPEG has no checksum, so flipped bits in its entropy-coded data (or data cut short with an end marker
appended) decode as wrong pixels with only a libjpeg warning; PNG's CRCs catch such damage.

**Bit depth** (`to_uint8`). Every stage works on 8-bit pixels; 16-bit containers (PNG, TIFF) holding
8 to 16 significant bits are mapped by one rule, the same in training and the runtime: with `bits`
significant bits, v -> floor(v * 255 / (2^bits - 1) + 1/2) (round half up, exact integer arithmetic),
clipped to 255 (values above 2^bits - 1). `bit_depth` is a run's `data.bit_depth`, recorded in its
bundles' preprocessing record: "auto" takes the container's depth (8 for uint8 files, unchanged; 16 for
uint16 files), 8 refuses 16-bit files, 10/12/14/16 expect 16-bit files and refuse 8-bit ones. Grey
images are replicated to three channels after the mapping.

Names in messages are `display_path(path)`: the path's bytes decoded as UTF-8 with invalid bytes written
as `\\xNN` (backslashreplace), so a message is always printable and JSON-writable.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import cv2
import numpy as np

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_headers import read_header

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# 100 megapixels: 10000 x 10000, beyond all but the largest area-scan sensors (151 MP); one such image is
# 300 MB as RGB uint8 (about twice that at its peak while converting), and the run's decode-ahead queue
# (8 images) stays under 5 GB. Raise it for bigger line-scan images with TILECORE_MAX_PIXELS.
DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "TILECORE_MAX_PIXELS"
_FILE_BYTES_PER_PIXEL = 8  # uncompressed 16-bit RGBA: no image within the pixel limit needs more
_FILE_SLACK_BYTES = 64 << 20  # metadata, thumbnails, trailing data


# --------------------------------------------------------------------------------------------------
# Public reading functions


BIT_DEPTHS = ("auto", 8, 10, 12, 14, 16)


def read_rgb(path: str | Path, max_pixels: int | None = None, bit_depth: str | int = "auto") -> np.ndarray:
    """Read an image as RGB [H, W, 3] uint8, 16-bit pixels mapped by `bit_depth` (see `to_uint8`).

    Grayscale is replicated to three channels and an alpha channel is dropped (both common in
    inspection data, e.g. MVTec's grid, screw and zipper). Refuses with TilecoreError naming the file:
    missing, empty, not a regular file, unreadable, an unknown format or unreadable header, more than
    `max_pixels` pixels (see `pixel_limit`), truncated or corrupt, undecodable, a depth `bit_depth` refuses.
    """
    raw = _decode(path, "image", max_pixels)
    return to_rgb(raw, f"image {display_path(path)}", bit_depth)


def to_uint8(pixels: np.ndarray, what: str, bit_depth: str | int = "auto") -> np.ndarray:
    """uint8 or uint16 pixels (any shape) -> uint8 by the bit-depth rule of the module doc."""
    if bit_depth not in BIT_DEPTHS or isinstance(bit_depth, bool):
        raise TilecoreError(f"bit_depth {bit_depth!r}: expected one of {list(BIT_DEPTHS)}")
    if pixels.dtype == np.uint8:
        if bit_depth not in ("auto", 8):
            raise TilecoreError(f"{what}: 8-bit pixels, but bit_depth {bit_depth} expects a 16-bit image")
        return pixels
    if pixels.dtype != np.uint16:
        raise TilecoreError(f"{what}: {pixels.dtype} pixels, expected 8-bit or 16-bit")
    if bit_depth == 8:
        raise TilecoreError(f"{what}: 16-bit pixels, but bit_depth 8 expects 8-bit (train with data.bit_depth set)")
    top = (1 << (16 if bit_depth == "auto" else int(bit_depth))) - 1  # the largest significant value
    wide = pixels.astype(np.uint32)
    mapped = (wide * 510 + top) // (2 * top)  # floor(v * 255 / top + 1/2), exact
    return np.minimum(mapped, 255).astype(np.uint8)


def to_rgb(pixels: np.ndarray, what: str, bit_depth: str | int = "auto") -> np.ndarray:
    """OpenCV's grey, BGR or BGRA pixels (uint8, or uint16 mapped by `to_uint8`) -> RGB uint8 [H, W, 3];
    other channel counts are refused, naming `what` (an image file, a video frame)."""
    pixels = to_uint8(pixels, what, bit_depth)
    if pixels.ndim == 2:
        return np.ascontiguousarray(np.repeat(pixels[:, :, None], 3, axis=2))  # [H, W] -> [H, W, 3]
    channels = pixels.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(pixels, 3, axis=2))  # [H, W, 1] -> [H, W, 3]
    if channels == 3:
        return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB)  # [H, W, 4] -> [H, W, 3]
    raise TilecoreError(f"{what}: {channels} channels, expected 1, 3 or 4")


def over_pixel_limit(pixels: int, limit: int, verb: str = "is") -> str | None:
    """Why `pixels` is too many ("is 400.0 megapixels, over the limit of ..."), or None within `limit`."""
    if pixels <= limit:
        return None
    return f"{verb} {_megapixels(pixels)}, over the limit of {_megapixels(limit)} (raise it with {MAX_PIXELS_ENV})"


def read_mask(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool [H, W] (any non-zero pixel is anomalous); refused as `read_rgb`."""
    raw = _decode(path, "mask", max_pixels)
    if raw.ndim == 3:
        raw = raw.max(axis=2)  # [H, W, C] -> [H, W]
    return raw > 0


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write an RGB [H, W, 3] or single-channel [H, W] uint8 image as PNG."""
    from tilecore.runtime.artifacts import atomic_write_bytes

    array = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise TilecoreError(f"image {display_path(path)}: PNG encoding failed")
    atomic_write_bytes(path, encoded.tobytes())


def display_path(path: str | Path) -> str:
    """The path as printable text: its bytes as UTF-8, each invalid byte written `\\xNN`.

    A name read from the file system that is not valid UTF-8 arrives with lone surrogates
    (surrogateescape), which some writers and terminals refuse; this form never is, and is the same on
    every run. Two names can share it only when one spells the other's invalid bytes as `\\xNN` text.
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a str with surrogates no file system name produces
        return str(path).encode("utf-8", "backslashreplace").decode("ascii", "strict")
    return raw.decode("utf-8", "backslashreplace")


def pixel_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: `max_pixels`, else $TILECORE_MAX_PIXELS, else DEFAULT_MAX_PIXELS."""
    if max_pixels is not None:
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise TilecoreError(f"max_pixels {max_pixels!r}: expected a whole number of pixels >= 1")
        return max_pixels
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise TilecoreError(f"{MAX_PIXELS_ENV}={text!r}: expected a whole number of pixels >= 1")
    return value


# --------------------------------------------------------------------------------------------------
# Reading bytes and decoding


def _decode(path: str | Path, what: str, max_pixels: int | None) -> np.ndarray:
    """Checked bytes -> cv2.imdecode(IMREAD_UNCHANGED): [H, W] or [H, W, C], uint8 or uint16."""
    name = display_path(path)
    limit = pixel_limit(max_pixels)
    data = _read_bytes(path, what, name, _FILE_BYTES_PER_PIXEL * limit + _FILE_SLACK_BYTES)
    try:
        header = read_header(data)
    except TilecoreError as error:
        raise TilecoreError(f"{what} {name}: cannot decode, unreadable header: {error}") from None
    if too_many := over_pixel_limit(header.width * header.height, limit):
        raise TilecoreError(f"{what} {name}: {header.width}x{header.height} {header.format} {too_many}")
    if header.problem:
        raise TilecoreError(f"{what} {name}: {header.format} {header.problem}")
    try:
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as error:
        reason = " ".join(str(error).split())
        raise TilecoreError(f"{what} {name}: cannot decode its {header.format} data ({reason})") from None
    if raw is None:
        raise TilecoreError(f"{what} {name}: cannot decode its {header.format} data (corrupt or unsupported)")
    if raw.shape[0] * raw.shape[1] > limit:  # the header understated the size: refuse what slipped through
        raise TilecoreError(f"{what} {name}: decodes to {raw.shape[1]}x{raw.shape[0]}, over the pixel limit")
    return raw


def _read_bytes(path: str | Path, what: str, name: str, max_bytes: int) -> bytes:
    """The whole file; refuses non-regular files before reading (a FIFO would block, a folder fails)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if os.path.islink(path):
            raise TilecoreError(f"{what} {name}: broken symbolic link (its target does not exist)") from None
        raise TilecoreError(f"{what} {name}: file not found") from None
    except IsADirectoryError:  # Windows; POSIX opens a folder and fstat below says so
        raise TilecoreError(f"{what} {name}: is a folder, expected an image file") from None
    except OSError as error:
        raise TilecoreError(f"{what} {name}: cannot open ({error.strerror or error})") from None
    try:
        mode = os.fstat(fd)
        if stat.S_ISDIR(mode.st_mode):
            raise TilecoreError(f"{what} {name}: is a folder, expected an image file")
        if not stat.S_ISREG(mode.st_mode):
            raise TilecoreError(f"{what} {name}: not a regular file (a device, pipe or socket)")
        if mode.st_size == 0:
            raise TilecoreError(f"{what} {name}: file is empty (0 bytes)")
        if mode.st_size > max_bytes:
            raise TilecoreError(
                f"{what} {name}: file is {mode.st_size} bytes, more than any image within the pixel limit "
                f"needs ({max_bytes} bytes; raise it with {MAX_PIXELS_ENV})"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(mode.st_size)  # read(n) allocates n bytes up front: the size, not the limit
    except OSError as error:
        raise TilecoreError(f"{what} {name}: cannot read ({error.strerror or error})") from None
    finally:
        os.close(fd)


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} megapixels"
