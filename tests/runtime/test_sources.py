import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tilecore.runtime import sources
from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import read_rgb, write_png
from tilecore.runtime.sources import Item, iter_sources, stream, validate_image


def image(value: int, hw: tuple[int, int] = (6, 5)) -> np.ndarray:
    array = np.zeros((*hw, 3), dtype=np.uint8)
    array[..., 0] = value  # red channel, so a BGR/RGB swap shows
    return array


def make_images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        write_png(folder / name, image(10 * (i + 1)))
        paths.append(folder / name)
    return paths


def names(spec: str, **kwargs) -> list[str]:
    return [item.name for item in stream(spec, **kwargs)]


def sources_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tilecore-")]


def wait_for_threads(baseline: int) -> None:
    deadline = time.monotonic() + 1.0
    while (threading.active_count() > baseline or sources_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == baseline, threading.enumerate()
    assert not sources_threads()


def test_single_file(tmp_path: Path) -> None:
    (path,) = make_images(tmp_path, ["a.png"])
    items = list(stream(str(path)))
    assert len(items) == 1
    assert items[0].name == str(path) and items[0].error is None
    np.testing.assert_array_equal(items[0].image, image(10))


def test_folder_is_sorted_and_ignores_non_images(tmp_path: Path) -> None:
    make_images(tmp_path, ["b.png", "a.PNG", "c.jpg"])
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    write_png(tmp_path / "sub" / "nested.png", image(1))  # not recursive
    assert names(str(tmp_path)) == [str(tmp_path / n) for n in ("a.PNG", "b.png", "c.jpg")]


def test_glob_is_sorted(tmp_path: Path) -> None:
    for category in ("bottle", "cable"):
        make_images(tmp_path / category / "test" / "good", ["001.png", "000.png"])
    (tmp_path / "bottle" / "test" / "good" / "readme.md").write_text("x")
    pattern = str(tmp_path / "*" / "test" / "*" / "*")
    expected = [str(tmp_path / c / "test" / "good" / n) for c in ("bottle", "cable") for n in ("000.png", "001.png")]
    assert names(pattern) == expected


def test_list_file_comments_relative_paths_and_missing_entry(tmp_path: Path) -> None:
    make_images(tmp_path / "imgs", ["x.png", "y.png"])
    absolute = make_images(tmp_path / "elsewhere", ["z.png"])[0]
    listing = tmp_path / "lists" / "inputs.txt"
    listing.parent.mkdir()
    listing.write_text(f"# test set\n\n../imgs/y.png\n  ../imgs/missing.png  \n{absolute}\n# done\n../imgs/x.png\n")
    items = list(stream(str(listing)))
    assert [Path(item.name).name for item in items] == ["y.png", "missing.png", "z.png", "x.png"]
    assert [item.error is None for item in items] == [True, False, True, True]
    assert "missing.png" in items[1].error and "not found" in items[1].error and items[1].image is None
    np.testing.assert_array_equal(items[0].image, read_rgb(tmp_path / "imgs" / "y.png"))


def test_bad_images_become_error_items_and_the_stream_goes_on(tmp_path: Path) -> None:
    make_images(tmp_path, ["a_good.png", "z_good.png"])
    (tmp_path / "b_empty.png").write_bytes(b"")
    (tmp_path / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cv2.imwrite(str(tmp_path / "d_deep.png"), np.full((4, 4, 3), 60000, dtype=np.uint16))
    items = list(stream(str(tmp_path)))
    assert [Path(item.name).name for item in items] == [
        "a_good.png",
        "b_empty.png",
        "c_corrupt.png",
        "d_deep.png",
        "z_good.png",
    ]
    for item in items:
        if "good" in item.name:
            assert item.error is None and item.image.shape == (6, 5, 3)
        else:
            assert item.image is None
            assert Path(item.name).name in item.error and "\n" not in item.error
    assert "empty" in items[1].error and "decode" in items[2].error and "uint16" in items[3].error


@pytest.mark.parametrize("kind", ["empty folder", "no match", "empty glob", "empty list", "bad suffix"])
def test_nothing_to_read_is_refused_up_front(tmp_path: Path, kind: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    (tmp_path / "list.txt").write_text("# nothing\n\n")
    (tmp_path / "model.onnx").write_bytes(b"x")
    spec, message = {
        "empty folder": (tmp_path / "empty", "no images"),
        "no match": (tmp_path / "nope" / "*.png", "no such file, folder or glob match"),
        "empty glob": (tmp_path / "only_text" / "*", "no images"),
        "empty list": (tmp_path / "list.txt", "names no images"),
        "bad suffix": (tmp_path / "model.onnx", "unsupported file type"),
    }[kind]
    with pytest.raises(TilecoreError, match=message) as info:
        iter_sources(str(spec))  # raises at call time, not at the first next()
    assert str(spec) in str(info.value)
    with pytest.raises(TilecoreError, match=message):
        stream(str(spec))


def write_video(path: Path, frames: list[np.ndarray], fourcc: str = "MJPG") -> bool:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, (w, h))
    if not writer.isOpened():
        return False
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path.is_file() and path.stat().st_size > 0


def test_video_frames_are_rgb_and_named_by_index(tmp_path: Path) -> None:
    frames = [np.zeros((32, 32, 3), dtype=np.uint8) for _ in range(5)]
    for i, frame in enumerate(frames):
        frame[..., 0] = 40 * i + 40  # red grows, blue stays 0
    path = tmp_path / "clip.avi"
    if not write_video(path, frames):
        pytest.skip("this OpenCV build cannot write an MJPG .avi (no video codec available)")
    items = list(stream(str(path)))
    assert [item.name for item in items] == [f"{path}#{i}" for i in range(5)]
    for i, item in enumerate(items):
        assert item.error is None and item.image.dtype == np.uint8 and item.image.shape == (32, 32, 3)
        red, green, blue = item.image.reshape(-1, 3).mean(axis=0)
        assert abs(red - (40 * i + 40)) < 12 and green < 12 and blue < 12  # JPEG is lossy; channels not swapped


def test_unreadable_video_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"this is not a video")
    with pytest.raises(TilecoreError, match="broken.mp4"):
        iter_sources(str(path))


class FakeCapture:
    """Stands in for cv2.VideoCapture(int): three BGR frames, then the camera is unplugged."""

    released = 0

    def __init__(self, index: int, frames: int = 3, opens: bool = True) -> None:
        self.index, self.left, self.opens = index, frames, opens

    def isOpened(self) -> bool:
        return self.opens

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.left == 0:
            return False, None
        self.left -= 1
        frame = np.zeros((4, 4, 3), dtype=np.uint8)
        frame[..., 2] = 200  # BGR: red
        return True, frame

    def release(self) -> None:
        FakeCapture.released += 1


def test_camera_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.cv2, "VideoCapture", FakeCapture)
    FakeCapture.released = 0
    items = list(stream("0"))
    assert [item.name for item in items] == ["camera0#0", "camera0#1", "camera0#2"]
    assert items[0].image[0, 0].tolist() == [200, 0, 0]
    assert FakeCapture.released == 1


