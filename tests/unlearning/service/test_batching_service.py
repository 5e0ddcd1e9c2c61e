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


def test_forget_now_under_the_immediate_policy_is_consumed_and_the_window_rule_stays(tmp_path: Path) -> None:
    """A flush request under the default policy marked the next batch "now": a request filed after `forget --now`
    ended "done (its batch was retrained when `forget --now` asked)"; and it lingered with no request open."""
    store = _store(tmp_path)
    ledger = DeletionLedger(store)
    ledger.append(request_id="a", ids=[1], dataset="digits", reason=None)
    request_flush(store, reason="operator")
    ledger.append(request_id="b", ids=[2], dataset="digits", reason=None)  # after the --now
    gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert gate["flush"] and gate["reason"] == "window" and gate["requests"] == ["a", "b"]
    assert store.list("ledger/flush") == []
    request_flush(store, reason="operator")
    empty = batch_gate(store, [])
    assert not empty["flush"] and empty["reason"] == "empty" and store.list("ledger/flush") == []


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


def test_serve_starts_no_pass_for_a_request_waiting_in_the_open_batch(tmp_path: Path) -> None:
    """With --batch-window 1h, serve started a reconcile run every tick (13 in 80 s) for a batched request."""
    from flows.deployments import ServiceOptions, ServiceWatcher

    store = _store(tmp_path)
    save_policy(store, BatchPolicy(window_s=3600.0))
    ledger = DeletionLedger(store)
    ledger.append(request_id="a", ids=[1], dataset="digits", reason=None)
    watcher = ServiceWatcher(ServiceOptions(store=store.url), announcement={"pid": 0}, api_url="http://127.0.0.1:9")
    watcher.grace_s = 0.0  # the event was lost long ago: only the batch keeps the request waiting
    assert watcher.needs_pass()  # not yet in any batch: a pass must put it there
    assert not batch_gate(store, ledger.due_entries(lease_s=20.0))["flush"]  # the pass: batched for an hour
    assert not watcher.needs_pass()
    request_flush(store, reason="operator")  # `forget --now`
    assert watcher.needs_pass()
    assert batch_gate(store, ledger.due_entries(lease_s=20.0))["flush"]
