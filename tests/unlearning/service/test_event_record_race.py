"""Deliveries of one deletion event racing to record it never lose the record of the one that did the work.

``record_event`` read the event's record and then wrote its own: a delivery that found the work done
(``duplicate``) and had read nothing yet overwrote the ``processed`` record written between its read and
its write. Now the record is a pointer moved by compare-and-swap from the version read, so the loser of
the swap reads again and finds ``processed``. Raced here with real threads on a local store and on the
moto S3 server, each racer with its own store (its own client), as separate deliveries have.

Every delivery is listed in the record's ``deliveries`` too, and a later delivery that took the request up
again after a ``forget --retry`` (it saw a newer status of the request) speaks for the event from then on.
"""

from __future__ import annotations

import threading

import pytest

from storage import ObjectStore
from storage.ledger import MAX_EVENT_DELIVERIES, DeletionLedger

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
    rounds = 50 if where == "file" else 10  # about 3 s a round on moto: 20 rounds were the suite's 7th slowest test
    ledgers = [DeletionLedger(ObjectStore(url)) for _ in range(DUPLICATES + 1)]
    for round_ in range(rounds):
        errors = _race(ledgers, f"ev-{round_}")
        assert not errors, errors
    records = DeletionLedger(ObjectStore(url)).events()
    recorded = {e["event_id"]: e["outcome"] for e in records}
    lost = {event_id: outcome for event_id, outcome in recorded.items() if outcome != "processed"}
    assert not lost and len(recorded) == rounds, f"the processed record was lost in {len(lost)} of {rounds} races"
    unlisted = [e["event_id"] for e in records if len(e["deliveries"]) != DUPLICATES + 1]
    assert not unlisted, f"a delivery was left out of the record of {unlisted}"  # each racer's entry kept too


def test_a_processed_record_speaks_until_a_delivery_takes_the_retried_request_up_and_every_delivery_is_listed(
    store_url,
):
    ledger = DeletionLedger(ObjectStore(store_url))
    assert ledger.event("ev-1") is None

    def delivered(name: str, outcome: str, status: str, version: int) -> bool:
        body = {"outcome": outcome, "request_id": "r", "status": status, "status_version": version, "delivery": name}
        return ledger.record_event("ev-1", body)

    assert delivered("a", "processing", "pending", 1)
    assert delivered("b", "duplicate", "claimed", 2)  # another delivery, while a's pass holds the request
    assert delivered("a", "processed", "failed", 3)  # a's entry becomes its outcome
    assert not delivered("c", "duplicate", "failed", 3)  # the work done
    assert not delivered("d", "batched", "failed", 3)  # batched beside a's pass: saw no newer status
    assert not delivered("e", "processing", "pending", 4)  # after a forget --retry (version 4) ...
    assert delivered("e", "processed", "done", 6)  # ... it took the request up again: it speaks now
    assert not delivered("f", "processed", "done", 6)  # a pass that saw no newer status: listed only
    record = ledger.event("ev-1")
    assert (record["outcome"], record["status"], record["delivery"]) == ("processed", "done", "e")
    assert [(d["delivery"], d["outcome"], d["status"]) for d in record["deliveries"]] == [
        ("a", "processed", "failed"),
        ("b", "duplicate", "claimed"),
        ("c", "duplicate", "failed"),
        ("d", "batched", "failed"),
        ("e", "processed", "done"),
        ("f", "processed", "done"),
    ]
    assert "deliveries_dropped" not in record


def test_a_processed_record_without_a_newer_status_is_final_and_any_other_is_replaced(store_url):
    ledger = DeletionLedger(ObjectStore(store_url))
    assert ledger.event("ev-1") is None
    for outcome in ("processing", "duplicate", "processed"):  # a delivery's steps, and another's duplicate between
        assert ledger.record_event("ev-1", {"outcome": outcome, "request_id": "r", "status": "done"})
    for outcome in ("processing", "duplicate", "processed", "rejected", "batched"):  # later deliveries
        assert not ledger.record_event("ev-1", {"outcome": outcome, "request_id": "r", "status": "pending"})
    record = ledger.event("ev-1")
    assert {k: v for k, v in record.items() if k not in ("recorded_at", "deliveries")} == {
        "outcome": "processed",
        "request_id": "r",
        "status": "done",
        "event_id": "ev-1",
    }
    assert [(d["outcome"], d["status"]) for d in record["deliveries"]] == [  # no delivery named: one entry each
        ("processing", "done"),
        ("duplicate", "done"),
        ("processed", "done"),
        *((outcome, "pending") for outcome in ("processing", "duplicate", "processed", "rejected", "batched")),
    ]
    assert [h.target["outcome"] for h in _history(ledger.store, "ledger/events/ev-1")] == [
        "processing",
        "duplicate",
        *["processed"] * 6,
    ]


def test_an_event_record_lists_its_first_delivery_and_the_latest_ones(store_url):
    ledger = DeletionLedger(ObjectStore(store_url))
    for n in range(MAX_EVENT_DELIVERIES + 7):
        ledger.record_event("ev-1", {"outcome": "duplicate", "request_id": "r", "status": "done", "delivery": f"d{n}"})
    record = ledger.event("ev-1")
    names = [d["delivery"] for d in record["deliveries"]]
    assert names == ["d0", *(f"d{n}" for n in range(8, MAX_EVENT_DELIVERIES + 7))] and record["deliveries_dropped"] == 7
    assert record["delivery"] == f"d{MAX_EVENT_DELIVERIES + 6}"


def test_an_event_recorded_in_a_plain_record_before_is_read_and_moved_to_the_pointer(store_url):
    """A store written before the pointer kept ``ledger/events/<event>.json``: ``events()`` and ``event()`` read it,
    a duplicate does not replace a processed one, and the first record written moves it to the pointer."""
    store = ObjectStore(store_url)
    store.put_json("ledger/events/ev-old.json", {"outcome": "processed", "event_id": "ev-old", "status": "done"})
    store.put_json("ledger/events/ev-wait.json", {"outcome": "processing", "event_id": "ev-wait"})
    ledger = DeletionLedger(store)
    assert {e["event_id"]: e["outcome"] for e in ledger.events()} == {"ev-old": "processed", "ev-wait": "processing"}

    assert not ledger.record_event("ev-old", {"outcome": "duplicate", "status": "done"})  # listed, moved to the pointer
    old = ledger.event("ev-old")
    assert old["outcome"] == "processed" and not store.exists("ledger/events/ev-old.json")
    assert [(d["outcome"], d["status"]) for d in old["deliveries"]] == [("processed", "done"), ("duplicate", "done")]

    assert ledger.record_event("ev-wait", {"outcome": "processed", "status": "done"})
    assert not store.exists("ledger/events/ev-wait.json")
    assert store.read_pointer("ledger/events/ev-wait").target["outcome"] == "processed"
    assert {e["event_id"]: e["outcome"] for e in ledger.events()} == {"ev-old": "processed", "ev-wait": "processed"}


def _history(store: ObjectStore, key: str) -> list:
    return [store.read_pointer_version(key, version) for version in store.pointer_versions(key)]
