"""Progress that reads in a terminal and in a log file.

On a terminal, `progress_display` is rich's live bar. Otherwise (stderr redirected to a file or a pipe)
rich would print nothing until the command ends, so `LineProgress` writes plain, flushed lines instead:
every `every_s` seconds the line of the task that moves and of those that ended, e.g.

    train brick: 120/480 (25%), 0:00:31 elapsed

Both offer the subset of rich.progress.Progress that tilecore calls: add_task, advance, update, and use
as a context manager.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

REPORT_EVERY_S = 10.0  # seconds between two reports (TILECORE_PROGRESS_EVERY_S overrides it)


def report_every_s() -> float:
    """REPORT_EVERY_S, or the seconds in TILECORE_PROGRESS_EVERY_S (a number >= 0; anything else is ignored)."""
    try:
        seconds = float(os.environ.get("TILECORE_PROGRESS_EVERY_S", REPORT_EVERY_S))
    except ValueError:
        return REPORT_EVERY_S
    return seconds if seconds >= 0 else REPORT_EVERY_S


def count_text(count: float) -> str:
    """1234567 as it is, 2.5 as 2.5 (never 1.23457e+06)."""
    return str(int(count)) if float(count).is_integer() else f"{count:.6g}"


def elapsed_text(seconds: float) -> str:
    """0:00:31 style, like rich's TimeElapsedColumn."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


@dataclass
class LineTask:
    description: str
    total: float | None
    completed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    finished: bool = False
    reported: bool = True  # its last state was written (or is held in the end lines)

    def line(self, now: float) -> str:
        elapsed = f"{elapsed_text(now - self.started)} elapsed"
        if self.total is None:  # an open-ended stream: its description carries the counts
            return f"{self.description}, {elapsed}"
        share = f" ({100 * self.completed / self.total:.0f}%)" if self.total else ""
        return f"{self.description}: {count_text(self.completed)}/{count_text(self.total)}{share}, {elapsed}"


class LineProgress:
    """rich Progress's add_task / advance / update, written as plain lines to a stream.

    Every `every_s` seconds (checked whenever a task moves) it writes the lines of the tasks that ended
    since, then the line of the task that moved. The lines still held when the work ends are written
    if it succeeds and dropped if it fails, so a command that is refused early still prints one line.
    """

    def __init__(self, stream: TextIO | None = None, every_s: float = REPORT_EVERY_S) -> None:
        self.stream = stream
        self.every_s = every_s
        self.tasks: dict[int, LineTask] = {}
        self.ended: list[str] = []  # end lines not yet written
        self.last_write = time.monotonic()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            now = time.monotonic()
            self._write([*self.ended, *(t.line(now) for t in self.tasks.values() if not t.reported)])

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0, **_: object) -> int:
        task_id = len(self.tasks)
        self.tasks[task_id] = LineTask(description, total, float(completed))
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        task = self.tasks[task_id]
        task.completed += advance
        self._moved(task)

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **_: object,
    ) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        self._moved(task)

    def _moved(self, task: LineTask) -> None:
        now = time.monotonic()
        ended = task.total is not None and task.completed >= task.total
        task.reported = ended and task.finished  # moved again since its end line: to be written again
        if ended and not task.finished:
            self.ended.append(task.line(now))
            task.reported = True
        task.finished = ended  # a total raised after the end makes the task run again
        if now - self.last_write >= self.every_s:
            self._write([*self.ended, *([] if task.reported else [task.line(now)])])
            task.reported = True

    def _write(self, lines: list[str]) -> None:
        self.ended = []
        self.last_write = time.monotonic()
        if lines:
            stream = self.stream or sys.stderr
            stream.write("".join(line + "\n" for line in lines))
            stream.flush()


@contextmanager
def progress_display(console: Console) -> Iterator[Progress | LineProgress]:
    """A bar on `console` when it is a terminal (kept when the work ends, erased when it fails, so a refusal
    that comes mid-way is still the one `error:` line); periodic plain lines on its file otherwise."""
    if not console.is_terminal:
        with LineProgress(console.file, report_every_s()) as lines:
            yield lines
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        try:
            yield progress
        except BaseException:
            progress.live.transient = True  # stop() then erases the bar instead of printing it
            raise
