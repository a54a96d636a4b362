"""Progress bars (rich, on stderr): the one implementation the profiler, the quality measurement
and the study use. Silent when disabled, and by default when stderr is not a terminal.

    with Reporter(enabled) as r:
        t = r.task("host->device copies", total=12)
        t.advance()
        t.update(completed=5, note="best feasible 9.20 tokens/s")
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from typing import Self


class Task:
    """One bar of a Reporter; every method is a no-op when the reporter is silent."""

    def __init__(self, progress, task_id):
        self._p, self._id = progress, task_id

    def advance(self, n: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._id, n)

    def update(self, *, completed: float | None = None, note: str | None = None) -> None:
        if self._p is not None:
            fields = {} if note is None else {"note": note}
            self._p.update(self._id, completed=completed, **fields)

    def done(self) -> None:
        if self._p is not None:
            total = self._p.tasks[self._id].total if self._id < len(self._p.tasks) else None
            self._p.update(self._id, completed=total)


class Reporter(AbstractContextManager):
    """A group of progress bars shown while the `with` block runs.

    `tty_only=False` shows them on a stderr that is not a terminal too (a log file);
    `transient=True` clears them when the block ends."""

    def __init__(self, enabled: bool = True, *, tty_only: bool = True, transient: bool = False):
        self.enabled = bool(enabled) and (sys.stderr.isatty() or not tty_only)
        self.transient = transient
        self._progress = None

    def __enter__(self) -> Self:
        if self.enabled:
            from rich.console import Console  # optional at import time: rich is only needed to show
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]{task.description:<28}"), BarColumn(),
                                      TextColumn("{task.completed:>4.0f}/{task.total:<4.0f}"),
                                      TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
                                      console=Console(stderr=True), transient=self.transient)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def task(self, description: str, total: float) -> Task:
        if self._progress is None:
            return Task(None, None)
        return Task(self._progress, self._progress.add_task(description, total=total, note=""))


NULL = Reporter(enabled=False)
