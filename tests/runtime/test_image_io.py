import json
import os
import struct
import threading
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from tilecore.runtime import image_io
from tilecore.runtime.artifacts import atomic_write, atomic_write_json, sha256_file
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_headers import read_header
from tilecore.runtime.image_io import (
    DEFAULT_MAX_PIXELS,
    display_path,
    pixel_limit,
    read_mask,
    read_rgb,
    write_png,
)
from tilecore.runtime.preprocess import Preprocess, preprocess_batch

# --------------------------------------------------------------------------------------------------
# Files built by hand


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zeros_png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of zeros, small on disk, built without compressing width x height bytes.

    Rows are compressed a block at a time with a full flush, which resets the compressor, so every full
    block compresses to the same bytes: compress two, repeat the second, and write the Adler-32 of all
    the zeros (a = 1, b = n mod 65521) in place of the one zlib computed.
    """
    row = width + 1  # filter byte + pixels
    per_block = max(1, (1 << 20) // row)
    blocks, rest = divmod(height, per_block)
    if blocks < 2:
        idat = zlib.compress(b"\x00" * (row * height))
    else:
        compressor = zlib.compressobj(9)
        block = b"\x00" * (row * per_block)
        head = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
        repeat = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
        tail = compressor.compress(b"\x00" * (row * rest)) + compressor.flush()
        adler = (((row * height) % 65521) << 16) | 1
        idat = head + repeat * (blocks - 1) + tail[:-4] + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def textured(hw: tuple[int, int] = (48, 64), channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = hw if channels == 1 else (*hw, channels)
    return cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (5, 5), 0)


def encoded(ext: str, image: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    ok, data = cv2.imencode(ext, image, list(params))
    assert ok, ext
    return data.tobytes()


def tiff_bytes(width: int, height: int, strip: int, big: bool) -> bytes:
    """A little-endian TIFF (or BigTIFF) with its directory first, then one strip of `strip` bytes."""
    if big:
        header, entry, count = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16), "<HHQQ", "<Q"
    else:
        header, entry, count = b"II*\x00" + struct.pack("<I", 8), "<HHII", "<H"
    entries = [(256, 4, 1, width), (257, 4, 1, height), (273, 4, 1, 0), (279, 4, 1, strip)]
    next_directory = "<Q" if big else "<I"
    directory_size = struct.calcsize(count) + len(entries) * struct.calcsize(entry) + struct.calcsize(next_directory)
    data_at = len(header) + directory_size
    entries[2] = (273, 4, 1, data_at)
    directory = struct.pack(count, len(entries)) + b"".join(struct.pack(entry, *e) for e in entries)
    directory += struct.pack(next_directory, 0)  # no next directory
    return header + directory + b"\x00" * strip


# --------------------------------------------------------------------------------------------------
# Decoding


def test_rgb_round_trip_keeps_channel_order(tmp_path: Path) -> None:
    image = np.zeros((5, 6, 3), dtype=np.uint8)
    image[..., 0] = 200  # red
    write_png(tmp_path / "red.png", image)
    np.testing.assert_array_equal(read_rgb(tmp_path / "red.png"), image)


def test_gray_and_rgba_become_rgb(tmp_path: Path) -> None:
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    np.testing.assert_array_equal(read_rgb(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, axis=2))
    bgra = np.dstack([np.full((4, 5), v, np.uint8) for v in (10, 20, 30, 255)])
    cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
    assert read_rgb(tmp_path / "rgba.png")[0, 0].tolist() == [30, 20, 10]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "empty"),
        ("junk.png", b"not an image at all", "cannot decode, unreadable header: not a PNG, JPEG"),
        ("short.png", b"\x89PNG\r\n\x1a\n\x00\x00", "cannot decode, unreadable header: PNG without an IHDR"),
        ("anim.gif", b"GIF89a" + b"\x00" * 40, "unknown signature"),
    ],
)
def test_bad_files_are_refused_by_name(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TilecoreError, match=message) as info:
        read_rgb(tmp_path / name)
    assert name in str(info.value)


def test_sixteen_bit_is_refused_under_bit_depth_8(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((4, 4, 3), 60000, dtype=np.uint16))
    with pytest.raises(TilecoreError, match="deep.png: 16-bit pixels, but bit_depth 8 expects 8-bit"):
        read_rgb(tmp_path / "deep.png", bit_depth=8)


def test_mask_is_boolean(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1, 2] = 255
    write_png(tmp_path / "m.png", mask)
    assert read_mask(tmp_path / "m.png").sum() == 1


FORMATS = [
    (".png", ()),
    (".jpg", ()),
    (".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
    (".bmp", ()),
    (".tif", ()),
    (".webp", (cv2.IMWRITE_WEBP_QUALITY, 80)),  # lossy: VP8
    (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),  # lossless: VP8L
]


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize(("ext", "params"), FORMATS)
def test_header_size_matches_the_decoded_image(ext: str, params: tuple[int, ...], channels: int) -> None:
    data = encoded(ext, textured((37, 53), channels), params)
    header = read_header(data)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert (header.height, header.width) == decoded.shape[:2] == (37, 53)
    assert header.problem is None


@pytest.mark.parametrize(("ext", "params"), FORMATS)
def test_files_read_from_any_format(tmp_path: Path, ext: str, params: tuple[int, ...]) -> None:
    image = textured()
    (tmp_path / f"x{ext}").write_bytes(encoded(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params))
    read = read_rgb(tmp_path / f"x{ext}")
    assert read.shape == image.shape and read.dtype == np.uint8
    assert np.abs(read.astype(int) - image).mean() < 8  # lossy formats: close; channels not swapped


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
@pytest.mark.parametrize(("ext", "params"), FORMATS)
def test_truncated_files_are_refused_with_a_reason(
    tmp_path: Path, ext: str, params: tuple[int, ...], fraction: float
) -> None:
    data = encoded(ext, textured((64, 80)), params)
    (tmp_path / f"cut{ext}").write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(TilecoreError, match=r"truncated|past the end") as info:
        read_rgb(tmp_path / f"cut{ext}")
    assert f"cut{ext}" in str(info.value)


def test_jpeg_without_its_end_marker_is_refused(tmp_path: Path) -> None:
    # OpenCV's file reader decodes this with only "Premature end of JPEG file" on stderr: it was scored.
    (tmp_path / "cut.jpg").write_bytes(encoded(".jpg", textured((64, 80)))[:-2])
    with pytest.raises(TilecoreError, match=r"cut\.jpg: JPEG is truncated: it ends at byte \d+ without its end-of"):
        read_rgb(tmp_path / "cut.jpg")
    half = encoded(".jpg", textured((64, 80)))
    (tmp_path / "half.jpg").write_bytes(half[: len(half) // 2])
    with pytest.raises(TilecoreError, match="half.jpg: JPEG is truncated"):
        read_rgb(tmp_path / "half.jpg")


def test_jpeg_with_data_after_its_end_is_read(tmp_path: Path) -> None:
    (tmp_path / "tail.jpg").write_bytes(encoded(".jpg", textured((64, 80))) + b"camera trailer \xff\x00\xff")
    assert read_rgb(tmp_path / "tail.jpg").shape == (64, 80, 3)


def test_png_with_a_bad_ancillary_crc_is_refused(tmp_path: Path) -> None:
    # libpng only warns about a damaged ancillary chunk and decodes the image: it was scored.
    data = encoded(".png", textured((16, 16)))
    text = png_chunk(b"tEXt", b"Comment\x00fine")
    broken = text[:-1] + bytes([text[-1] ^ 0xFF])
    (tmp_path / "crc.png").write_bytes(data[:33] + broken + data[33:])
    with pytest.raises(TilecoreError, match=r"crc\.png: PNG is corrupt: chunk b'tEXt' at byte 33 fails its CRC"):
        read_rgb(tmp_path / "crc.png")
    (tmp_path / "ok.png").write_bytes(data[:33] + text + data[33:])
    assert read_rgb(tmp_path / "ok.png").shape == (16, 16, 3)


def test_png_without_iend_is_refused(tmp_path: Path) -> None:
    data = encoded(".png", textured((16, 16)))
    (tmp_path / "noend.png").write_bytes(data[:-12])  # IEND is the last 12 bytes
    with pytest.raises(TilecoreError, match="noend.png: PNG is truncated: it ends at byte .* without its IEND"):
        read_rgb(tmp_path / "noend.png")


@pytest.mark.parametrize("big", [False, True])
def test_tiff_headers_and_cut_strips(big: bool) -> None:
    data = tiff_bytes(7, 5, 7 * 5, big)
    header = read_header(data)
    assert (header.format, header.width, header.height, header.problem) == ("TIFF", 7, 5, None)
    cut = read_header(data[:-10])
    assert (cut.width, cut.height) == (7, 5)
    assert cut.problem == f"is truncated: its image data ends at byte {len(data)}, the file has {len(data) - 10} bytes"


# --------------------------------------------------------------------------------------------------
# The pixel limit


def test_zeros_png_is_a_real_png() -> None:
    data = zeros_png(3000, 700)  # several full blocks: the repeated-block path
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (700, 3000) and not decoded.any()


def test_huge_png_is_refused_from_its_header_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(zeros_png(20000, 20000))
    assert path.stat().st_size < 1_000_000  # 400 megapixels, under 1 MB on disk

    def never(*args: object) -> None:
        raise AssertionError("cv2.imdecode called on an image over the pixel limit")

    monkeypatch.setattr(image_io.cv2, "imdecode", never)
    tracemalloc.start()
    try:
        with pytest.raises(
            TilecoreError,
            match=r"^image .*huge\.png: 20000x20000 PNG is 400\.0 megapixels, over the limit of 100\.0 megapixels "
            r"\(raise it with TILECORE_MAX_PIXELS\)$",
        ):
            read_rgb(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8_000_000  # the file's bytes, not 400 MB of pixels
    with pytest.raises(TilecoreError, match="huge.png: 20000x20000 PNG is 400.0 megapixels"):
        read_mask(path)


def test_pixel_limit_argument_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_png(tmp_path / "ten.png", np.zeros((10, 10, 3), np.uint8))
    assert read_rgb(tmp_path / "ten.png", max_pixels=100).shape == (10, 10, 3)
    with pytest.raises(TilecoreError, match=r"ten\.png: 10x10 PNG is 0\.0 megapixels, over the limit"):
        read_rgb(tmp_path / "ten.png", max_pixels=99)
    monkeypatch.setenv("TILECORE_MAX_PIXELS", "99")
    assert pixel_limit() == 99
    with pytest.raises(TilecoreError, match="over the limit"):
        read_rgb(tmp_path / "ten.png")
    assert read_rgb(tmp_path / "ten.png", max_pixels=100).shape == (10, 10, 3)  # the argument wins
    monkeypatch.setenv("TILECORE_MAX_PIXELS", "lots")
    with pytest.raises(TilecoreError, match=r"^TILECORE_MAX_PIXELS='lots': expected a whole number of pixels >= 1$"):
        read_rgb(tmp_path / "ten.png")
    monkeypatch.delenv("TILECORE_MAX_PIXELS")
    assert pixel_limit() == DEFAULT_MAX_PIXELS
    with pytest.raises(TilecoreError, match="max_pixels 0: expected"):
        read_rgb(tmp_path / "ten.png", max_pixels=0)


def test_a_file_too_big_for_the_limit_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_io, "_FILE_SLACK_BYTES", 0)
    (tmp_path / "padded.png").write_bytes(encoded(".png", np.zeros((2, 2), np.uint8)) + b"\x00" * 200)
    with pytest.raises(TilecoreError, match=r"padded\.png: file is \d+ bytes, more than any image within the pixel"):
        read_rgb(tmp_path / "padded.png", max_pixels=10)  # at most 8 bytes a pixel: 80 bytes


# --------------------------------------------------------------------------------------------------
# File names and file kinds


def test_file_name_that_is_not_utf8(tmp_path: Path) -> None:
    raw_name = os.fsencode(tmp_path) + b"/caf\xe9_\xff.png"
    fd = os.open(raw_name, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, encoded(".png", cv2.cvtColor(textured((6, 7)), cv2.COLOR_RGB2BGR)))
    os.close(fd)
    (listed,) = tmp_path.iterdir()  # as the file system gives it: surrogateescape
    np.testing.assert_array_equal(read_rgb(listed), textured((6, 7)))
    assert read_mask(os.fsdecode(raw_name)).shape == (6, 7)
    shown = display_path(listed)
    assert shown == f"{tmp_path}/caf\\xe9_\\xff.png"
    assert json.loads(json.dumps({"input": shown}, ensure_ascii=False).encode("utf-8")) == {"input": shown}

    bad = os.fsencode(tmp_path) + b"/bad_\xfe.png"
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"junk")
    os.close(fd)
    with pytest.raises(TilecoreError, match=r"bad_\\xfe\.png: cannot decode") as info:
        read_rgb(os.fsdecode(bad))
    str(info.value).encode("utf-8")  # printable: no lone surrogates


def test_non_files_are_refused_by_kind(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    (tmp_path / "dir.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    cases = {"link.png": "broken symbolic link", "dir.png": "is a folder", "pipe.png": "not a regular file"}
    errors: dict[str, str] = {}

    def read_all() -> None:
        for name in cases:
            try:
                read_rgb(tmp_path / name)
            except TilecoreError as error:
                errors[name] = str(error)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    for name, reason in cases.items():
        assert errors[name].startswith(f"image {tmp_path / name}: {reason}"), errors[name]
    with pytest.raises(TilecoreError, match="missing.png: file not found"):
        read_rgb(tmp_path / "missing.png")


# --------------------------------------------------------------------------------------------------


def test_preprocess_normalises_per_channel() -> None:
    image = np.full((8, 8, 3), 255, dtype=np.uint8)
    spec = Preprocess(4, 4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 0.5))
    batch = preprocess_batch([image], spec)
    assert batch.shape == (1, 3, 4, 4)
    np.testing.assert_allclose(batch[0, :, 0, 0], [1.0, 2.0, 1.0])


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    before = sha256_file(tmp_path / "a.json")

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(tmp_path / "a.json", crash)
    assert sha256_file(tmp_path / "a.json") == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
