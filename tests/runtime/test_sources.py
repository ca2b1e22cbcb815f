import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.faults import obey_file_modes
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
    write_png(tmp_path / "sub" / "nested.png", image(1))
    assert names(str(tmp_path)) == [str(tmp_path / n) for n in ("a.PNG", "b.png", "c.jpg", "sub/nested.png")]


def test_folder_is_recursive_with_unique_relative_names(tmp_path: Path) -> None:
    """Images in subfolders are scored, in path order; two files sharing a name in different subfolders
    keep distinct names (each is its path under the folder given)."""
    make_images(tmp_path / "line1" / "cam0", ["001.png", "000.png"])
    make_images(tmp_path / "line2", ["000.png"])
    make_images(tmp_path, ["top.png"])
    (tmp_path / "line2" / "empty").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)  # never followed
    (tmp_path / "x.png").mkdir()  # a folder named like an image: listed, then an error Item
    items = list(stream(str(tmp_path)))
    relative = [str(Path(item.name).relative_to(tmp_path)) for item in items]
    assert relative == ["line1/cam0/000.png", "line1/cam0/001.png", "line2/000.png", "top.png", "x.png"]
    assert len(set(item.name for item in items)) == len(items)
    assert [item.error is None for item in items] == [True, True, True, True, False]
    assert "is a folder" in items[-1].error


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
    assert "empty" in items[1].error and "decode" in items[2].error and "16-bit" in items[3].error


def make_non_files(folder: Path) -> dict[str, str]:
    """Entries with image names that are not readable images; returns name -> expected reason."""
    folder.mkdir(parents=True, exist_ok=True)
    os.symlink(folder / "nowhere.png", folder / "b_broken_link.png")
    (folder / "c_folder.png").mkdir()
    os.mkfifo(folder / "d_pipe.jpg")
    (folder / "e_cut.jpg").write_bytes(cv2.imencode(".jpg", np.full((40, 40, 3), 90, np.uint8))[1].tobytes()[:-2])
    return {
        "b_broken_link.png": "broken symbolic link",
        "c_folder.png": "is a folder, expected an image file",
        "d_pipe.jpg": "not a regular file",
        "e_cut.jpg": "JPEG is truncated",
    }


def assert_accounted(items: list[Item], folder: Path, good: list[str], bad: dict[str, str]) -> None:
    assert [item.name for item in items] == [str(folder / n) for n in sorted([*good, *bad])]
    for item in items:
        name = Path(item.name).name
        if name in good:
            assert item.error is None and item.image.shape == (6, 5, 3), item.error
        else:
            assert item.image is None and bad[name] in item.error and item.name in item.error, item.error


def test_folder_entries_that_are_not_images_are_error_items(tmp_path: Path) -> None:
    # Before: `p.is_file()` dropped the link, the folder and the pipe without a line.
    make_images(tmp_path, ["a_good.png", "z_good.png"])
    bad = make_non_files(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image name: ignored")
    (tmp_path / "sub").mkdir()
    assert_accounted(list(stream(str(tmp_path))), tmp_path, ["a_good.png", "z_good.png"], bad)


def test_glob_matches_that_are_not_images_are_error_items(tmp_path: Path) -> None:
    make_images(tmp_path, ["a_good.png", "z_good.png"])
    bad = make_non_files(tmp_path)
    assert_accounted(list(stream(str(tmp_path / "*"))), tmp_path, ["a_good.png", "z_good.png"], bad)
    items = list(stream(str(tmp_path / "*.png")))
    assert [Path(item.name).name for item in items] == ["a_good.png", "b_broken_link.png", "c_folder.png", "z_good.png"]


def test_list_entries_that_are_missing_or_folders_are_error_items(tmp_path: Path) -> None:
    make_images(tmp_path, ["a.png"])
    (tmp_path / "sub.png").mkdir()
    (tmp_path / "list.txt").write_text("a.png\nmissing.png\nsub.png\na.png\n")
    items = list(stream(str(tmp_path / "list.txt")))
    assert [Path(item.name).name for item in items] == ["a.png", "missing.png", "sub.png", "a.png"]
    assert [item.error for item in items] == [
        None,
        f"image {tmp_path / 'missing.png'}: file not found",
        f"image {tmp_path / 'sub.png'}: is a folder, expected an image file",
        None,
    ]


def test_unreadable_file_is_an_error_item(tmp_path: Path) -> None:
    (path,) = make_images(tmp_path, ["locked.png"])
    path.chmod(0)
    code = "import sys; from tilecore.runtime.sources import stream; print(next(iter(stream(sys.argv[1]))).error)"
    child = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, preexec_fn=obey_file_modes
    )  # as root, a mode-000 file is readable otherwise
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == f"image {path}: cannot open (Permission denied)"


