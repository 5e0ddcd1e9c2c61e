"""An event delivered again after ``forget --retry`` is recorded with every delivery (a local store, real Prefect and Ray).

The event's record kept its first ``processed`` record for good: delivered once, its request failed
(record ``processed``, ``status: failed`` with the reason); put back with ``forget --retry`` and
delivered again, the request was forgotten (``done`` in its status history), but the event's record
still said ``failed``, and nothing showed the second delivery. Now each delivery is one entry of the
record's ``deliveries`` (its flow run, when it was received and recorded, its outcome and the request's
status then), and the record's own fields are those of the delivery that last took the request up.

The request fails the way a damaged ledger record fails it (README: "restored from a backup, forget
--retry takes it up"): its record is restored, ``obliviate forget --retry`` queues it again, and the
same event is delivered again, as Prefect's trigger or a second ``serve`` would deliver it.
"""

from __future__ import annotations

from pathlib import Path

from flows.cli import main
from flows.unlearn import submit_deletion, unlearn_flow
from storage import ObjectStore
from storage.ledger import CLAIMED, DONE, FAILED, PENDING, DeletionLedger

GARBAGE = b"\0garbage{{{"


def _deliver(store_url: str):
    """One delivery of event ev-1, as serve runs it: the flow run's final state."""
    return unlearn_flow(store=store_url, payload={"request_id": "req-1"}, event_id="ev-1", workers=1, return_state=True)


def test_every_delivery_of_an_event_is_recorded_and_the_last_processing_one_speaks_for_it(
    store_url, prefect_api_url, ray_address, train_r1
):
    victim = train_r1(store_url)[1]
    submit_deletion(store_url, [victim], dataset="digits", request_id="req-1", emit=False)
    record_file = Path(store_url.removeprefix("file://")) / "ledger/requests/req-1.json"
    backup = record_file.read_bytes()
    record_file.write_bytes(GARBAGE)
    ledger = DeletionLedger(ObjectStore(store_url))

    first = _deliver(store_url)
    assert first.is_failed() and "request req-1 is failed" in first.message, first
    assert ledger.event("ev-1")["status"] == FAILED

    record_file.write_bytes(backup)  # restored from a backup
    assert main(["forget", "--store", store_url, "--retry", "req-1", "--no-event"]) == 0
    second = _deliver(store_url)
    assert second.is_completed(), second
    assert ledger.get("req-1").status == DONE
    third = _deliver(store_url)  # once more, the work done: a duplicate, which speaks for the event no more
    assert third.is_completed(), third

    assert [h["status"] for h in ledger.history("req-1")] == [PENDING, FAILED, PENDING, CLAIMED, DONE]
    record = ledger.event("ev-1")
    assert (record["outcome"], record["status"], record["request_id"]) == ("processed", DONE, "req-1")
    assert "reason" not in record  # the failure's reason belongs to the first delivery, not to the event now
    deliveries = record["deliveries"]
    assert [(d["outcome"], d["status"]) for d in deliveries] == [
        ("processed", FAILED),
        ("processed", DONE),
        ("duplicate", DONE),
    ], deliveries
    assert "forget --ids IDS --data DATASET --request-id req-1 --no-event" in deliveries[0]["reason"]
    assert [d["delivery"] for d in deliveries] == [str(s.state_details.flow_run_id) for s in (first, second, third)]
    received = [d["received_at"] for d in deliveries]
    assert received == sorted(received) and all(d["recorded_at"] >= d["received_at"] for d in deliveries)
    assert record["delivery"] == deliveries[1]["delivery"]  # the record speaks for the delivery that forgot it
