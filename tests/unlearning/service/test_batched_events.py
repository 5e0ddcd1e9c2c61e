"""An event whose request waits in the open batch (serve --batch-window) is recorded ``batched``, not
``duplicate``, and its record ends saying what became of the request (a local store, a real Prefect
server, no Ray: no run is trained, so a flushed request ends rejected before any fan-out)."""

from __future__ import annotations

import pytest

from flows.batching import request_flush, save_policy
from flows.unlearn import submit_deletion, unlearn_flow
from obliviate.unlearning.batching import DAY_S, BatchPolicy
from storage import ObjectStore
from storage.ledger import DeletionLedger


def _record(store: ObjectStore, event_id: str) -> dict | None:
    return DeletionLedger(store).event(event_id)


def test_a_batched_event_names_batched_until_and_ends_with_what_became_of_its_request(store_url, prefect_api_url):
    """With --batch-window 1d the only event of a new request said 'duplicate', status pending, for good."""
    store = ObjectStore(store_url)
    store.ensure_container()
    save_policy(store, BatchPolicy(window_s=DAY_S))
    ledger = DeletionLedger(store)
    rid = submit_deletion(store_url, [5, 7], dataset="digits", emit=False)["request_id"]
    state = unlearn_flow(store=store_url, payload={"request_id": rid}, event_id="ev-wait", return_state=True)
    assert state.is_completed(), state
    assert state.result()["outcome"] == "batched"
    requested = ledger.get(rid).request["requested_at"]
    record = _record(store, "ev-wait")
    assert record["outcome"] == "batched" and record["status"] == "pending" and record["request_id"] == rid
    assert record["batched_until"] == pytest.approx(requested + DAY_S) and record["flush_rule"] == "window"
    assert "settled_at" not in record

    request_flush(store, reason="operator")  # `forget --now`: the next event's pass flushes the batch
    flushed = unlearn_flow(store=store_url, payload={"request_id": rid}, event_id="ev-now", return_state=True)
    assert flushed.is_failed() and ledger.get(rid).status == "rejected"  # no registered run trained on digits
    assert _record(store, "ev-now")["outcome"] == "processed"
    record = _record(store, "ev-wait")
    assert record["outcome"] == "batched" and record["status"] == "rejected"
    assert "no registered run was trained on dataset 'digits'" in record["reason"]
    assert record["batched_until"] == pytest.approx(requested + DAY_S) and record["settled_at"] >= requested
    assert store.list("ledger/batch/events") == []  # nothing left to finish


def test_a_batched_request_cancelled_meanwhile_ends_its_event_record_cancelled(store_url, prefect_api_url):
    from flows.unlearn import finish_batched_events

    store = ObjectStore(store_url)
    store.ensure_container()
    save_policy(store, BatchPolicy(window_s=DAY_S))
    ledger = DeletionLedger(store)
    rid = submit_deletion(store_url, [9], dataset="digits", emit=False)["request_id"]
    unlearn_flow(store=store_url, payload={"request_id": rid}, event_id="ev-c", return_state=True)
    assert _record(store, "ev-c")["status"] == "pending"
    ledger.cancel(rid, applied_to=[])
    assert finish_batched_events(store) == ["ev-c"]
    record = _record(store, "ev-c")
    assert record["outcome"] == "batched" and record["status"] == "cancelled"
    assert finish_batched_events(store) == []
