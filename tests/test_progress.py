"""Progress of long commands: one rich display, drawn on a terminal, quiet elsewhere (issue 10)."""

from __future__ import annotations

import io

from rich.console import Console

from flows.progress import progress_to, report, shown_progress


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
