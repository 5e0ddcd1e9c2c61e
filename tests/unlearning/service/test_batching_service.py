"""Deadline-aware batching in the service (issue 11): the gate every unlearning pass goes through."""

from __future__ import annotations

from pathlib import Path

from flows.batching import batch_gate, batch_status, load_policy, request_flush, save_policy
from obliviate.unlearning.batching import DAY_S, BatchPolicy
from storage import ObjectStore
from storage.ledger import DeletionLedger


def _store(tmp_path: Path) -> ObjectStore:
    store = ObjectStore(f"file://{tmp_path / 'store'}")
    store.ensure_container()
    return store


def test_without_a_policy_every_request_flushes_at_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ledger = DeletionLedger(store)
    ledger.append(request_id="a", ids=[1, 2], dataset="digits", reason=None)
    assert load_policy(store) == BatchPolicy()
    gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert gate["flush"] and gate["requests"] == ["a"]
    assert gate["deadlines"]["a"] == ledger.get("a").request["requested_at"] + 30 * DAY_S


def test_a_window_holds_requests_until_due_and_forget_now_flushes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    save_policy(store, BatchPolicy(window_s=DAY_S, batch_max=3))
    ledger = DeletionLedger(store)
    ledger.append(request_id="a", ids=[1], dataset="digits", reason=None)
    requested = ledger.get("a").request["requested_at"]
    gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0), now=requested + 60)
    assert not gate["flush"] and gate["reason"] == "window" and gate["batched_until"] == requested + DAY_S
    status = batch_status(store, "a")
    assert status is not None and status["batched_until"] == requested + DAY_S
    assert batch_gate(store, ledger.open_entries(stale_after_s=600.0), now=requested + DAY_S)["flush"]
    request_flush(store, reason="operator")
    forced = batch_gate(store, ledger.open_entries(stale_after_s=600.0), now=requested + 60)
    assert forced["flush"] and forced["reason"] == "now" and store.list("ledger/flush") == []
    for rid in ("b", "c"):
        ledger.append(request_id=rid, ids=[5], dataset="digits", reason=None)
    counted = batch_gate(store, ledger.open_entries(stale_after_s=600.0), now=requested + 60)
    assert counted["flush"] and counted["reason"] == "count"
