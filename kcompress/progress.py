"""Progress for long work (evaluation, calibration, teacher caching, importance scoring) on stderr.

On a terminal, a rich progress bar. In pipes and logs (CI, ``nohup``, a pipeline's log), a plain line every
:data:`HEARTBEAT_S` seconds once the work has run that long ("teacher outputs (cache): 4096/20000, 31 s"), so a
long step is never silent and a short one prints nothing.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, Optional

__all__ = ["progress", "Bar", "HEARTBEAT_S"]

HEARTBEAT_S = 15.0


class Bar:
    def __init__(self, rich_progress=None, task=None, description: str = "", total: Optional[int] = None):
        self._p, self._task = rich_progress, task
        self._description, self._total, self._done = description, total, 0
        self._start = self._last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)
            return
        self._done += n
        now = time.monotonic()
        if now - self._last >= HEARTBEAT_S:
            self._last = now
            of = f"/{self._total}" if self._total else ""
            print(f"{self._description}: {self._done}{of}, {now - self._start:.0f} s", file=sys.stderr, flush=True)

    def update(self, description: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=description)


@contextlib.contextmanager
def progress(description: str, total: Optional[int] = None) -> Iterator[Bar]:
    """``with progress("evaluating", total=n) as bar: ... bar.advance(k)``."""
    if not sys.stderr.isatty():
        yield Bar(description=description, total=total)
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
