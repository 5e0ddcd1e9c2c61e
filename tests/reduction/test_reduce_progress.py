"""``reduce`` shows its progress: a bar per stage from the start, and log lines at least every few seconds."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest


@pytest.mark.slow
def test_each_stage_bar_shows_from_zero_and_counts_every_tile(ray_runtime, prefect_harness, file_store, small_pool):
    import flows.reduce
    from flows.progress import PROGRESS_MIN_GAP_SECONDS, progress_to

    _, path = small_pool
    events: list[tuple[str, int, int]] = []
    said = _Lines()
    task_log = logging.getLogger("prefect.task_runs")
    task_log.addHandler(said)
    try:
        with progress_to(lambda stage, done, total: events.append((stage, done, total))):
            flows.reduce.reduce_flow(data=path, k=10, store_url=file_store.url, workers=2, tile_size=32, starts=10)
    finally:
        task_log.removeHandler(said)
    # The bars show from the start of each stage (the first tile of a big pool can take a while).
    assert [done for stage, done, _ in events if stage == "tiles"] == list(range(16))
    restarts = [done for stage, done, _ in events if stage == "restarts"]
    assert restarts[0] == 0 and restarts[-1] == 10
    # The log is not one line per tile and per chunk of restarts (10 chunks of one start here; workers x 8 on a
    # cluster): a stage's lines are at least a second apart, but for its last, which says it ended.
    for stage, last in (("tiles", "tiles 15/15 committed"), ("restarts", "restarts 10/10 done")):
        lines = [(r.created, r.getMessage()) for r in said.records if r.getMessage().startswith(f"{stage} ")]
        assert lines and lines[-1][1].startswith(last), lines
        gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(lines[:-1])]
        assert all(gap >= PROGRESS_MIN_GAP_SECONDS - 0.1 for gap in gaps), lines


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_progress_lines_are_due_every_tenth_and_at_least_every_interval() -> None:
    from flows.reduce import ProgressLines

    now = [0.0]
    lines = ProgressLines(1653, every_s=10.0, clock=lambda: now[0])
    due = []
    for done in range(1, 1654):
        now[0] += 0.3  # a tile every 0.3 s: a tenth (165 tiles) takes 50 s
        if lines.due(done):
            due.append(done)
    gaps = np.diff([0, *due]) * 0.3
    assert gaps.max() <= 10.0 + 0.3 + 1e-9  # never more than 10 s of silence (plus the tile that ends it)
    assert {165, 330, 1650, 1653} <= set(due)
    assert len(due) < 1653 // 10  # not one line per tile


def test_progress_lines_of_a_fast_stage_say_only_its_end() -> None:
    """A reduction's stage of milliseconds logged ten lines in the same second (26 in make demo --quick's reduce)."""
    from flows.reduce import ProgressLines

    lines = ProgressLines(100, every_s=10.0, clock=lambda: 0.0)
    assert [done for done in range(1, 101) if lines.due(done)] == [100]


def test_progress_lines_say_a_tenth_at_most_once_a_second() -> None:
    from flows.reduce import ProgressLines

    now = [0.0]
    lines = ProgressLines(15, every_s=10.0, min_gap_s=1.0, clock=lambda: now[0])
    due = []
    for done in range(1, 16):
        now[0] += 0.3  # every unit is a tenth of 15: a line is owed each time, but one a second is enough
        if lines.due(done):
            due.append(done)
    assert due == [4, 8, 12, 15]


def test_progress_lines_count_a_tenth_passed_by_a_chunk() -> None:
    """Restarts finish in chunks: 13 of 40 passes the third tenth without hitting it."""
    from flows.reduce import ProgressLines

    now = [0.0]
    lines = ProgressLines(40, every_s=10.0, min_gap_s=1.0, clock=lambda: now[0])
    due = []
    for done in (3, 6, 9, 13, 17, 20, 26, 33, 40):
        now[0] += 2.0
        if lines.due(done):
            due.append(done)
    assert due == [6, 9, 13, 17, 20, 26, 33, 40]  # 3 of 40 is short of a tenth; every later chunk passes one
