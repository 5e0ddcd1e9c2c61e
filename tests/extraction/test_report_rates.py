"""The audit's table gives a spread only where seeds measured one."""

from __future__ import annotations

from obliviate.extraction.audit import SummaryRow, markdown_report, rate_cell, rates_said, summarize


def _cell(seed: int, agreement: float) -> dict:
    return {
        "attacker": "basic",
        "selector": "random",
        "budget": 50,
        "seed": seed,
        "accuracy": agreement - 0.01,
        "agreement": agreement,
        "transfer": {"0.3": 0.8},
        "class_histogram": [5] * 10,
        "mean_entropy": 1.1,
        "seconds": 2.0,
    }


def _row(cells: list[dict]) -> SummaryRow:
    (row,) = summarize(cells)
    return row


def test_one_seed_gives_its_rate_alone_and_says_so() -> None:
    row = _row([_cell(0, 0.67)])
    assert row.runs == 1
    report = markdown_report([row])
    assert "| basic | random | 50 | 1 | 66.00 | 67.00 | 80.00 | 2.0 |" in report, report
    assert "±" not in report
    assert rates_said([row]).startswith("Rates are percent, from one seed per cell")


def test_seeds_give_mean_and_spread() -> None:
    row = _row([_cell(0, 0.60), _cell(1, 0.70)])
    assert row.runs == 2
    report = markdown_report([row])
    assert "| basic | random | 50 | 2 | 64.00 ± 5.00 | 65.00 ± 5.00 | 80.00 ± 0.00 | 2.0 |" in report, report
    assert rates_said([row]) == "Rates are percent, mean ± std over seeds"
    # A report with any cell of several seeds keeps the spread columns' meaning.
    assert rates_said([row, _row([_cell(0, 0.5)])]) == "Rates are percent, mean ± std over seeds"


def test_rate_cell_is_percent_with_two_decimals() -> None:
    assert rate_cell(0.9566, 0.0123, runs=3) == "95.66 ± 1.23"
    assert rate_cell(0.9566, 0.0, runs=1) == "95.66"
