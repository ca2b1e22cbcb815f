from pathlib import Path

import cv2
import numpy as np
import pytest

from tilecore.runtime.artifacts import atomic_write, atomic_write_json, sha256_file
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_mask, read_rgb, write_png
from tilecore.runtime.preprocess import Preprocess, preprocess_batch


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
    [("empty.png", b"", "empty"), ("junk.png", b"not an image at all", "cannot decode")],
)
def test_bad_files_are_refused_by_name(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TilecoreError, match=message) as info:
        read_rgb(tmp_path / name)
    assert name in str(info.value)


def test_sixteen_bit_is_refused(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((4, 4, 3), 60000, dtype=np.uint16))
    with pytest.raises(TilecoreError, match="uint16"):
        read_rgb(tmp_path / "deep.png")


def test_mask_is_boolean(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[1, 2] = 255
    write_png(tmp_path / "m.png", mask)
    assert read_mask(tmp_path / "m.png").sum() == 1


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

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.json", crash)
    assert sha256_file(tmp_path / "a.json") == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
