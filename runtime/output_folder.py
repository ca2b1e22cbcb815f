"""The output folder of `tilecore run`: results.jsonl appended whole lines at a time, the lock, the summary.

* `results.jsonl`: each line is one strict-JSON record, written whole; after a failed write (full disk)
  the file is cut back to its last complete line, so it always ends on a complete record.
* `summary.json`: written atomically.
* `.lock`: an exclusive flock held for the whole run, so a second run into the same folder is refused.
* An earlier run's results are refused unless resumed (its complete records are kept) or overwritten.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from pathlib import Path

from tilecore.runtime.artifacts import atomic_write_bytes
from tilecore.runtime.errors import TilecoreError

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"
OUTPUT_FOLDERS = ("overlays", "masks")


def record_line(record: dict) -> bytes:
    """One strict-JSON line (ASCII: non-ASCII and undecodable characters are escaped)."""
    return (json.dumps(record, allow_nan=False) + "\n").encode("ascii")


def write_error(path: Path | str, error: OSError) -> TilecoreError:
    """A fault of the output folder as one line naming the path."""
    return TilecoreError(f"--out {path}: cannot write ({error.strerror or error})")


def read_results(path: Path) -> tuple[list[dict], int]:
    """The complete records of a results file and their length in bytes (a torn last line is left out)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as error:
        raise TilecoreError(f"{path}: cannot read ({error.strerror or error})") from None
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for number, line in enumerate(complete.splitlines(), 1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("input"), str):
            raise TilecoreError(
                f"{path} line {number}: not a result record of `tilecore run`; use --overwrite to replace the file"
            )
        records.append(record)
    return records, len(complete)


EXIT_KEY = "exit_stage_"  # count_records' key prefix for the images that left a cascade at each stage


def count_records(records: list[dict]) -> dict[str, int]:
    """images, anomalous, failed; exit_stage_<k> for each cascade stage images left at; tiles_run: the fine
    tile locations a coarse stage let run, summed."""
    scored = [r for r in records if "error" not in r]
    exits = Counter(f"{EXIT_KEY}{r['exit_stage']}" for r in scored if isinstance(r.get("exit_stage"), int))
    ran = [r["tiles_run"] for r in scored if isinstance(r.get("tiles_run"), int)]  # a coarse stage's choice
    if ran:
        exits["tiles_run"] = sum(ran)
    return {
        "images": len(scored),
        "anomalous": sum(r.get("label") == "anomalous" for r in scored),
        "failed": len(records) - len(scored),
        **exits,
    }


def lock_out(out: Path) -> int:
    """Create `out` if needed and hold its exclusive lock; returns the lock's file descriptor."""
    try:
        if out.exists() and not out.is_dir():
            raise TilecoreError(f"--out {out}: exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise write_error(error.filename or out, error) from None  # the path that failed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TilecoreError(
            f"--out {out}: another tilecore run is writing there ({out / LOCK} is locked); wait for it or pick "
            "another --out"
        ) from None
    return fd


class ResultsFile:
    """results.jsonl opened for appending whole lines; a failed write is cut back to the last whole line."""

    def __init__(self, path: Path, keep: int) -> None:
        self.path = path
        self.size = keep  # bytes of complete records
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.ftruncate(self.fd, keep)  # drops a torn last line (resume) or everything (a fresh run)
        except OSError as error:
            raise write_error(path, error) from None

    def append(self, line: bytes) -> None:
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except BaseException as error:  # full disk, or interrupted mid-line: keep only whole records
            try:
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass
            if isinstance(error, OSError):
                raise TilecoreError(
                    f"--out {self.path}: cannot write ({error.strerror or error}); the file ends on its "
                    f"last complete record ({self.size} bytes)"
                ) from None
            raise
        self.size += len(line)

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as error:
            raise write_error(self.path, error) from None

    def close(self) -> None:
        os.close(self.fd)


def open_results(out: Path, resume: bool, overwrite: bool) -> tuple[ResultsFile, list[dict]]:
    """results.jsonl ready for appending, and the records it keeps from an earlier run (resume only)."""
    path = out / RESULTS
    try:
        earlier = path.is_file() and path.stat().st_size > 0
        if earlier and not (resume or overwrite):
            raise TilecoreError(
                f"--out {out} holds results of an earlier run: add --resume to continue it or --overwrite to replace it"
            )
        if overwrite:  # the earlier run's pictures would be mixed with this run's
            for folder in OUTPUT_FOLDERS:
                for picture in (out / folder).glob("*.png"):
                    picture.unlink()
    except OSError as error:
        raise write_error(error.filename or out, error) from None  # the path that failed
    records, keep = read_results(path) if resume else ([], 0)
    return ResultsFile(path, keep), records


def check_same_run(out: Path, identity: dict[str, str]) -> None:
    """Refuse to resume a run whose summary names another input spec or another bundle (its lines would be
    mixed with this run's). Summaries without these keys (older runs) are not checked."""
    path = out / SUMMARY
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        earlier = {}  # unreadable or torn: the records themselves were checked by read_results
    if not isinstance(earlier, dict):
        return
    for key, now in identity.items():
        before = earlier.get(key)
        if before is not None and before != now:
            raise TilecoreError(
                f"--resume into {out}: the earlier run has {key} {before!r}, this one {now!r}; "
                "resume with the same input and bundle, or use --overwrite"
            )


def write_summary(out: Path, summary: dict) -> None:
    text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    try:
        atomic_write_bytes(out / SUMMARY, text.encode("utf-8"))
    except OSError as error:
        raise write_error(out / SUMMARY, error) from None
