"""Atomic writes: whole files or none, with the mode a plain open() gives."""

import os
import stat

import pytest

from tilecore.runtime.artifacts import atomic_write, atomic_write_bytes, default_file_mode


def test_atomic_write_gives_the_umask_mode_not_mkstemps_0600(tmp_path):
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == default_file_mode()


def test_atomic_write_failure_leaves_neither_file_nor_temporary(tmp_path):
    def write(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        atomic_write(tmp_path / "b.bin", write)
    assert list(tmp_path.iterdir()) == []
