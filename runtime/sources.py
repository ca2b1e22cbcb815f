"""Input streams for `tilecore run BUNDLE INPUT`: files, folders, globs, list files, videos and cameras.

`iter_sources(spec)` resolves INPUT into lazily loaded `(name, loader)` pairs and refuses, up front, a spec
that names nothing. `stream(spec)` decodes ahead in a background thread through a bounded queue, so memory
stays bounded however long the stream (a camera never ends), and yields `Item`s in input order.

Every input is accounted for: exactly one `Item` per image file, list entry, glob match and video frame,
with `error` set when it cannot be read, and the stream goes on.

Which kind INPUT is, checked in this order:

* an existing folder: every entry whose name has an image suffix (`IMAGE_SUFFIXES`, any case), in its
  subfolders too (recursive; symbolic links to folders are not followed), sorted by path; entries that
  are not readable image files (broken links, folders named `x.png`, pipes, unreadable or corrupt files)
  are error Items, not dropped;
* an existing file: a video (`VIDEO_SUFFIXES`), a list file (`LIST_SUFFIXES`: one path per line, blank
  lines and lines starting with `#` ignored, relative paths resolved against the list file's folder; a
  missing entry is an error Item) or a single image (`IMAGE_SUFFIXES`); any other suffix is refused;
* a string of digits: a camera index 0 to 99 (`cv2.VideoCapture(index)`; OpenCV reads larger numbers as
  a backend id plus an index, so they are refused);
* a glob pattern (`*`, `?`, `[`; `**` recurses): the matches with an image suffix, sorted, as for folders.

Names (`Item.name`): an image's path, `"<video path>#<frame index>"` for video frames and
`"camera<k>#<frame index>"` for camera frames. Paths are written by `display_path`: a file name that is
not valid UTF-8 has each invalid byte written as `\\xNN` (backslashreplace), so a name is always a str
that any JSON writer and terminal takes, and the same on every run.

Video frames: OpenCV's `read()` returns False both at the end and when a frame cannot be decoded. A
video's `CAP_PROP_FRAME_COUNT` tells them apart: a failed read before that count is an error Item for
that frame index and reading goes on (FFmpeg moves past a frame it cannot decode); at or after the count
it is the end. After `MAX_FAILED_FRAMES` failed reads in a row, one last error Item names the remaining
frames and the video stops (a cut-short file). What cannot be told: when a video reports no count (0 or
less: some streams) every failed read is taken as the end; FFmpeg estimates the count from duration x
frame rate for containers without a frame index (some MKV/WebM), so a failure within the estimate's error
of the end may be taken for either. A camera never ends: a failed camera read is an error Item and the
stream stops there (camera unplugged).
"""

from __future__ import annotations

import glob
import os
import queue
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import (
    IMAGE_SUFFIXES,
    display_path,
    over_pixel_limit,
    pixel_limit,
    read_rgb,
    to_rgb,
)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")
LIST_SUFFIXES = (".txt", ".lst")
MAX_CAMERA_INDEX = 99  # OpenCV reads index >= 100 as (backend id) + (index % 100)
MAX_FAILED_FRAMES = 8  # failed video reads in a row before the rest of the video is given up

Loader = Callable[[], np.ndarray]

_POLL_S = 0.05  # how often a blocked producer or consumer looks at the stop flag
_JOIN_S = 2.0  # how long closing a stream waits for the producer (a daemon thread) to finish


@dataclass
class Item:
    """One input of a stream: its image, or why there is none."""

    name: str  # display_path of the image, "<video path>#<frame index>" or "camera<k>#<frame index>"
    image: np.ndarray | None  # RGB uint8 [H, W, 3] when readable
    error: str | None  # one-line message when not


# --------------------------------------------------------------------------------------------------
# Resolving a spec into (name, loader) pairs


def is_camera(spec: str) -> bool:
    """True when iter_sources reads `spec` as a camera index (digits naming no file or folder)."""
    return re.fullmatch(r"[0-9]+", spec) is not None and not Path(os.path.expanduser(spec)).exists()


