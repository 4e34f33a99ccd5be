"""Progress of long work, for a person at a terminal and for a log file alike.

* At a terminal: one rich bar per stage (it stays on screen when the stage ends).
* Anywhere else (a CI log, ``nohup``, a file): a line every ``$GCR_PROGRESS_SECONDS`` (30 by default)
  while the stage runs, and a closing line if it printed any, so a log is never silent for minutes at a
  time and a short stage adds nothing. The pipeline logs a line as each stage starts.

Lines go through the ``gcr`` logger (``gcr: ...`` on stderr), so they sit with gcr's other messages.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("gcr")


def _interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def _every() -> float:
    try:
        return max(0.0, float(os.environ.get("GCR_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """The progress of one stage: ``update()`` as work is done, ``close()`` at the end (or use ``with``)."""

    def __init__(self, description: str, total: int | None = None, *, unit: str = ""):
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self.info: dict[str, Any] = {}
        self.start = time.perf_counter()
        self._last_line = self.start
        self._every = _every()
        self._bar = None
        if _interactive():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     transient=False)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, info="")
        self._lines = 0

    def update(self, n: int = 1, **info: Any) -> None:
        """``n`` more units done; ``info`` (e.g. ``loss=3.2``) is shown beside the count."""
        self.done += n
        self.info.update(info)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=self._info())
            return
        now = time.perf_counter()
        if now - self._last_line >= self._every:
            self._last_line = now
            self._lines += 1
            log.info("%s: %s", self.description, self._status(now))

    def _info(self) -> str:
        return "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.info.items())

    def _status(self, now: float) -> str:
        elapsed = now - self.start
        parts = [f"{self.done}/{self.total} {self.unit}".rstrip() if self.total else f"{self.done} {self.unit}".rstrip()]
        if self.total and self.done:
            parts.append(f"{100 * self.done / self.total:.0f}%")
            parts.append(f"{_duration(elapsed)} elapsed, ~{_duration(elapsed * (self.total - self.done) / self.done)} left")
        else:
            parts.append(f"{_duration(elapsed)} elapsed")
        if self.info:
            parts.append(self._info())
        return ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif self._lines:
            self._lines = 0
            log.info("%s: done in %s%s", self.description, _duration(time.perf_counter() - self.start),
                     f" ({self._info()})" if self.info else "")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(items: Iterable[T], description: str, total: int | None = None, *, unit: str = "") -> Iterator[T]:
    """Iterate ``items``, reporting progress (a bar at a terminal, periodic lines otherwise)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(description, total, unit=unit) as bar:
        for item in items:
            yield item
            bar.update()
