"""What an image file's header says (format, width, height, completeness), read without decoding a pixel.

One small parser per format image_io accepts: PNG (IHDR, then every chunk's CRC up to IEND), JPEG (the
first SOFn, then the markers through every scan to EOI), BMP (the info header and the pixel array's
extent), WebP (VP8, VP8L or VP8X, and the RIFF size) and TIFF/BigTIFF (the first image directory and its
strips or tiles). OpenCV's Python API has no header-only read, and the pixel limit must be checked
before a decode allocates the pixels.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from tilecore.runtime.errors import TilecoreError


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding any pixel."""

    format: str  # "PNG", "JPEG", "BMP", "WebP" or "TIFF"
    width: int
    height: int
    problem: str | None = None  # why the file is incomplete or corrupt, None when whole


class _Unreadable(Exception):
    """The header is missing, cut short or malformed: the message says how."""


def read_header(data: bytes) -> ImageHeader:
    """Format, size and completeness from a file's bytes, without decoding; TilecoreError when unreadable."""
    try:
        return _parse(data)
    except _Unreadable as error:
        raise TilecoreError(str(error)) from None
    except (struct.error, IndexError, ValueError, OverflowError) as error:  # a field points outside the data
        raise TilecoreError(f"malformed header ({error})") from None


# --------------------------------------------------------------------------------------------------
# Header parsers: each returns an ImageHeader or raises _Unreadable (struct.error / IndexError when a
# field lies outside the data, which read_header reports as a malformed header).