def test_names_that_are_not_utf8_are_json_safe_and_read(tmp_path: Path) -> None:
    make_images(tmp_path, ["a.png"])
    fd = os.open(os.fsencode(tmp_path) + b"/b_caf\xe9\xff.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, (tmp_path / "a.png").read_bytes())
    os.close(fd)
    fd = os.open(os.fsencode(tmp_path) + b"/c_\xfe.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"junk")
    os.close(fd)
    items = list(stream(str(tmp_path)))
    assert [item.name for item in items] == [str(tmp_path / n) for n in ("a.png", "b_caf\\xe9\\xff.png", "c_\\xfe.png")]
    np.testing.assert_array_equal(items[1].image, items[0].image)
    assert items[2].image is None and items[2].error.startswith(f"image {items[2].name}: cannot decode")
    for item in items:  # a strict writer (ensure_ascii=False, UTF-8) writes every line and reads it back
        line = json.dumps({"input": item.name, "error": item.error}, ensure_ascii=False).encode("utf-8")
        assert json.loads(line.decode("utf-8")) == {"input": item.name, "error": item.error}


def test_bad_pixel_limit_setting_is_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images(tmp_path, ["a.png"])
    monkeypatch.setenv("TILECORE_MAX_PIXELS", "-5")
    with pytest.raises(TilecoreError, match="^TILECORE_MAX_PIXELS='-5': expected a whole number"):
        stream(str(tmp_path))


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
    """Stands in for cv2.VideoCapture: `frames` BGR frames, then every read fails (camera unplugged)."""

    released = 0

    def __init__(self, source: int | str, frames: int = 3, opens: bool = True, count: int = -1, hw=(4, 4)) -> None:
        self.source, self.left, self.opens, self.count, self.hw = source, frames, opens, count, hw

    def isOpened(self) -> bool:
        return self.opens

    def get(self, prop: int) -> float:
        return {
            cv2.CAP_PROP_FRAME_COUNT: self.count,
            cv2.CAP_PROP_FRAME_HEIGHT: self.hw[0],
            cv2.CAP_PROP_FRAME_WIDTH: self.hw[1],
        }.get(prop, 0.0)

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.left == 0:
            return False, None
        self.left -= 1
        frame = np.zeros((*self.hw, 3), dtype=np.uint8)
        frame[..., 2] = 200  # BGR: red
        return True, frame

    def release(self) -> None:
        FakeCapture.released += 1


def test_camera_frames_and_a_disconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.cv2, "VideoCapture", FakeCapture)
    FakeCapture.released = 0
    items = list(stream("0"))
    assert [item.name for item in items] == ["camera0#0", "camera0#1", "camera0#2", "camera0#3"]
    assert items[0].image[0, 0].tolist() == [200, 0, 0]
    assert [item.error for item in items] == [
        None,
        None,
        None,
        "camera 0: frame 3 cannot be read (camera disconnected?)",
    ]
    assert FakeCapture.released == 1


def test_camera_that_does_not_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda index: FakeCapture(index, opens=False))
    with pytest.raises(TilecoreError, match=r"^camera 0: cannot open \(no such camera, or it is in use\)$"):
        stream("0")
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda index: FakeCapture(index, frames=0))
    with pytest.raises(TilecoreError, match="^camera 3: opens but gives no frame$"):
        stream("3")


@pytest.mark.parametrize("spec", ["100", "207", "99999999999999999999999"])
def test_camera_index_out_of_range(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    # OpenCV opened index 207 as V4L2 camera 7; a number past C long raised a cv2 overload traceback.
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda index: pytest.fail("VideoCapture called"))
    with pytest.raises(TilecoreError, match=rf"^camera {spec}: expected a camera index from 0 to 99 "):
        stream(spec)


def test_video_frames_that_fail_are_counted_up_to_the_frame_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cut.avi").write_bytes(b"stand-in")
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda path: FakeCapture(path, frames=3, count=6))
    items = list(stream(str(tmp_path / "cut.avi")))
    assert [item.name for item in items] == [f"{tmp_path / 'cut.avi'}#{i}" for i in range(6)]
    assert [item.error is None for item in items] == [True] * 3 + [False] * 3
    assert items[3].error == f"video {tmp_path / 'cut.avi'}: frame 3 of 6 cannot be read (corrupt or cut short)"


