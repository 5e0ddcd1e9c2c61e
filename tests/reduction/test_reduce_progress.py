"""``reduce`` shows its progress: a bar per stage from the start, and log lines at least every few seconds."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.slow
def test_each_stage_bar_shows_from_zero_and_counts_every_tile(ray_runtime, prefect_harness, file_store, small_pool):
    import flows.reduce
    from flows.progress import progress_to

    _, path = small_pool
    events: list[tuple[str, int, int]] = []
    with progress_to(lambda stage, done, total: events.append((stage, done, total))):
        flows.reduce.reduce_flow(data=path, k=10, store_url=file_store.url, workers=2, tile_size=32, starts=10)
    # The bars show from the start of each stage (the first tile of a big pool can take a while).
    assert [done for stage, done, _ in events if stage == "tiles"] == list(range(16))
    restarts = [done for stage, done, _ in events if stage == "restarts"]
    assert restarts[0] == 0 and restarts[-1] == 10


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


def test_progress_lines_of_a_fast_stage_are_the_tenths() -> None:
    from flows.reduce import ProgressLines

    lines = ProgressLines(15, every_s=10.0, clock=lambda: 0.0)
    assert [done for done in range(1, 16) if lines.due(done)] == list(range(1, 16))
    lines = ProgressLines(100, every_s=10.0, clock=lambda: 0.0)
    assert [done for done in range(1, 101) if lines.due(done)] == list(range(10, 101, 10))
