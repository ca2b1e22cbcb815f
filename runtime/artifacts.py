"""Atomic writes and checksums for everything tilecore puts on disk."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    umask = os.umask(0)  # the only portable way to read it is to set it: done once, at import
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def default_file_mode() -> int:
    """The mode a plain `open(path, "w")` would give: 0o666 less the process's umask (read at import)."""
    return 0o666 & ~_UMASK


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Call `write(tmp_path)` and rename the result onto `path`, so readers never see a half file.

    The file gets `mode`, or by default what `open()` would give (mkstemp alone makes it 0600, which
    leaves bundles and results unreadable to the other users of a device).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
