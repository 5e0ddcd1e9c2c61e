"""Progress of long work: flows report ``(stage, done, total)``, one rich display shows it.

Flows call :func:`report` as work completes (tiles, restarts, audit cells); a command that wants
to show it wraps the flow call in ``with shown_progress():``. The display is a :mod:`rich`
progress panel (rich is installed with Prefect, and Prefect's own log lines go through rich), so
log lines print above the bars instead of through them. When stderr is not a terminal (CI, a
pipe, a log file) nothing is drawn: the flows' log lines say what finished, and
:class:`ProgressLines` says when a flow owes one: at every tenth of the work (but not within
:data:`PROGRESS_MIN_GAP_SECONDS` of the last line), at the end, and at least every
:data:`PROGRESS_LOG_SECONDS`, also while slow units (an audit cell: minutes) are still running.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

ProgressCallback = Callable[[str, int, int], None]
_listeners: list[ProgressCallback] = []
# Terminal displays open in this process: while one is, the bars already say that work goes on.
_drawing: list[Progress] = []

# A progress line is logged at every tenth of a stage, and at least this often while work runs.
PROGRESS_LOG_SECONDS = 10.0
# Tenths closer than this to the last line are not logged: they would only repeat it.
PROGRESS_MIN_GAP_SECONDS = 1.0


class ProgressLines:
    """Whether a stage's progress line is due after ``done`` of ``total`` units.

    Due at the end, when ``done`` passes a tenth of the work not yet said (units may finish in
    chunks, so a tenth is passed rather than hit) at least :attr:`min_gap_s` after the last line,
    and whenever :attr:`every_s` have passed since the last line: a tenth of a big stage can take
    minutes. A stage of milliseconds thus says only that it ended, instead of ten lines in the same
    second. A stage whose units each take longer than :attr:`every_s` asks :meth:`quiet_too_long`
    while it waits, so its log is never silent for longer (the heartbeat).
    """

    def __init__(
        self,
        total: int,
        *,
        every_s: float | None = None,
        min_gap_s: float = PROGRESS_MIN_GAP_SECONDS,
        clock: Any = time.monotonic,
    ) -> None:
        self.total = total
        self.step = max(1, total // 10)
        self.every_s = PROGRESS_LOG_SECONDS if every_s is None else every_s
        self.min_gap_s = min_gap_s
        self._clock = clock
        self._last = clock()
        self._tenths_said = 0

    def due(self, done: int) -> bool:
        now = self._clock()
        since = now - self._last
        tenths = done // self.step
        if done >= self.total or since >= self.every_s or (tenths > self._tenths_said and since >= self.min_gap_s):
            self._last = now
            self._tenths_said = tenths
            return True
        return False

    def logged(self) -> None:
        """A line was logged now (a stage that logs every unit): the next heartbeat counts from here."""
        self._last = self._clock()

    def quiet_too_long(self) -> bool:
        """Whether :attr:`every_s` have passed with no line: a heartbeat is due (and counted as logged)."""
        now = self._clock()
        if now - self._last >= self.every_s:
            self._last = now
            return True
        return False

    def seconds_to_next(self) -> float:
        """How long a stage can wait for its next unit before a heartbeat is due."""
        return max(0.0, self.every_s - (self._clock() - self._last))


def bars_drawn() -> bool:
    """Whether a terminal display (:func:`shown_progress` on a tty) is drawing bars in this process now."""
    return bool(_drawing)


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
    # rich is imported here, not with the module: a command line that reads PROGRESS_LOG_SECONDS for its
    # help must not pay for it.
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
        _drawing.append(progress)
        try:
            with progress_to(bars):
                yield bars
        finally:
            _drawing.remove(progress)


def _ignore(stage: str, done: int, total: int) -> None:
    return None