def test_camera_that_does_not_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda index: FakeCapture(index, opens=False))
    with pytest.raises(TilecoreError, match="^camera 0: cannot open$"):
        stream("0")


def counting_read_rgb(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[int]:
    """Replace the loaders' read_rgb by one that counts its calls (and optionally sleeps at random)."""
    calls = [0]
    lock = threading.Lock()

    def counted(path: Path) -> np.ndarray:
        if delay:
            time.sleep(random.uniform(0, delay))
        with lock:
            calls[0] += 1
        return read_rgb(path)

    monkeypatch.setattr(sources, "read_rgb", counted)
    return calls


@pytest.mark.parametrize("workers", [1, 3])
def test_queue_is_bounded_with_a_slow_consumer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    make_images(tmp_path, [f"{i:02d}.png" for i in range(12)])
    loaded = counting_read_rgb(monkeypatch)
    queue_size, ahead = 2, []
    for consumed, _item in enumerate(stream(str(tmp_path), queue_size=queue_size, workers=workers), start=1):
        time.sleep(0.02)  # slow consumer: the producer fills the queue and waits
        ahead.append(loaded[0] - consumed)
    assert len(ahead) == 12
    assert max(ahead) <= queue_size + 1
    assert max(ahead) >= queue_size  # it does decode ahead


def test_parallel_workers_keep_input_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = make_images(tmp_path, [f"{i:02d}.png" for i in range(10)])
    counting_read_rgb(monkeypatch, delay=0.01)
    items = list(stream(str(tmp_path), queue_size=4, workers=3))
    assert [item.name for item in items] == [str(p) for p in paths]
    assert [int(item.image[0, 0, 0]) for item in items] == [10 * (i + 1) for i in range(10)]


@pytest.mark.parametrize("workers", [1, 2])
def test_stopping_early_stops_the_thread(tmp_path: Path, workers: int) -> None:
    make_images(tmp_path, [f"{i:02d}.png" for i in range(20)])
    baseline = threading.active_count()
    for _item in stream(str(tmp_path), queue_size=2, workers=workers):
        break
    wait_for_threads(baseline)

    items = stream(str(tmp_path), queue_size=2, workers=workers)
    assert next(items).error is None
    assert sources_threads()  # running, and blocked on the full queue
    items.close()
    wait_for_threads(baseline)


def test_a_bug_in_a_loader_propagates_and_stops_the_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path, ["a.png", "b.png"])
    baseline = threading.active_count()

    def broken(path: Path) -> np.ndarray:
        raise RuntimeError("bug")

    monkeypatch.setattr(sources, "read_rgb", broken)
    with pytest.raises(RuntimeError, match="bug"):
        list(stream(str(tmp_path)))
    wait_for_threads(baseline)


def test_validate_image() -> None:
    assert validate_image(np.zeros((32, 40, 3), np.uint8), (32, 32)) is None
    assert validate_image(np.zeros((20, 30, 3), np.uint8), (32, 32)) == "image 20x30 smaller than one tile 32x32"
    assert "smaller" in validate_image(np.zeros((40, 30, 3), np.uint8), (32, 32))
    assert "uint8" in validate_image(np.zeros((40, 40, 3), np.uint16), (32, 32))
    assert "[H, W, 3]" in validate_image(np.zeros((40, 40), np.uint8), (32, 32))


def test_item_fields() -> None:
    item = Item("a.png", None, "image a.png: file not found")
    assert (item.name, item.image, item.error) == ("a.png", None, "image a.png: file not found")


def test_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'timm', 'torchvision'):\n"
        "    sys.modules[name] = None\n"
        "import tilecore.runtime.sources\n"
        "assert not any(sys.modules.get(m) is not None for m in ('torch', 'timm', 'torchvision'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
