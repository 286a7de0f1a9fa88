"""Progress bars for long work (evaluation, calibration, training), drawn on stderr only when it is a terminal.

In pipes, CI logs and tests nothing is drawn, so captured output stays clean.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

__all__ = ["progress", "Bar"]


class Bar:
    def __init__(self, rich_progress=None, task=None):
        self._p, self._task = rich_progress, task

    def advance(self, n: int = 1) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def update(self, description: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=description)


@contextlib.contextmanager
def progress(description: str, total: Optional[int] = None) -> Iterator[Bar]:
    """``with progress("evaluating", total=n) as bar: ... bar.advance(k)``."""
    if not sys.stderr.isatty():
        yield Bar()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as p:
        yield Bar(p, p.add_task(description, total=total))
