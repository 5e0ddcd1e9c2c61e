"""Progress of long commands: one rich display, drawn on a terminal, quiet elsewhere (issue 10)."""

from __future__ import annotations

import io

from rich.console import Console

from flows.progress import ProgressLines, bars_drawn, progress_to, report, shown_progress


def test_reported_stages_reach_every_listener_only_while_attached() -> None:
    seen: list[tuple[str, int, int]] = []
    with progress_to(lambda stage, done, total: seen.append((stage, done, total))):
        report("tiles", 3, 15)
    report("tiles", 4, 15)
    assert seen == [("tiles", 3, 15)]


def test_terminal_shows_one_bar_per_stage_with_counts() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with shown_progress(console=console):
        for done in range(1, 41):
            report("restarts", done, 40)
        report("tiles", 6, 6)
    text = out.getvalue()
    assert "restarts" in text and "40/40" in text
    assert "tiles" in text and "6/6" in text


def test_not_a_terminal_draws_nothing() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with shown_progress(console=console) as show:
        report("restarts", 40, 40)
        show("MI tiles", 1, 1)
    assert out.getvalue() == ""


def test_bars_are_drawn_only_on_a_terminal_and_only_while_shown() -> None:
    """A flow logs its heartbeat only where no bars say that work goes on."""
    assert not bars_drawn()
    with shown_progress(console=Console(file=io.StringIO(), force_terminal=True)):
        assert bars_drawn()
    assert not bars_drawn()
    with shown_progress(console=Console(file=io.StringIO(), force_terminal=False)):
        assert not bars_drawn()


def test_a_heartbeat_is_due_after_the_interval_without_a_line() -> None:
    """Units that take minutes (audit cells): the log is never quiet longer than the interval."""
    now = [0.0]
    lines = ProgressLines(6, every_s=10.0, clock=lambda: now[0])
    now[0] = 9.0
    assert not lines.quiet_too_long() and lines.seconds_to_next() == 1.0
    now[0] = 10.0
    assert lines.quiet_too_long() and not lines.quiet_too_long()  # counted as logged
    now[0] = 15.0
    lines.logged()  # a unit ended and said so
    now[0] = 24.0
    assert not lines.quiet_too_long()
    now[0] = 25.0
    assert lines.quiet_too_long()
