"""Why a `serve --rollback` batch flushed at once (probe107 item 3): the floor, or no earlier model, with figures.

A deletion in block 1 of a single chain was explained as "no rolled-back version ... met the held-out accuracy
floor (--floor-points)" even with --floor-points 100; when the floor was the reason, neither the serve log, the
request's status line nor the batch record gave the candidate's accuracy, the floor or the margin.
"""

from __future__ import annotations

import logging

import pytest

from actors.chains import ChainWorker
from flows.batching import batch_gate
from flows.cli import main
from flows.rollback import save_rollback
from flows.settle import AttemptPolicy, run_pass
from storage import ObjectStore
from storage.ledger import DeletionLedger


@pytest.fixture
def trained(train_rb):
    return train_rb()


def _unlearn_in_process(url: str):
    worker = ChainWorker(url)
    return lambda per_run: {run_id: worker.unlearn(run_id, requests) for run_id, requests in per_run.items()}


def _gate_then_pass(url: str, store: ObjectStore, request_id: str, ids: list[int], caplog) -> dict:
    """File a request, gate it as serve's pass does (logging what serve logs), then run the pass that settles it."""
    ledger = DeletionLedger(store)
    ledger.append(request_id=request_id, ids=ids, dataset="digits", reason=None)
    with caplog.at_level(logging.WARNING, logger="flows.batching"):
        gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert gate["flush"]
    # what flows.unlearn hands the pass
    batch = {"reason": gate["reason"], "deadlines": gate["deadlines"], "rollback_refused": gate["rollback_refused"]}
    run_pass(url, unlearn_runs=_unlearn_in_process(url), attempts=AttemptPolicy(max_attempts=1), batch=batch)
    assert ledger.get(request_id).status == "done"
    return gate


def test_a_block_1_deletion_flushes_for_no_earlier_model_not_the_floor(trained, capsys, caplog) -> None:
    url, store, ids_in = trained
    save_rollback(store, enabled=True, floor_points=100.0)  # any drop accepted: the floor cannot be why
    gate = _gate_then_pass(url, store, "first-block", ids_in(1), caplog)
    assert gate["reason"] == "rollback_no_earlier_model"
    refused = gate["rollback_refused"]["rb"]
    assert refused["cause"] == "no_earlier_model" and refused["first_affected_block"] == 1
    assert refused["requests"] == ["first-block"]
    logged = caplog.text
    assert "no interim version for run rb: no checkpoint before the earliest affected block (1) is a model" in logged
    assert "whatever --floor-points allows" in logged and "below the floor" not in logged
    assert store.get_json("ledger/batch/open.json")["rollback_refused"]["rb"]["cause"] == "no_earlier_model"
    capsys.readouterr()
    assert main(["forget", "--store", url, "--status", "first-block"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("request first-block: done (retrained at once: the ids lie in the first block")
    assert "(M_0 is no model)" in line and "met the held-out accuracy floor" not in line
    assert line.endswith("stayed served until the retrain landed: run rb)")  # said once, the run named
    assert main(["forget", "--store", url, "--status", "first-block", "--wait", "1"]) == 0  # the --wait line too
    assert "whatever --floor-points allows" in capsys.readouterr().err


def test_below_the_floor_the_figures_are_logged_recorded_and_shown(trained, capsys, caplog) -> None:
    url, store, ids_in = trained
    save_rollback(store, enabled=True, floor_points=0.0)  # no drop at all: the barely trained M_1 misses it
    ledger = DeletionLedger(store)
    ledger.append(request_id="late-block", ids=ids_in(2), dataset="digits", reason=None)
    with caplog.at_level(logging.WARNING, logger="flows.batching"):
        gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert gate["flush"] and gate["reason"] == "rollback_below_floor"
    refused = gate["rollback_refused"]["rb"]
    assert refused["cause"] == "below_floor" and refused["candidate_block"] == 1 and refused["floor_points"] == 0.0
    accuracy, floor, reference = refused["accuracy"], refused["floor"], refused["reference_accuracy"]
    assert floor == pytest.approx(reference) and accuracy < refused["needed"]
    margin = refused["margin_points"] or 0.0
    assert refused["short_points"] == pytest.approx(100 * (floor + margin / 100 - accuracy), abs=1e-3)
    figures = (
        f"its rolled-back M_1 has held-out accuracy {100 * accuracy:.1f} %, below the floor {100 * floor:.1f} % "
        f"(pre-deletion {100 * reference:.1f} % minus --floor-points 0) plus the paired margin "
    )
    assert f"no interim version for run rb: {figures}" in caplog.text
    assert f"{refused['short_points']:.2f} points short" in caplog.text
    # while it waits (before its pass) its status says why and by how much
    capsys.readouterr()
    assert main(["forget", "--store", url, "--status", "late-block"]) == 0
    said = capsys.readouterr().err
    assert "not forgotten yet: no rolled-back version was published (run rb: " + figures in said
    # settled by its pass: the done line keeps the figures (from the request's history)
    batch = {"reason": gate["reason"], "deadlines": gate["deadlines"], "rollback_refused": gate["rollback_refused"]}
    run_pass(url, unlearn_runs=_unlearn_in_process(url), attempts=AttemptPolicy(max_attempts=1), batch=batch)
    # the batch record keeps the reason and the figures
    batch_id = ledger.get("late-block").details["batch_id"]
    record = ledger.batch(batch_id)
    assert record["reason"] == "rollback_below_floor" and record["rollback_refused"]["rb"] == refused
    assert main(["forget", "--store", url, "--status", "late-block"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("request late-block: done (retrained at once: no rolled-back version of an affected run")
    assert f"until the retrain landed: run rb: {figures}" in line


def test_the_demo_names_the_reason_and_the_figures(capsys) -> None:
    from flows.cli.demo import _print_batch

    refusal = {
        "cause": "below_floor",
        "candidate_block": 2,
        "first_affected_block": 3,
        "accuracy": 0.81,
        "reference_accuracy": 0.9,
        "floor_points": 2.0,
        "floor": 0.88,
        "margin_points": 1.5,
        "needed": 0.895,
        "short_points": 8.5,
        "requests": ["del-1"],
    }
    batch = {
        "requests": [
            {"request_id": "del-1", "ids": [7], "status": "done", "forget_s": None, "exact_s": 2.0, "late": False}
        ],
        "window_s": 3600.0,
        "batched_until": 0.0,
        "batched_rule": "window",
        "flushed_by_rule": "rollback_below_floor",
        "rollback_refused": {"run-a": refusal},
        "floor_points": 2.0,
        "interim": {},
        "served": {"run-a": []},
        "runs_retrained": ["run-a"],
        "block_trainings": 1,
        "retrain_seconds": 0.1,
        "per_request_block_trainings": 1.0,
        "per_request_seconds": 0.1,
        "naive_per_request_block_trainings": 4.0,
        "naive_per_request_seconds": 0.3,
    }
    _print_batch(batch)
    out = capsys.readouterr().out
    assert (
        "  no rolled-back version for run run-a: its rolled-back M_2 has held-out accuracy 81.0 %, below the floor "
        "88.0 % (pre-deletion 90.0 % minus --floor-points 2) plus the paired margin 1.50 points = 89.5 % needed, "
        "8.50 points short" in out
    )
    _print_batch({**batch, "flushed_by_rule": "rollback_no_earlier_model", "rollback_refused": {}})
    assert "the ids lie in a run's first block: no checkpoint before them is a model" in capsys.readouterr().out
