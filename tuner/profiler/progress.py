"""Progress bars for the profiler's stages (rich, on stderr; silent when disabled or not a TTY)."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager
from typing import Self


class Task:
    def __init__(self, progress, task_id):
        self._p, self._id = progress, task_id

    def advance(self, n: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._id, n)

    def done(self) -> None:
        if self._p is not None:
            total = self._p.tasks[self._id].total if self._id < len(self._p.tasks) else None
            self._p.update(self._id, completed=total)


class Reporter(AbstractContextManager):
    """`with Reporter(enabled) as r: t = r.task("transfer", total=12); t.advance()`."""

    def __init__(self, enabled: bool = True):
        self.enabled = bool(enabled) and sys.stderr.isatty()
        self._progress = None

    def __enter__(self) -> Self:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]{task.description:<28}"), BarColumn(),
                                      TextColumn("{task.completed:>4.0f}/{task.total:<4.0f}"),
                                      TimeElapsedColumn(), console=Console(stderr=True),
                                      transient=False)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def task(self, description: str, total: float) -> Task:
        if self._progress is None:
            return Task(None, None)
        return Task(self._progress, self._progress.add_task(description, total=total))


NULL = Reporter(enabled=False)
