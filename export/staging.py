"""The staging folder an export writes a bundle into, and the removal of those that killed exports left.

An export writes `.<name>.<8 random characters>.partial` beside `--out` and renames it to `<name>` when
complete. Beside it, `<that>.lock` is created first and holds an exclusive flock for as long as the export
runs; the kernel drops the lock when the process ends, however it ends. So the next export of the same
`--out` removes every staging folder of that name whose lock it can take (its export is gone) and leaves
the ones still locked (an export running now). Staging folders without a lock file come from tilecore
versions before this one; they are removed once an hour old.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tilecore.runtime.errors import TilecoreError

log = logging.getLogger("tilecore")

SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
UNLOCKED_MAX_AGE_S = 3600.0  # a lockless staging folder (an older tilecore's) older than this is stale


@dataclass
class Staging:
    """A staging folder and the locked file that says its export is alive."""

    folder: Path
    lock: Path
    fd: int

    def release(self) -> None:
        """Drop the lock file (after the folder was renamed into place or removed)."""
        self.lock.unlink(missing_ok=True)
        os.close(self.fd)


def staging_pattern(out: Path) -> re.Pattern[str]:
    """Names of `out`'s staging folders, exactly (a bundle named `b` never matches the staging of `b.c`)."""
    return re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}{re.escape(SUFFIX)}")


def take_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on `path`, or None when another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # gone meanwhile, or another user's lock file: not ours to clean
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders (and lock files) of `out` that no running export holds; returns them."""
    if not out.parent.is_dir():
        return []
    pattern = staging_pattern(out)
    removed = []
    for entry in sorted(out.parent.iterdir()):
        if pattern.fullmatch(entry.name.removesuffix(LOCK_SUFFIX)) is None:
            continue
        if entry.name.endswith(LOCK_SUFFIX):
            fd = take_lock(entry)
            if fd is None:
                continue  # an export of `out` is running now
            folder = entry.with_name(entry.name.removesuffix(LOCK_SUFFIX))
            shutil.rmtree(folder, ignore_errors=True)
            entry.unlink(missing_ok=True)
            os.close(fd)
            removed.append(folder)
        elif entry.is_dir() and not entry.with_name(entry.name + LOCK_SUFFIX).exists():
            try:
                age = time.time() - entry.stat().st_mtime
            except OSError:  # removed meanwhile by another export
                continue
            if age > UNLOCKED_MAX_AGE_S:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    for folder in removed:
        log.info("removed %s, left by an export that did not finish", folder)
    return removed


def stage_bundle(out: Path) -> Staging:
    """A fresh, locked staging folder beside `out` (its parent must exist)."""
    try:
        return new_staging(out)
    except OSError as exc:
        raise TilecoreError(f"bundle {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None


def new_staging(out: Path) -> Staging:
    while True:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=SUFFIX + LOCK_SUFFIX, dir=out.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        lock = Path(name)
        try:
            ours = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            ours = False
        if ours:  # no concurrent remove_stale_staging took the file in the instant before the flock
            break
        os.close(fd)
    folder = lock.with_name(lock.name.removesuffix(LOCK_SUFFIX))
    folder.mkdir()
    return Staging(folder, lock, fd)
