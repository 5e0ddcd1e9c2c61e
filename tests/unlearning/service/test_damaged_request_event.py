"""A deletion event for a request whose ledger record is damaged (a local store, a real Prefect server, no Ray).

The event's ``unlearn`` run read the request first and ended with ``CorruptObject`` (the damage and its
mend) before any pass ran: the request stayed ``pending``, no event record was written, and the other
requests waited for the watcher's or the cron's pass. Now the event's run is that pass: it records the
request ``failed`` with how to mend it, settles the others, records the event, and ends ``Failed`` with
that reason as a sentence, as for any request that ended ``failed`` (README: an event's run ends
``Failed`` when its request ended ``rejected`` or ``failed``). A request whose current status is damaged
too cannot be recorded: the event's record says ``unreadable`` with how to mend it. No run is trained,
so a healthy request ends ``rejected`` before any fan-out.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flows.reconcile import reconcile_flow
from flows.settle import store_pass
from flows.unlearn import submit_deletion, unlearn_flow
from storage import ObjectStore
from storage.ledger import DAMAGED_RECORD, FAILED, PENDING, REJECTED, DeletionLedger

GARBAGE = b"\0garbage{{{"
MEND = "forget --ids IDS --data DATASET --request-id req-bad --no-event"


def _root(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _run(store_url: str, payload: object, event_id: str):
    """The event's flow run, as serve runs it: its final state."""
    return unlearn_flow(store=store_url, payload=payload, event_id=event_id, return_state=True)


def _record(store_url: str, event_id: str) -> dict | None:
    return DeletionLedger(ObjectStore(store_url)).event(event_id)


def _filed(store_url: str) -> DeletionLedger:
    """req-ok (healthy) and req-bad (its record damaged), both pending."""
    ObjectStore(store_url).ensure_container()
    submit_deletion(store_url, [5], dataset="digits", request_id="req-ok", emit=False)
    submit_deletion(store_url, [6], dataset="digits", request_id="req-bad", emit=False)
    (_root(store_url) / "ledger/requests/req-bad.json").write_bytes(GARBAGE)
    return DeletionLedger(ObjectStore(store_url))


def _assert_failed_with_its_mend(ledger: DeletionLedger, state, event_id: str) -> None:
    assert state.is_failed(), state
    assert "CorruptObject" not in state.message and "Traceback" not in state.message
    assert (
        f"deletion event {event_id}: request req-bad is failed: the record of deletion request req-bad is damaged"
        in (state.message)
    )
    assert MEND in state.message
    last = ledger.history("req-bad")[-1]
    assert last["status"] == FAILED and last["details"][DAMAGED_RECORD]
    assert last["details"]["reason"] in state.message


def test_an_event_for_a_damaged_request_records_it_failed_and_settles_the_others(store_url, prefect_api_url, caplog):
    ledger = _filed(store_url)
    with caplog.at_level(logging.INFO, logger="prefect.flow_runs"):
        state = _run(store_url, {"request_id": "req-bad"}, "ev-1")
    _assert_failed_with_its_mend(ledger, state, "ev-1")
    assert [h["status"] for h in ledger.history("req-bad")] == [PENDING, FAILED]  # recorded by this run
    assert ledger.get("req-ok").status == REJECTED  # the other request was settled by the same pass
    record = _record(store_url, "ev-1")
    assert record["outcome"] == "processed" and record["request_id"] == "req-bad"
    assert record["status"] == FAILED and MEND in record["reason"]
    ended = [r for r in caplog.records if "Encountered exception" in r.getMessage()]
    assert ended and all(r.exc_info is None for r in ended), [r.getMessage() for r in caplog.records]
    assert "Traceback" not in caplog.text

    again = _run(store_url, {"request_id": "req-bad"}, "ev-2")  # delivered again: settled already, said the same
    _assert_failed_with_its_mend(ledger, again, "ev-2")
    assert _record(store_url, "ev-2")["outcome"] == "duplicate" and len(ledger.history("req-bad")) == 2


def test_an_ids_event_naming_a_damaged_request_stands_for_it(store_url, prefect_api_url):
    ledger = _filed(store_url)
    state = _run(store_url, {"ids": [6], "dataset": "digits", "request_id": "req-bad"}, "ev-ids")
    _assert_failed_with_its_mend(ledger, state, "ev-ids")
    assert _record(store_url, "ev-ids")["status"] == FAILED


def test_the_damage_does_not_fail_the_event_of_another_request(store_url, prefect_api_url):
    ledger = _filed(store_url)
    state = _run(store_url, {"request_id": "req-ok"}, "ev-ok")
    assert state.is_failed() and "request req-ok is rejected: no registered run was trained" in state.message
    assert "req-bad" not in state.message  # its own outcome only
    assert ledger.history("req-bad")[-1]["status"] == FAILED  # settled by the same pass


def test_an_event_for_a_request_whose_status_is_damaged_too_says_what_to_mend(store_url, prefect_api_url):
    ledger = _filed(store_url)
    (_root(store_url) / "ledger/status/req-bad/v000000001.json").write_bytes(GARBAGE)
    state = _run(store_url, {"request_id": "req-bad"}, "ev-u")
    assert state.is_failed() and "CorruptObject" not in state.message
    assert "request req-bad is unreadable: the record of deletion request req-bad is damaged" in state.message
    assert "no status can be recorded" in state.message and "current status of deletion request req-bad" in (
        state.message
    )
    record = _record(store_url, "ev-u")
    assert record["outcome"] == "processed" and record["status"] == "unreadable" and MEND in record["reason"]
    assert ledger.get("req-ok").status == REJECTED
    assert len(ledger.history("req-bad")) == 1  # nothing written over the damage


def test_an_event_that_waits_for_another_pass_is_finished_with_the_failure(store_url, prefect_api_url):
    ledger = _filed(store_url)
    with store_pass(ledger.store, holder="another-pass", lease_s=20.0) as other:
        assert other is None
        waited = _run(store_url, {"request_id": "req-bad"}, "ev-w")  # the store is busy: it waits for the next pass
    assert waited.is_completed(), waited
    record = _record(store_url, "ev-w")
    assert record["outcome"] == "batched" and record["flush_rule"] == "pass_running" and record["status"] == PENDING
    reconcile_flow(store=store_url)  # the next pass records it failed and finishes the event's record
    record = _record(store_url, "ev-w")
    assert record["status"] == FAILED and MEND in record["reason"] and record["outcome"] == "batched"