def test_a_long_run_of_failed_frames_ends_in_one_item(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cut.mp4").write_bytes(b"stand-in")
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda path: FakeCapture(path, frames=3, count=1000))
    items = list(stream(str(tmp_path / "cut.mp4")))
    failing = sources.MAX_FAILED_FRAMES
    assert len(items) == 3 + failing
    assert all(item.error for item in items[3:]) and items[-1].name.endswith(f"#{3 + failing - 1}")
    assert items[-1].error == (
        f"video {tmp_path / 'cut.mp4'}: frames {3 + failing - 1} to 999 cannot be read ({failing} reads in a row "
        "failed; the video lists 1000 frames; cut short or corrupt)"
    )


def test_video_without_a_frame_count_ends_at_the_first_failed_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "live.mkv").write_bytes(b"stand-in")
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda path: FakeCapture(path, frames=3, count=0))
    assert [item.error for item in stream(str(tmp_path / "live.mkv"))] == [None] * 3


def test_video_frames_over_the_pixel_limit_are_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "big.avi").write_bytes(b"stand-in")
    monkeypatch.setattr(sources.cv2, "VideoCapture", lambda path: FakeCapture(path, hw=(20000, 20000)))
    with pytest.raises(TilecoreError, match=r"big\.avi: 20000x20000 frames are 400\.0 megapixels, over the limit"):
        stream(str(tmp_path / "big.avi"))


def mjpeg_offsets(data: bytes) -> list[int]:
    """Byte offsets of each frame's JPEG start-of-image marker in an MJPG .avi."""
    return [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]


def test_a_damaged_video_frame_is_an_error_item_and_the_video_goes_on(tmp_path: Path) -> None:
    frames = [np.full((32, 32, 3), 20 * i, dtype=np.uint8) for i in range(10)]
    path = tmp_path / "clip.avi"
    if not write_video(path, frames):
        pytest.skip("this OpenCV build cannot write an MJPG .avi (no video codec available)")
    data = bytearray(path.read_bytes())
    starts = mjpeg_offsets(bytes(data))
    assert len(starts) == 10
    data[starts[4] : starts[5] - 8] = bytes(starts[5] - 8 - starts[4])  # frame 4's JPEG zeroed: undecodable
    (tmp_path / "damaged.avi").write_bytes(bytes(data))
    items = list(stream(str(tmp_path / "damaged.avi")))
    assert [item.name.rsplit("#", 1)[1] for item in items] == [str(i) for i in range(10)]
    assert [item.error is None for item in items] == [True] * 4 + [False] + [True] * 5
    assert "frame 4 of 10 cannot be read" in items[4].error
    assert abs(items[5].image.mean() - 100) < 12  # the frame after the damaged one is frame 5

    (tmp_path / "cut.avi").write_bytes(path.read_bytes()[: starts[6] + 50])  # cut inside frame 6
    items = list(stream(str(tmp_path / "cut.avi")))
    assert len(items) == 10 and [item.error is None for item in items] == [True] * 6 + [False] * 4


def test_video_name_that_is_not_utf8_is_refused_without_a_crash(tmp_path: Path) -> None:
    # cv2.VideoCapture(str) with such a name ended the process with SIGSEGV.
    raw_path = os.fsencode(tmp_path) + b"/clip_\xff.avi"
    fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"not decoded")
    os.close(fd)
    code = (
        "import os, sys\n"
        "from tilecore.runtime.errors import TilecoreError\n"
        "from tilecore.runtime.sources import iter_sources\n"
        "try:\n"
        f"    iter_sources(os.fsdecode({raw_path!r}))\n"
        "except TilecoreError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"video {tmp_path}/clip_\\xff.avi: the file name is not valid UTF-8, which OpenCV's video reader cannot "
        "open (rename the file)"
    )


def counting_read_rgb(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[int]:
    """Replace the loaders' read_rgb by one that counts its calls (and optionally sleeps at random)."""
    calls = [0]
    lock = threading.Lock()

    def counted(path: Path, *args: object) -> np.ndarray:
        if delay:
            time.sleep(random.uniform(0, delay))
        with lock:
            calls[0] += 1
        return read_rgb(path, *args)

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

    def broken(path: Path, *args: object) -> np.ndarray:
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