def _parse(data: bytes) -> ImageHeader:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data.startswith(b"BM"):
        return _bmp(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp(data)
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff(data)
    raise _Unreadable("not a PNG, JPEG, BMP, WebP or TIFF file (unknown signature)")


def _checked_size(fmt: str, width: int, height: int, problem: str | None = None) -> ImageHeader:
    if width < 1 or height < 1:
        raise _Unreadable(f"{fmt} header gives a size of {width}x{height}")
    return ImageHeader(fmt, width, height, problem)


def _png(data: bytes) -> ImageHeader:
    """IHDR first; then every chunk's CRC up to IEND."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise _Unreadable("PNG without an IHDR chunk after its signature (cut short or corrupt)")
    width, height = struct.unpack_from(">II", data, 16)
    pos, problem = 8, None
    while True:
        if pos + 12 > len(data):
            problem = f"is truncated: it ends at byte {len(data)} without its IEND chunk"
            break
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            problem = f"is truncated: chunk {kind!r} at byte {pos} needs {length} bytes, the file ends first"
            break
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            problem = f"is corrupt: chunk {kind!r} at byte {pos} fails its CRC check"
            break
        if kind == b"IEND":
            break
        pos = end
    return _checked_size("PNG", width, height, problem)


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field


def _jpeg(data: bytes) -> ImageHeader:
    """Markers from SOI to EOI: the first SOFn gives the size; each scan's entropy data is skipped."""
    n, pos = len(data), 2
    size: tuple[int, int] | None = None
    scans = 0
    problem = None
    while True:
        if pos + 2 > n:
            problem = f"is truncated: it ends at byte {n} without its end-of-image marker"
            break
        if data[pos] != 0xFF:  # stray bytes between segments: skipped, as libjpeg does (with a warning)
            pos = data.find(b"\xff", pos)
            if pos < 0:
                pos = n
            continue
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            problem = f"is truncated: it ends at byte {n} without its end-of-image marker"
            break
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            if not scans:
                problem = "has no image data (no start-of-scan before its end-of-image marker)"
            break
        if marker in _JPEG_STANDALONE:
            continue
        if pos + 2 > n:
            problem = f"is truncated: it ends at byte {n} inside a marker segment"
            break
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > n:
            problem = f"is truncated: segment 0x{marker:02X} at byte {pos - 2} runs past the end of the file"
            break
        if marker in _JPEG_SOF and size is None:
            if length < 8:
                raise _Unreadable(f"JPEG frame header at byte {pos - 2} is too short")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            if height == 0:
                raise _Unreadable("JPEG frame header gives height 0 (set later by a DNL marker; not supported)")
            size = (width, height)
        pos += length
        if marker == 0xDA:  # SOS: entropy-coded data up to the next marker that is not RSTn or a stuffed 0xFF
            if size is None:
                raise _Unreadable("JPEG start-of-scan before any frame header (SOFn)")
            scans += 1
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    pos = n
                    break
                following = data[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    pos += 1
                    continue
                break
    if size is None:
        raise _Unreadable(f"JPEG without a frame header (SOFn) before byte {pos}: {problem or 'malformed'}")
    return _checked_size("JPEG", *size, problem)


def _bmp(data: bytes) -> ImageHeader:
    """BITMAPCOREHEADER (12 bytes) or BITMAPINFOHEADER and later (>= 40); uncompressed pixel arrays checked."""
    if len(data) < 26:
        raise _Unreadable(f"BMP header cut short ({len(data)} bytes)")
    (pixel_offset, dib_size) = struct.unpack_from("<II", data, 10)
    if dib_size == 12:
        width, height, _planes, bits = struct.unpack_from("<HHHH", data, 18)
        compression = 0
    elif dib_size >= 40:
        width, height, _planes, bits, compression = struct.unpack_from("<iiHHI", data, 18)
    else:
        raise _Unreadable(f"BMP info header of {dib_size} bytes (expected 12 or at least 40)")
    height = abs(height)  # negative: rows stored top-down
    problem = None
    if compression in (0, 3, 6) and bits in (1, 4, 8, 16, 24, 32):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS
        needed = pixel_offset + ((width * bits + 31) // 32) * 4 * height
        if width > 0 and needed > len(data):
            problem = f"is truncated: its pixel array ends at byte {needed}, the file has {len(data)} bytes"
    return _checked_size("BMP", width, height, problem)


def _webp(data: bytes) -> ImageHeader:
    """RIFF container: the first chunk (VP8 lossy, VP8L lossless or VP8X extended) gives the size."""
    if len(data) < 30:
        raise _Unreadable(f"WebP header cut short ({len(data)} bytes)")
    (riff_size,) = struct.unpack_from("<I", data, 4)
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise _Unreadable("WebP VP8 frame without its start code")
        width, height = (v & 0x3FFF for v in struct.unpack_from("<HH", data, 26))
    elif chunk == b"VP8L":
        if data[20] != 0x2F:
            raise _Unreadable("WebP VP8L stream without its signature byte")
        (bits,) = struct.unpack_from("<I", data, 21)
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X":
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    else:
        raise _Unreadable(f"WebP with an unknown first chunk {chunk!r}")
    problem = None
    if 8 + riff_size > len(data):
        problem = f"is truncated: its RIFF header declares {8 + riff_size} bytes, the file has {len(data)}"
    return _checked_size("WebP", width, height, problem)


_TIFF_TYPES = {1: "B", 3: "H", 4: "I", 16: "Q"}  # BYTE, SHORT, LONG, LONG8: the ones sizes and offsets use
_TIFF_WIDTH, _TIFF_HEIGHT = 256, 257
_TIFF_STRIPS, _TIFF_STRIP_BYTES, _TIFF_TILES, _TIFF_TILE_BYTES = 273, 279, 324, 325


def _tiff(data: bytes) -> ImageHeader:
    """First image directory of a TIFF or BigTIFF: its size, and its strips or tiles inside the file."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:
        offset_bytes, _zero, ifd = struct.unpack_from(order + "HHQ", data, 4)
        if offset_bytes != 8:
            raise _Unreadable(f"BigTIFF with {offset_bytes}-byte offsets (expected 8)")
        count_format, entry_size, inline = "Q", 20, 8
    else:
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        count_format, entry_size, inline = "H", 12, 4
    count_size = struct.calcsize(count_format)
    if ifd + count_size > len(data):
        raise _Unreadable(f"TIFF image directory at byte {ifd}, past the end of the file ({len(data)} bytes)")
    (entries,) = struct.unpack_from(order + count_format, data, ifd)
    if ifd + count_size + entries * entry_size > len(data):
        raise _Unreadable(f"TIFF image directory at byte {ifd} runs past the end of the file")
    tags: dict[int, list[int]] = {}
    for k in range(entries):
        at = ifd + count_size + k * entry_size
        tag, kind = struct.unpack_from(order + "HH", data, at)
        if kind not in _TIFF_TYPES:
            continue
        (n,) = struct.unpack_from(order + ("Q" if big else "I"), data, at + 4)
        item = struct.calcsize(_TIFF_TYPES[kind])
        if n * item <= inline:
            where = at + 4 + (8 if big else 4)
        else:
            (where,) = struct.unpack_from(order + ("Q" if big else "I"), data, at + 4 + (8 if big else 4))
        if where + n * item > len(data):
            raise _Unreadable(f"TIFF tag {tag} values at byte {where}, past the end of the file")
        if tag in (_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_STRIPS, _TIFF_STRIP_BYTES, _TIFF_TILES, _TIFF_TILE_BYTES):
            values = np.frombuffer(data, np.dtype(order + _TIFF_TYPES[kind]), count=n, offset=where)
            tags[tag] = values.astype(np.uint64).tolist()
    if not tags.get(_TIFF_WIDTH) or not tags.get(_TIFF_HEIGHT):
        raise _Unreadable("TIFF image directory without ImageWidth and ImageLength")
    problem = None
    for offsets_tag, counts_tag in ((_TIFF_STRIPS, _TIFF_STRIP_BYTES), (_TIFF_TILES, _TIFF_TILE_BYTES)):
        offsets, counts = tags.get(offsets_tag, []), tags.get(counts_tag, [])
        ends = [o + c for o, c in zip(offsets, counts, strict=False)]
        if ends and max(ends) > len(data):
            problem = f"is truncated: its image data ends at byte {max(ends)}, the file has {len(data)} bytes"
    return _checked_size("TIFF", tags[_TIFF_WIDTH][0], tags[_TIFF_HEIGHT][0], problem)
