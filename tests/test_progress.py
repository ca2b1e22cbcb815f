"""Progress and log lines that read in a log file: periodic plain lines when stderr is not a terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli import describe, run_cli
from tilecore.progress import LineProgress, count_text, elapsed_text

ANSI = re.compile(r"\x1b\[")


def test_lines_count_tasks_and_end_with_each_task() -> None:
    stream = io.StringIO()
    with LineProgress(stream, every_s=0) as progress:
        task = progress.add_task("train brick", total=4)
        progress.advance(task)
        progress.update(task, completed=4)
        stream_task = progress.add_task("run: 3 scored (1 anomalous), 0 failed", total=None)
        progress.update(stream_task, completed=3)
    lines = stream.getvalue().splitlines()
    assert [line.split(", ")[0] for line in lines] == [
        "train brick: 1/4 (25%)",
        "train brick: 4/4 (100%)",
        "run: 3 scored (1 anomalous)",
    ]
    assert all(line.endswith(" elapsed") for line in lines), lines


def test_lines_are_held_between_reports_and_dropped_when_the_work_fails() -> None:
    stream = io.StringIO()
    with pytest.raises(RuntimeError, match="refused"), LineProgress(stream, every_s=3600) as progress:
        task = progress.add_task("eval", total=2)
        progress.advance(task, 2)
        raise RuntimeError("refused")
    assert stream.getvalue() == ""  # the error line stays the only one
    with LineProgress(stream, every_s=3600) as progress:
        task = progress.add_task("eval", total=2)
        progress.advance(task, 2)
        unfinished = progress.add_task("coreset", total=10)
        progress.advance(unfinished, 3)
    lines = [line.split(", ")[0] for line in stream.getvalue().splitlines()]
    assert lines == ["eval: 2/2 (100%)", "coreset: 3/10 (30%)"]


def test_elapsed_and_count_text() -> None:
    assert elapsed_text(3 * 3600 + 62.9) == "3:01:02"
    assert (count_text(1234567.0), count_text(2.5)) == ("1234567", "2.5")


def test_data_synth_into_a_pipe_prints_periodic_progress(tmp_path: Path) -> None:
    env = {**os.environ, "TILECORE_PROGRESS_EVERY_S": "0"}
    args = ("data", "synth", "--out", tmp_path / "d", "--n-train", "2", "--n-test-good", "1", "--n-test-defect", "1")
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, describe(proc)
    counts = [int(m.group(1)) for m in re.finditer(r"^synth 256px: (\d+)/\d+ \(\d+%\), \d:\d\d:\d\d elapsed$",
                                                   proc.stderr, re.M)]  # fmt: skip
    total = 3 * 4  # categories x images, as `data synth` counts them
    assert counts == list(range(1, total + 1)), describe(proc)  # one line per image, the last at 100%
    assert not ANSI.search(proc.stderr), describe(proc)


def test_log_lines_in_a_pipe_are_whole_and_plain() -> None:
    message = "bank already trained, skipping " + "x" * 300
    code = (
        "import logging\nfrom tilecore import cli\n"
        f"cli.app = lambda: logging.getLogger('tilecore.train').info({message!r})\ncli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, describe(proc)
    assert proc.stderr.splitlines() == [f"INFO {message}"], describe(proc)
