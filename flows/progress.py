"""Progress of long work: flows report ``(stage, done, total)``, one rich display shows it.

Flows call :func:`report` as work completes (tiles, restarts, audit cells); a command that wants
to show it wraps the flow call in ``with shown_progress():``. The display is a :mod:`rich`
progress panel (rich is installed with Prefect, and Prefect's own log lines go through rich), so
log lines print above the bars instead of through them. When stderr is not a terminal (CI, a
pipe, a log file) nothing is drawn: the flows' log lines already say what finished.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

ProgressCallback = Callable[[str, int, int], None]
_listeners: list[ProgressCallback] = []


@contextlib.contextmanager
def progress_to(callback: ProgressCallback) -> Iterator[None]:
    """Send ``callback(stage, done, total)`` updates from flows run in this process meanwhile."""
    _listeners.append(callback)
    try:
        yield
    finally:
        _listeners.remove(callback)


def report(stage: str, done: int, total: int) -> None:
    """Tell every listener that ``done`` of ``total`` units of ``stage`` are finished."""
    for listener in _listeners:
        listener(stage, done, total)


class StageBars:
    """One rich progress bar per stage, created on the stage's first update."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if total <= 0:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)


@contextlib.contextmanager
def shown_progress(*, console: Console | None = None) -> Iterator[ProgressCallback]:
    """Draw every reported stage as a bar on stderr while the block runs; quiet off a terminal.

    Yields the callback too, so code that is not a flow (an in-process loop) can feed the same
    display directly.
    """
    console = console if console is not None else Console(stderr=True)
    if not console.is_terminal:
        with progress_to(_ignore):
            yield _ignore
        return
    columns = (
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, redirect_stdout=True, redirect_stderr=True) as progress:
        bars = StageBars(progress)
        with progress_to(bars):
            yield bars


def _ignore(stage: str, done: int, total: int) -> None:
    return None
