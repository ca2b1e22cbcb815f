"""Input streams for `tilecore run BUNDLE INPUT`: files, folders, globs, list files, videos and cameras.

`iter_sources(spec)` resolves INPUT into lazily loaded `(name, loader)` pairs and refuses, up front, a spec
that names nothing. `stream(spec)` decodes ahead in a background thread through a bounded queue, so memory
stays bounded however long the stream (a camera never ends), and yields `Item`s in input order. An input
that cannot be read becomes an `Item` with `error` set and the stream goes on.

Which kind INPUT is, checked in this order:

* an existing folder: its images (suffix in `IMAGE_SUFFIXES`), sorted by name, not recursive;
* an existing file: a video (`VIDEO_SUFFIXES`), a list file (`LIST_SUFFIXES`: one path per line, blank
  lines and lines starting with `#` ignored, relative paths resolved against the list file's folder) or
  a single image (`IMAGE_SUFFIXES`); any other suffix is refused;
* a string of digits: a camera index (`cv2.VideoCapture(int(spec))`);
* a glob pattern (`*`, `?`, `[`; `**` recurses): the images it matches, sorted.

Names: an image's path, `"<video path>#<frame index>"` for video frames, `"camera<k>#<frame index>"` for
camera frames.
"""

from __future__ import annotations

import glob
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tilecore.runtime.errors import TilecoreError
from tilecore.runtime.image_io import IMAGE_SUFFIXES, read_rgb

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")
LIST_SUFFIXES = (".txt", ".lst")

Loader = Callable[[], np.ndarray]

_POLL_S = 0.05  # how often a blocked producer or consumer looks at the stop flag
_JOIN_S = 2.0  # how long closing a stream waits for the producer (a daemon thread) to finish


@dataclass
class Item:
    """One input of a stream: its image, or why there is none."""

    name: str  # path of the image, "<video path>#<frame index>" or "camera<k>#<frame index>"
    image: np.ndarray | None  # RGB uint8 [H, W, 3] when readable
    error: str | None  # one-line message when not


# --------------------------------------------------------------------------------------------------
# Resolving a spec into (name, loader) pairs


def iter_sources(spec: str) -> Iterator[tuple[str, Loader]]:
    """Resolve INPUT into `(name, loader)` pairs, yielded lazily; each loader returns RGB uint8 [H, W, 3].

    Raises TilecoreError at call time (not at the first `next`) when the spec matches nothing, a folder or
    glob holds no images, a list file lists nothing, a file has an unsupported suffix, or a video or
    camera cannot be opened. Image loaders raise TilecoreError naming the file when it cannot be read.
    Video and camera frames are read as the iterator advances (a frame can only be read after the one
    before it); their loaders only convert BGR to RGB.
    """
    text = os.path.expanduser(spec)
    path = Path(text)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and _is_image(p))
        if not images:
            raise TilecoreError(f"input {spec}: folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        return _image_loaders(images)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            return _video_frames(path)
        if suffix in LIST_SUFFIXES:
            return _image_loaders(_read_list(path))
        if suffix in IMAGE_SUFFIXES:
            return _image_loaders([path])
        raise TilecoreError(
            f"input {spec}: unsupported file type '{path.suffix}' (expected an image, a video "
            f"{'/'.join(VIDEO_SUFFIXES)} or a list file {'/'.join(LIST_SUFFIXES)})"
        )
    if re.fullmatch(r"[0-9]+", spec):
        return _camera_frames(int(spec))
    if any(c in text for c in "*?["):
        matches = sorted(glob.glob(text, recursive=True))
        images = [Path(m) for m in matches if os.path.isfile(m) and _is_image(Path(m))]
        if images:
            return _image_loaders(images)
        if matches:
            raise TilecoreError(f"input {spec}: glob matches {len(matches)} paths but no images")
    raise TilecoreError(f"input {spec}: no such file, folder or glob match")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _image_loaders(paths: list[Path]) -> Iterator[tuple[str, Loader]]:
    for path in paths:
        yield str(path), lambda path=path: read_rgb(path)


def _read_list(list_file: Path) -> list[Path]:
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise TilecoreError(f"input {list_file}: not a UTF-8 text file ({error.reason})") from None
    except OSError as error:
        raise TilecoreError(f"input {list_file}: cannot read ({error.strerror or error})") from None
    paths = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        paths.append(path if path.is_absolute() else list_file.parent / path)
    if not paths:
        raise TilecoreError(f"input {list_file}: list file names no images (one path per line, # comments)")
    return paths


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return np.ascontiguousarray(np.repeat(frame[:, :, None], 3, axis=2))
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def _video_frames(path: Path) -> Iterator[tuple[str, Loader]]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise TilecoreError(f"video {path}: cannot open (unsupported codec or not a video file)")
    ok, first = capture.read()
    if not ok or first is None:
        capture.release()
        raise TilecoreError(f"video {path}: no frame could be read (unsupported codec or empty video)")
    return _frames(capture, first, str(path))


def _camera_frames(index: int) -> Iterator[tuple[str, Loader]]:
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        capture.release()
        raise TilecoreError(f"camera {index}: cannot open")
    return _frames(capture, None, f"camera{index}")


def _frames(capture: cv2.VideoCapture, first: np.ndarray | None, prefix: str) -> Iterator[tuple[str, Loader]]:
    """Frames until the capture runs dry (end of video, camera unplugged); releases it when closed."""
    try:
        frame, index = first, 0
        while True:
            if frame is None:
                ok, frame = capture.read()
                if not ok or frame is None:
                    return
            yield f"{prefix}#{index}", lambda frame=frame: _to_rgb(frame)
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
) -> None:
    try:
        for name, loader in sources:
            if stop.is_set():
                return
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


def stream(spec: str, queue_size: int = 8, workers: int = 1) -> Iterator[Item]:
    """Yield an `Item` per input of `spec`, in input order, decoded ahead in a background thread.

    At most `queue_size` decoded items wait in the queue (plus one in the producer's hand), so memory is
    bounded however long the stream. `workers` > 1 decodes that many images in parallel, order kept.
    Raises TilecoreError at call time when `spec` names nothing (see `iter_sources`). Breaking out of
    the loop, or calling `close()` on the returned iterator, stops the background thread promptly.
    """
    if queue_size < 1:
        raise ValueError(f"queue_size must be >= 1, got {queue_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return _stream(iter_sources(spec), queue_size, workers)


def _stream(sources: Iterator[tuple[str, Loader]], queue_size: int, workers: int) -> Iterator[Item]:
    q: queue.Queue = queue.Queue(maxsize=queue_size)
    stop = threading.Event()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tilecore-decode") if workers > 1 else None
    producer = threading.Thread(target=_produce, args=(sources, q, stop, pool), name="tilecore-sources", daemon=True)
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
