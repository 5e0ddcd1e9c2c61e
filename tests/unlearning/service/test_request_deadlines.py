"""Each request carries its deadline (SPEC section 6), fixed when the ledger accepts it.

The ledger kept only ``requested_at`` and every gate pass recomputed ``requested_at`` + the current
policy's deadline, so restarting ``serve --deadline 90d`` moved a request promised 30 days to 90
(and a shorter one made old requests overdue at once); the late judgement used the same figure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.batching import batch_gate, save_policy
from flows.cli import main
from obliviate.unlearning.batching import DAY_S, DEFAULT_MARGIN_S, BatchPolicy
from obliviate.unlearning.service import RequestError
from storage import ObjectStore
from storage.ledger import DeletionLedger


def _store(tmp_path: Path) -> ObjectStore:
    store = ObjectStore(f"file://{tmp_path / 'store'}")
    store.ensure_container()
    return store


def _gate(store: ObjectStore, *, now: float) -> dict:
    return batch_gate(store, DeletionLedger(store).open_entries(stale_after_s=600.0), now=now)


def test_a_policy_change_moves_no_deadline_already_given(tmp_path: Path) -> None:
    store = _store(tmp_path)
    save_policy(store, BatchPolicy(window_s=7 * DAY_S, deadline_s=30 * DAY_S))
    ledger = DeletionLedger(store)
    ledger.append(request_id="a", ids=[1], dataset="digits", reason=None)
    record = ledger.get("a").request
    t = record["requested_at"]
    assert record["deadline"] == t + 30 * DAY_S
    assert _gate(store, now=t + 60)["deadlines"] == {"a": t + 30 * DAY_S}
    save_policy(store, BatchPolicy(window_s=7 * DAY_S, deadline_s=90 * DAY_S))  # serve restarted with --deadline 90d
    longer = _gate(store, now=t + 120)
    assert longer["deadlines"] == {"a": t + 30 * DAY_S} and not longer["flush"]
    assert longer["reason"] == "window" and longer["batched_until"] == t + 7 * DAY_S
    save_policy(store, BatchPolicy(window_s=7 * DAY_S, deadline_s=2 * DAY_S))  # ... and with --deadline 2d
    shorter = _gate(store, now=t + 3 * DAY_S)  # not overdue: its 30 days still hold
    assert shorter["deadlines"] == {"a": t + 30 * DAY_S} and not shorter["flush"] and shorter["reason"] == "window"
    assert ledger.get("a").request["deadline"] == t + 30 * DAY_S


def test_a_request_with_a_shorter_deadline_flushes_by_its_own(tmp_path: Path) -> None:
    store = _store(tmp_path)
    save_policy(store, BatchPolicy(window_s=DAY_S, deadline_s=DAY_S / 2))
    ledger = DeletionLedger(store)
    ledger.append(request_id="early", ids=[1], dataset="digits", reason=None)  # filed under a 12 h policy
    save_policy(store, BatchPolicy(window_s=7 * DAY_S, deadline_s=30 * DAY_S))
    ledger.append(request_id="late", ids=[2], dataset="digits", reason=None)
    ledger.append(request_id="short", ids=[3], dataset="digits", reason=None, deadline_s=3 * DAY_S)
    early, late, short = (ledger.get(r).request for r in ("early", "late", "short"))
    assert early["deadline"] == early["requested_at"] + DAY_S / 2
    assert late["deadline"] == late["requested_at"] + 30 * DAY_S
    assert short["deadline"] == short["requested_at"] + 3 * DAY_S
    t = early["requested_at"]
    gate = _gate(store, now=t + 60)
    assert not gate["flush"] and gate["reason"] == "deadline"
    assert gate["batched_until"] == early["deadline"] - DEFAULT_MARGIN_S  # no run registered: no retrain time
    assert _gate(store, now=early["deadline"] - DEFAULT_MARGIN_S)["flush"]
    # without the 12 h request, the one filed with 3 days flushes by its own deadline, not the policy's 7-day window
    ledger.cancel("early", applied_to=[])
    gate = _gate(store, now=t + 120)
    assert gate["reason"] == "deadline" and gate["batched_until"] == short["deadline"] - DEFAULT_MARGIN_S
    assert gate["deadlines"] == {"late": late["deadline"], "short": short["deadline"]}


def test_a_deadline_that_is_no_duration_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    ledger = DeletionLedger(_store(tmp_path))
    for bad in (0, -5.0, float("nan"), float("inf"), "1d", True):
        with pytest.raises(RequestError, match=r"a finite number of seconds > 0 after receipt; got"):
            ledger.append(request_id="x", ids=[1], dataset="digits", reason=None, deadline_s=bad)  # type: ignore[arg-type]
    assert ledger.request_ids() == []


def test_a_record_without_a_deadline_gets_receipt_plus_the_policy(tmp_path: Path, capsys) -> None:
    """A ledger written before deadlines were recorded still batches (its deadline: receipt + the policy's)."""
    store = _store(tmp_path)
    save_policy(store, BatchPolicy(window_s=7 * DAY_S, deadline_s=30 * DAY_S))
    ledger = DeletionLedger(store)
    for rid in ("old", "new"):
        ledger.append(request_id=rid, ids=[1], dataset="digits", reason=None)
    old = {k: v for k, v in ledger.get("old").request.items() if k != "deadline"}
    store.put_json("ledger/requests/old.json", old)  # as an older version wrote it
    save_policy(store, BatchPolicy(window_s=7 * DAY_S, deadline_s=10 * DAY_S))
    new = ledger.get("new").request
    gate = _gate(store, now=old["requested_at"] + 60)
    assert gate["deadlines"] == {"old": old["requested_at"] + 10 * DAY_S, "new": new["requested_at"] + 30 * DAY_S}
    assert gate["reason"] == "window" and not gate["flush"]
    # forget --status shows each deadline: in the batch line, or as "deadline T" while not batched
    assert main(["forget", "--store", store.url, "--status", "new"]) == 0
    assert "; deadline 20" in capsys.readouterr().err
    store.delete("ledger/batch/open.json")
    assert main(["forget", "--store", store.url, "--status", "new"]) == 0
    said = capsys.readouterr().err
    assert "(not picked up yet" in said and said.rstrip().endswith(" UTC") and "; deadline 20" in said
    assert main(["forget", "--store", store.url, "--status", "old"]) == 0
    assert "deadline" not in capsys.readouterr().err.splitlines()[-1]


def test_a_pass_judges_late_against_the_recorded_deadline(store_url, tiny_run) -> None:
    """A done request records the deadline it was given and whether it became exact after it."""
    from actors.chains import ChainWorker
    from flows.settle import run_pass
    from flows.train import run_spec

    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=2, train_size=200, heldout_size=50))
    ChainWorker(store_url).train(spec)
    store = ObjectStore(store_url)
    save_policy(store, BatchPolicy(deadline_s=90 * DAY_S))
    ledger = DeletionLedger(store)
    ids = spec["train_ids"]
    ledger.append(request_id="due", ids=[ids[0]], dataset="digits", reason=None, deadline_s=0.001)
    ledger.append(request_id="ok", ids=[ids[1]], dataset="digits", reason=None)
    worker = ChainWorker(store_url)
    result = run_pass(store_url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})
    assert result["settled"] == {"due": "done", "ok": "done"}
    due, ok = ledger.get("due"), ledger.get("ok")
    assert due.details["deadline"] == due.request["deadline"] and due.details["late"] is True
    assert ok.details["deadline"] == ok.request["requested_at"] + 90 * DAY_S and ok.details["late"] is False
