"""Deliveries of one deletion event racing to record it never lose the record of the one that did the work.

``record_event`` read the event's record and then wrote its own: a delivery that found the work done
(``duplicate``) and had read nothing yet overwrote the ``processed`` record written between its read and
its write. Now the record is a pointer moved by compare-and-swap from the version read, so the loser of
the swap reads again and finds ``processed``. Raced here with real threads on a local store and on the
moto S3 server, each racer with its own store (its own client), as separate deliveries have.
"""

from __future__ import annotations

import threading

import pytest

from storage import ObjectStore
from storage.ledger import DeletionLedger

DUPLICATES = 8


def _race(ledgers: list[DeletionLedger], event_id: str) -> list[BaseException]:
    """``DUPLICATES`` deliveries recording ``duplicate`` and one recording ``processed``, all released at once."""
    bodies = [{"outcome": "duplicate", "request_id": "r", "status": "done"}] * DUPLICATES
    bodies.insert(DUPLICATES // 2, {"outcome": "processed", "request_id": "r", "status": "done"})
    start = threading.Barrier(len(bodies))
    errors: list[BaseException] = []

    def deliver(ledger: DeletionLedger, body: dict) -> None:
        try:
            start.wait(30)
            ledger.record_event(event_id, body)
        except BaseException as err:  # noqa: BLE001 -- reported by the assertion of the caller
            errors.append(err)

    threads = [threading.Thread(target=deliver, args=pair) for pair in zip(ledgers, bodies, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


@pytest.mark.parametrize("where", ["file", "s3"])
def test_racing_duplicate_deliveries_never_replace_the_processed_record(where, store_url, request):
    url = store_url if where == "file" else request.getfixturevalue("s3_url")
    rounds = 50 if where == "file" else 20
    ledgers = [DeletionLedger(ObjectStore(url)) for _ in range(DUPLICATES + 1)]
    for round_ in range(rounds):
        errors = _race(ledgers, f"ev-{round_}")
        assert not errors, errors
    recorded = {e["event_id"]: e["outcome"] for e in DeletionLedger(ObjectStore(url)).events()}
    lost = {event_id: outcome for event_id, outcome in recorded.items() if outcome != "processed"}
    assert not lost and len(recorded) == rounds, f"the processed record was lost in {len(lost)} of {rounds} races"


def test_a_processed_record_is_final_and_any_other_is_replaced(store_url):
    ledger = DeletionLedger(ObjectStore(store_url))
    assert ledger.event("ev-1") is None
    for outcome in ("processing", "duplicate", "processed"):  # a delivery's steps, and another's duplicate between
        assert ledger.record_event("ev-1", {"outcome": outcome, "request_id": "r", "status": "done"})
    for outcome in ("processing", "duplicate", "processed", "rejected", "batched"):  # later deliveries
        assert not ledger.record_event("ev-1", {"outcome": outcome, "request_id": "r", "status": "pending"})
    assert ledger.event("ev-1") | {"recorded_at": 0} == {
        "outcome": "processed",
        "request_id": "r",
        "status": "done",
        "event_id": "ev-1",
        "recorded_at": 0,
    }
    assert [h.target["outcome"] for h in _history(ledger.store, "ledger/events/ev-1")] == [
        "processing",
        "duplicate",
        "processed",
    ]


def test_an_event_recorded_in_a_plain_record_before_is_read_and_moved_to_the_pointer(store_url):
    """A store written before the pointer kept ``ledger/events/<event>.json``: ``events()`` and ``event()`` read it,
    a duplicate does not replace a processed one, and the first record written moves it to the pointer."""
    store = ObjectStore(store_url)
    store.put_json("ledger/events/ev-old.json", {"outcome": "processed", "event_id": "ev-old", "status": "done"})
    store.put_json("ledger/events/ev-wait.json", {"outcome": "processing", "event_id": "ev-wait"})
    ledger = DeletionLedger(store)
    assert {e["event_id"]: e["outcome"] for e in ledger.events()} == {"ev-old": "processed", "ev-wait": "processing"}

    assert not ledger.record_event("ev-old", {"outcome": "duplicate", "status": "done"})
    assert ledger.event("ev-old")["outcome"] == "processed" and store.exists("ledger/events/ev-old.json")

    assert ledger.record_event("ev-wait", {"outcome": "processed", "status": "done"})
    assert not store.exists("ledger/events/ev-wait.json")
    assert store.read_pointer("ledger/events/ev-wait").target["outcome"] == "processed"
    assert {e["event_id"]: e["outcome"] for e in ledger.events()} == {"ev-old": "processed", "ev-wait": "processed"}


def _history(store: ObjectStore, key: str) -> list:
    return [store.read_pointer_version(key, version) for version in store.pointer_versions(key)]
