"""The `tilecore` command line in a real subprocess, and the check that it refused in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def toml_text(sections: dict[str, dict]) -> str:
    """TOML for flat tables (a list of tables becomes [[section]]s); JSON spells the values the TOML way."""
    lines = []
    for section, values in sections.items():
        for table in values if isinstance(values, list) else [values]:
            lines.append(f"[[{section}]]" if isinstance(values, list) else f"[{section}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """`tilecore ARGS...` in a child process; undecodable output bytes come back as backslash escapes."""
    command = [sys.executable, "-m", "tilecore.cli", *map(str, args)]
    return subprocess.run(
        command, cwd=cwd, timeout=timeout, capture_output=True, text=True, errors="backslashreplace", **kwargs
    )


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def assert_one_line_refusal(proc: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit 2, no traceback, and stderr is one `error:` line that `pattern` finds (re.search); returns it."""
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, describe(proc)
    lines = [line.strip() for line in ANSI.sub("", proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), describe(proc)
    assert re.search(pattern, lines[0]), f"{pattern!r} not found in {lines[0]!r}"
    return lines[0]


def run_cli_here(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`tilecore ARGS...` through the same entry point (tilecore.cli.main) in this process, with its exit status,
    stdout and stderr, as run_cli returns them: no torch import to pay (seconds a command). For the cases whose
    real-subprocess twin is tested elsewhere; not thread-safe (it sets sys.argv, the working folder, sys.stdout and
    sys.stderr while it runs). A traceback the subprocess would print is raised here instead."""
    import contextlib
    import io
    import logging
    import os

    from tilecore import cli

    log = logging.getLogger("tilecore")
    handlers, level, argv, here = list(log.handlers), log.level, sys.argv, os.getcwd()
    out, err, status = io.StringIO(), io.StringIO(), 0
    try:
        sys.argv = ["tilecore", *map(str, args)]
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv = argv
        os.chdir(here)
        log.handlers[:] = handlers  # main() adds its handler on every call
        log.setLevel(level)
    return subprocess.CompletedProcess(["tilecore", *map(str, args)], status, out.getvalue(), err.getvalue())