def iter_sources(spec: str, bit_depth: str | int = 8) -> Iterator[tuple[str, Loader]]:
    """Resolve INPUT into `(name, loader)` pairs, yielded lazily; each loader returns RGB uint8 [H, W, 3].

    `bit_depth`: how image files' pixels become 8-bit (runtime.image_io.to_uint8; a bundle's preprocessing
    record names it); the default 8 refuses 16-bit files. Video and camera frames are 8-bit.

    Raises TilecoreError at call time (not at the first `next`) when the spec matches nothing, a folder or
    glob holds no image names, a list file lists nothing, a file has an unsupported suffix, or a video or
    camera cannot be opened. Image loaders raise TilecoreError naming the file when it cannot be read.
    Video and camera frames are read as the iterator advances (a frame can only be read after the one
    before it); their loaders only convert BGR to RGB, or raise for a frame that could not be read.
    """
    pixel_limit()  # a bad TILECORE_MAX_PIXELS is refused once, not once per image
    text = os.path.expanduser(spec)
    shown = display_path(spec)
    path = Path(text)
    if path.is_dir():
        images = _folder_images(path)
        if not images:
            raise TilecoreError(f"input {shown}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        return _image_loaders(images, bit_depth)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            return _video_frames(path)
        if suffix in LIST_SUFFIXES:
            return _image_loaders(_read_list(path), bit_depth)
        if suffix in IMAGE_SUFFIXES:
            return _image_loaders([path], bit_depth)
        raise TilecoreError(
            f"input {shown}: unsupported file type '{display_path(path.suffix)}' (expected an image, a video "
            f"{'/'.join(VIDEO_SUFFIXES)} or a list file {'/'.join(LIST_SUFFIXES)})"
        )
    if is_camera(spec):
        return _camera_frames(int(spec))
    if any(c in text for c in "*?["):
        matches = sorted(glob.glob(text, recursive=True))
        images = _image_entries([Path(m) for m in matches])
        if images:
            return _image_loaders(images, bit_depth)
        if matches:
            raise TilecoreError(f"input {shown}: glob matches {len(matches)} paths but no images")
    raise TilecoreError(f"input {shown}: no such file, folder or glob match")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _folder_images(folder: Path) -> list[Path]:
    """Every entry under `folder` with an image suffix, recursively, sorted by path; a folder with an image
    suffix is an entry (an error Item), other folders are descended into unless they are symbolic links."""
    found: list[Path] = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return found  # an unreadable subfolder lists nothing; the top folder was listed by is_dir above
    for entry in entries:
        if _is_image(entry):
            found.append(entry)
        elif entry.is_dir() and not entry.is_symlink():
            found.extend(_folder_images(entry))
    return found


def _image_entries(paths: list[Path]) -> list[Path]:
    """Every path with an image suffix, whatever it is: a non-file becomes an error Item when loaded."""
    return [p for p in paths if _is_image(p)]


def _image_loaders(paths: list[Path], bit_depth: str | int) -> Iterator[tuple[str, Loader]]:
    for path in paths:
        yield display_path(path), lambda path=path: read_rgb(path, None, bit_depth)  # (path, max_pixels, bit_depth)


def _read_list(list_file: Path) -> list[Path]:
    shown = display_path(list_file)
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise TilecoreError(f"input {shown}: not a UTF-8 text file ({error.reason})") from None
    except OSError as error:
        raise TilecoreError(f"input {shown}: cannot read ({error.strerror or error})") from None
    paths = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        paths.append(path if path.is_absolute() else list_file.parent / path)
    if not paths:
        raise TilecoreError(f"input {shown}: list file names no images (one path per line, # comments)")
    return paths


def _failed(message: str) -> Loader:
    def load() -> np.ndarray:
        raise TilecoreError(message)

    return load


def _read_frame(capture: cv2.VideoCapture) -> np.ndarray | None:
    try:
        ok, frame = capture.read()
    except cv2.error:
        return None
    return frame if ok and frame is not None else None


def _check_frame_size(capture: cv2.VideoCapture, what: str) -> None:
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    if too_many := over_pixel_limit(width * height, pixel_limit(), verb="are"):
        capture.release()
        raise TilecoreError(f"{what}: {width}x{height} frames {too_many}")


def _video_frames(path: Path) -> Iterator[tuple[str, Loader]]:
    shown = display_path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise TilecoreError(
            f"video {shown}: the file name is not valid UTF-8, which OpenCV's video reader cannot open "
            "(rename the file)"
        ) from None
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise TilecoreError(f"video {shown}: cannot open (unsupported codec or not a video file)")
    _check_frame_size(capture, f"video {shown}")
    first = _read_frame(capture)
    if first is None:
        capture.release()
        raise TilecoreError(f"video {shown}: no frame could be read (unsupported codec or empty video)")
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    return _frames(capture, first, shown, f"video {shown}", count)


def _camera_frames(index: int) -> Iterator[tuple[str, Loader]]:
    if index > MAX_CAMERA_INDEX:
        raise TilecoreError(
            f"camera {index}: expected a camera index from 0 to {MAX_CAMERA_INDEX} "
            "(OpenCV reads larger numbers as a backend id)"
        )
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # its own warnings, one per backend
    try:
        capture = cv2.VideoCapture(index)
        opened = capture.isOpened()
    except cv2.error:
        capture, opened = None, False
    finally:
        cv2.utils.logging.setLogLevel(level)
    if not opened:
        if capture is not None:
            capture.release()
        raise TilecoreError(f"camera {index}: cannot open (no such camera, or it is in use)")
    _check_frame_size(capture, f"camera {index}")
    first = _read_frame(capture)
    if first is None:
        capture.release()
        raise TilecoreError(f"camera {index}: opens but gives no frame")
    return _frames(capture, first, f"camera{index}", f"camera {index}", None)


def _frames(
    capture: cv2.VideoCapture, first: np.ndarray, prefix: str, what: str, count: int | None
) -> Iterator[tuple[str, Loader]]:
    """One pair per frame, a failed read included (see the module doc); releases the capture when closed.

    `count`: the frame count the video reports (0 or less: unknown), None for a camera (never ends).
    """
    try:
        frame: np.ndarray | None = first
        index = failures = 0
        while True:
            if frame is None:
                frame = _read_frame(capture)
            if frame is not None:
                failures = 0
                yield f"{prefix}#{index}", lambda frame=frame, name=f"{prefix}#{index}": to_rgb(frame, f"frame {name}")
            elif count is None:
                yield f"{prefix}#{index}", _failed(f"{what}: frame {index} cannot be read (camera disconnected?)")
                return
            elif index >= count:
                return  # the end; with no count (0 or less) every failed read is taken as the end
            else:
                failures += 1
                if failures >= MAX_FAILED_FRAMES:
                    message = (
                        f"{what}: frames {index} to {count - 1} cannot be read ({failures} reads in a row failed; "
                        f"the video lists {count} frames; cut short or corrupt)"
                    )
                    yield f"{prefix}#{index}", _failed(message)
                    return
                message = f"{what}: frame {index} of {count} cannot be read (corrupt or cut short)"
                yield f"{prefix}#{index}", _failed(message)
            frame, index = None, index + 1
    finally:
        capture.release()


# --------------------------------------------------------------------------------------------------
# Decoding ahead in a background thread


class _End:
    """The producer has nothing more to send."""


@dataclass
class _Failure:
    """The producer hit a bug (not a bad input): the consumer re-raises it."""

    error: BaseException


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _load(name: str, loader: Loader) -> Item:
    """Run one loader; an input that cannot be read becomes an error Item, a bug propagates."""
    try:
        image = loader()
    except TilecoreError as error:
        return Item(name, None, _one_line(str(error)))
    except OSError as error:
        return Item(name, None, _one_line(f"input {name}: cannot read ({error.strerror or error})"))
    except cv2.error as error:
        return Item(name, None, _one_line(f"input {name}: cannot decode ({error})"))
    except MemoryError:
        return Item(name, None, f"input {name}: out of memory while decoding")
    return Item(name, image, None)


def _put(q: queue.Queue, entry: object, stop: threading.Event) -> bool:
    """Put into the bounded queue, waiting while it is full; False once the consumer has gone."""
    while not stop.is_set():
        try:
            q.put(entry, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _produce(
    sources: Iterator[tuple[str, Loader]],
    q: queue.Queue,
    stop: threading.Event,
    pool: ThreadPoolExecutor | None,
    skip: Counter[str],
) -> None:
    try:
        for name, loader in sources:
            if stop.is_set():
                return
            if skip[name] > 0:  # already scored (a resumed run): never read
                skip[name] -= 1
                continue
            entry: Item | Future = pool.submit(_load, name, loader) if pool else _load(name, loader)
            if not _put(q, entry, stop):
                return
        _put(q, _End(), stop)
    except BaseException as error:  # handed to the consumer, which raises it with its traceback
        _put(q, _Failure(error), stop)
    finally:
        close = getattr(sources, "close", None)
        if close is not None:
            close()  # releases a video or camera capture


def stream(
    spec: str, queue_size: int = 8, workers: int = 1, skip: Counter[str] | None = None, bit_depth: str | int = 8
) -> Iterator[Item]:
    """Yield an `Item` per input of `spec`, in input order, decoded ahead in a background thread.

    At most `queue_size` decoded items wait in the queue (plus one in the producer's hand), so memory is
    bounded however long the stream. `workers` > 1 decodes that many images in parallel, order kept.
    Raises TilecoreError at call time when `spec` names nothing (see `iter_sources`). Breaking out of
    the loop, or calling `close()` on the returned iterator, stops the background thread promptly.
    `skip`: names left out, each as often as it counts, without reading them (a resumed run); it is read
    from the first item on, so the caller may fill it until then. `bit_depth`: as for `iter_sources`.
    """
    if queue_size < 1:
        raise ValueError(f"queue_size must be >= 1, got {queue_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return _stream(iter_sources(spec, bit_depth), queue_size, workers, Counter() if skip is None else skip)


def _stream(sources: Iterator[tuple[str, Loader]], queue_size: int, workers: int, skip: Counter[str]) -> Iterator[Item]:
    q: queue.Queue = queue.Queue(maxsize=queue_size)
    stop = threading.Event()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tilecore-decode") if workers > 1 else None
    args = (sources, q, stop, pool, skip)
    producer = threading.Thread(target=_produce, args=args, name="tilecore-sources", daemon=True)
    producer.start()
    try:
        while True:
            try:
                entry = q.get(timeout=_POLL_S)
            except queue.Empty:
                if not producer.is_alive() and q.empty():
                    raise RuntimeError("tilecore input stream: the decoding thread stopped unexpectedly") from None
                continue
            if isinstance(entry, _End):
                return
            if isinstance(entry, _Failure):
                raise entry.error
            yield entry.result() if isinstance(entry, Future) else entry
    finally:
        stop.set()
        while True:  # drop decoded images now rather than when the queue is collected
            try:
                q.get_nowait()
            except queue.Empty:
                break
        producer.join(timeout=_JOIN_S)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------


def validate_image(image: np.ndarray, min_hw: tuple[int, int]) -> str | None:
    """None when `image` is RGB uint8 [H, W, 3] with H, W at least `min_hw`; else a one-line reason."""
    if image is None:
        return "no image"
    if not isinstance(image, np.ndarray):
        return f"image is a {type(image).__name__}, expected a numpy array"
    if image.dtype != np.uint8:
        return f"image has {image.dtype} pixels, expected uint8"
    if image.ndim != 3 or image.shape[2] != 3:
        return f"image shape {tuple(image.shape)}, expected [H, W, 3]"
    h, w = image.shape[:2]
    min_h, min_w = min_hw
    if h < min_h or w < min_w:
        return f"image {h}x{w} smaller than one tile {min_h}x{min_w}"
    return None
