"""Small command-line findings of probe 113: an option that needs a switch is refused without it
(``serve --floor-points``), and ``demo --quick`` says what it does and how long it took where it was measured."""

from __future__ import annotations

import pytest

from flows.cli import main


def test_floor_points_without_rollback_is_refused_before_the_store_is_touched(tmp_path, capsys) -> None:
    """``--floor-points`` is read only by rollback; alone it was accepted and stored, guarding nothing."""
    # No Ray cluster answers there: a serve that accepted --floor-points stops at that address's refusal (exit 2,
    # other words) rather than serving until killed.
    nowhere = ["--ray-address", "127.0.0.1:1"]
    assert main(["serve", "--store", f"file://{tmp_path}/runs", "--floor-points", "5", *nowhere]) == 2
    err = capsys.readouterr().err
    assert "--floor-points is the accuracy floor of a rolled-back version, so it needs --rollback" in err, err
    assert "got --floor-points 5 without --rollback. Add --rollback, or drop --floor-points" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_floor_points_with_rollback_is_still_ranged(tmp_path, capsys) -> None:
    assert main(["serve", "--store", f"file://{tmp_path}/runs", "--rollback", "--floor-points", "101"]) == 2
    err = capsys.readouterr().err
    assert "must be in 0..100; got 101" in err and "needs --rollback" not in err, err


def test_quick_demo_banner_counts_the_runs_it_trains() -> None:
    """The quick demo trains one run; its banner said "train two runs" (the full demo's)."""
    from flows.cli.demo import FULL, QUICK, story_banner

    quick, full = story_banner(QUICK["story"]), story_banner(FULL["story"])
    assert "train one run block by block" in quick and "two" not in quick, quick
    assert "train two runs block by block" in full, full


def test_quick_demo_help_says_where_its_time_was_measured(capsys) -> None:
    """ "about a minute" was 160 s at load 14 on 2 cores: the help gives a range and the machine it was timed on."""
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "about a minute" not in text, text
    assert "2-core" in text and "min" in text, text
