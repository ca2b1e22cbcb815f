"""The bit-depth rule (runtime.image_io.to_uint8): reference values, and the same 8-bit arrays from the
training side's reader (train.fit.read_batches over train.data samples) and the runtime's (sources.stream)."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb, to_uint8, write_png
from tilecore.runtime.manifest import Fields, _read_preprocess
from tilecore.runtime.preprocess import Preprocess
from tilecore.runtime.sources import stream
from tilecore.train.config import config_from_dict
from tilecore.train.data import load_category
from tilecore.train.fit import read_batches


def reference(values: np.ndarray, bits: int) -> np.ndarray:
    """The documented rule in floating point: v * 255 / (2^bits - 1), rounded half up, clipped to 0..255."""
    top = 2**bits - 1
    return np.clip(np.floor(values.astype(np.float64) * 255 / top + 0.5), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("bits", "values", "expected"),
    [
        (12, [0, 8, 2048, 4095, 4096, 65535], [0, 0, 128, 255, 255, 255]),  # 8 * 255 / 4095 = 0.498
        (16, [0, 128, 32768, 65535], [0, 0, 128, 255]),  # 128 * 255 / 65535 = 0.498
        (10, [0, 2, 511, 1023, 1024], [0, 0, 127, 255, 255]),  # 2 * 255 / 1023 = 0.4985, 511 -> 127.38
        (14, [8191, 16383], [127, 255]),
    ],
)
def test_reference_values(bits: int, values: list[int], expected: list[int]) -> None:
    pixels = np.array(values, dtype=np.uint16)
    assert to_uint8(pixels, "test", bits).tolist() == expected
    np.testing.assert_array_equal(to_uint8(pixels, "test", bits), reference(pixels, bits))


def test_every_16_bit_value_follows_the_rule() -> None:
    every = np.arange(65536, dtype=np.uint16)
    for bits in (10, 12, 14, 16):
        np.testing.assert_array_equal(to_uint8(every, "test", bits), reference(every, bits))
    np.testing.assert_array_equal(to_uint8(every, "test", "auto"), reference(every, 16))


def write_cases(folder: Path) -> dict[str, tuple[np.ndarray, int | str, np.ndarray]]:
    """file name -> (what it holds, the bit_depth to read it with, the RGB uint8 expected)."""
    rng = np.random.default_rng(0)
    colour16 = rng.integers(0, 65536, (5, 7, 3), dtype=np.uint16)  # BGR as written
    mono12 = rng.integers(0, 4096, (5, 7), dtype=np.uint16)
    mono8 = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    cases = {
        "colour16.png": (colour16, "auto", reference(colour16, 16)[:, :, ::-1]),
        "colour16_as_16.png": (colour16, 16, reference(colour16, 16)[:, :, ::-1]),
        "mono12.png": (mono12, 12, np.repeat(reference(mono12, 12)[:, :, None], 3, axis=2)),
        "mono8.png": (mono8, "auto", np.repeat(mono8[:, :, None], 3, axis=2)),
    }
    folder.mkdir(parents=True)
    for name, (pixels, _, _) in cases.items():
        assert cv2.imwrite(str(folder / name), pixels)
    return cases


def test_training_and_runtime_read_the_same_arrays(tmp_path: Path) -> None:
    cases = write_cases(tmp_path / "images")
    for name, (_, depth, expected) in cases.items():
        path = tmp_path / "images" / name
        (runtime_item,) = list(stream(str(path), bit_depth=depth))
        assert runtime_item.error is None, runtime_item.error
        np.testing.assert_array_equal(runtime_item.image, expected)
        np.testing.assert_array_equal(read_rgb(path, bit_depth=depth), expected)


def test_training_samples_carry_the_configs_bit_depth(tmp_path: Path) -> None:
    """A plain dataset of 12-bit mono PNGs: the samples a run reads give the runtime's arrays."""
    root = tmp_path / "parts"
    rng = np.random.default_rng(1)
    for i in range(6):
        (root / "good").mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / "good" / f"{i}.png"), rng.integers(0, 4096, (4, 6), dtype=np.uint16))
    config = config_from_dict({"data": {"root": str(root), "bit_depth": 12, "val_fraction": 0.25}})
    d = config.data
    data = load_category(root, "parts", d.format, d.val_fraction, d.split_seed, d.test_fraction, d.bit_depth)
    samples = data.train + data.validation + data.test
    assert {s.bit_depth for s in samples} == {12} and len(samples) == 6
    skipped: list[str] = []
    trained = [image for _, images in read_batches(samples, 4, skipped) for image in images]
    assert skipped == []
    runtime = [item.image for s in samples for item in stream(str(s.image), bit_depth=12)]
    for a, b in zip(trained, runtime, strict=True):
        np.testing.assert_array_equal(a, b)
    assert max(int(image.max()) for image in trained) > 200  # 12-bit values were stretched, not cut to 8 bits


def test_depths_that_do_not_fit_the_file_are_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "eight.png", np.zeros((4, 4, 3), np.uint8))
    assert cv2.imwrite(str(tmp_path / "sixteen.png"), np.zeros((4, 4), np.uint16))
    with pytest.raises(TilecoreError, match="eight.png: 8-bit pixels, but bit_depth 12 expects a 16-bit image"):
        read_rgb(tmp_path / "eight.png", bit_depth=12)
    with pytest.raises(TilecoreError, match="sixteen.png: 16-bit pixels, but bit_depth 8 expects 8-bit"):
        read_rgb(tmp_path / "sixteen.png", bit_depth=8)
    (item,) = list(stream(str(tmp_path / "sixteen.png")))  # the runtime's default is an older bundle's: 8
    assert "16-bit pixels" in item.error
    with pytest.raises(TilecoreError, match=r"bit_depth 9: expected one of \['auto', 8, 10, 12, 14, 16\]"):
        to_uint8(np.zeros(2, np.uint16), "test", 9)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (9, r'data.bit_depth: got integer 9, expected "auto" or one of 8, 10, 12, 14, 16'),
        ("12", r"data.bit_depth: got string '12', expected"),
        (12.0, r"data.bit_depth: got number 12.0, expected"),
        (True, r"data.bit_depth: got boolean True, expected"),
    ],
)
def test_config_refuses_other_depths(value: object, message: str) -> None:
    with pytest.raises(TilecoreError, match=message):
        config_from_dict({"data": {"bit_depth": value}})


def test_manifest_records_the_rule_and_older_records_mean_8() -> None:
    record = json.loads(json.dumps(Preprocess(48, 96, bit_depth=12).to_dict()))  # as manifest.json holds it
    assert record["bit_depth"] == 12
    assert _read_preprocess(Fields(record, "members[0].preprocess", "bundle b")).bit_depth == 12
    older = {k: v for k, v in record.items() if k != "bit_depth"}
    assert _read_preprocess(Fields(older, "members[0].preprocess", "bundle b")).bit_depth == 8
    with pytest.raises(TilecoreError, match=r"members\[0\].preprocess.bit_depth: expected one of"):
        _read_preprocess(Fields({**record, "bit_depth": 11}, "members[0].preprocess", "bundle b"))
