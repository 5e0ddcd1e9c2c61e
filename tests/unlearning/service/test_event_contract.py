"""What a deletion event may carry, and what its sender sees when it is refused (a local store, a real
Prefect server, no Ray: no run is trained, so every request ends rejected before any fan-out)."""

from __future__ import annotations

import pytest

from flows.unlearn import submit_deletion, unlearn_flow
from obliviate.unlearning.service import RequestError, parse_ids
from storage import ObjectStore
from storage.ledger import DeletionLedger


def _run(store_url: str, payload: object, event_id: str):
    """The event's flow run, as serve runs it: its final state."""
    return unlearn_flow(store=store_url, payload=payload, event_id=event_id, return_state=True)


def _record(store_url: str, event_id: str) -> dict | None:
    return DeletionLedger(ObjectStore(store_url)).event(event_id)


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"ids": [11, 12]}, "names the dataset they index in 'dataset'"),
        ({}, "names the ledger entry in 'request_id', or the ids in 'ids'; got keys []"),
        ({"request_id": 12345}, "a request id is 1-64 characters"),
        ({"request_id": "nope-nope"}, "'nope-nope' is not there"),
    ],
)
def test_a_refused_event_fails_its_flow_run_with_the_reason_and_records_it(store_url, prefect_api_url, payload, words):
    """A bad event's run ended COMPLETED with message None; the reason was only a WARNING in serve's log."""
    state = _run(store_url, payload, "ev-bad")
    assert state.is_failed(), state
    assert words in state.message and "refused, nothing changed" in state.message
    assert "Traceback" not in state.message
    record = _record(store_url, "ev-bad")
    assert record["outcome"] == "rejected" and words in record["reason"]
    assert DeletionLedger(ObjectStore(store_url)).entries() == []  # nothing written


def test_an_event_records_the_final_status_of_its_request_and_fails_when_it_was_rejected(store_url, prefect_api_url):
    """The events record kept "outcome": "processing" after the request it named was rejected."""
    submitted = submit_deletion(store_url, [5, 7], dataset="digits", emit=False)
    state = _run(store_url, {"request_id": submitted["request_id"]}, "ev-1")
    assert state.is_failed() and f"request {submitted['request_id']} is rejected" in state.message
    record = _record(store_url, "ev-1")
    assert record["outcome"] == "processed" and record["status"] == "rejected"
    assert "no registered run was trained on dataset 'digits'" in record["reason"] in state.message


def test_an_ids_payload_is_appended_to_the_ledger_once_per_event(store_url, prefect_api_url):
    """{"ids": [...]} was dropped ("names the ledger entry in 'request_id'"): now it is the request."""
    payload = {"ids": [12, 11], "dataset": "digits", "reason": "ticket 7"}
    first = _run(store_url, payload, "ev-ids")
    ledger = DeletionLedger(ObjectStore(store_url))
    (entry,) = ledger.entries()
    assert entry.request["ids"] == [11, 12] and entry.request["reason"] == "ticket 7"
    assert _record(store_url, "ev-ids")["request_id"] == entry.request_id
    assert first.is_failed() and "no registered run was trained" in first.message  # rejected, in words
    again = _run(store_url, payload, "ev-ids")  # the same event delivered again: the same request
    # one request; the record keeps the outcome of the delivery that did the work (d4baaad)
    assert len(ledger.entries()) == 1 and _record(store_url, "ev-ids")["outcome"] == "processed"
    assert again.is_failed()
    named = _run(store_url, {**payload, "request_id": "ticket-7"}, "ev-other")
    assert {e.request_id for e in ledger.entries()} == {entry.request_id, "ticket-7"} and named.is_failed()
    out_of_range = _run(store_url, {"ids": [5000], "dataset": "digits"}, "ev-range")
    assert out_of_range.is_failed() and "digits (1797 rows: ids 0..1796)" in out_of_range.message


def test_submit_deletion_refuses_ids_past_the_dataset_as_forget_does(store_url):
    """The Python API took submit_deletion(store, [5000], dataset="digits") (and 100,000 such ids, a 1 MB
    request file) that `obliviate forget --ids 5000 --data digits` refuses."""
    with pytest.raises(RequestError) as refused:
        parse_ids([5000], dataset_size=1797, dataset="digits")
    with pytest.raises(RequestError) as err:
        submit_deletion(store_url, [5000], dataset="digits", emit=False)
    assert str(err.value) == str(refused.value)
    with pytest.raises(RequestError, match=r"digits \(1797 rows"):
        submit_deletion(store_url, list(range(1797, 101797)), dataset="digits", emit=False)
    assert DeletionLedger(ObjectStore(store_url)).entries() == []
    assert submit_deletion(store_url, [1796], dataset="digits", emit=False)["new"] is True


def test_a_refused_event_is_logged_as_its_sentence_without_a_traceback(store_url, prefect_api_url, caplog):
    """Prefect's engine logged the refusal with its traceback (in a runner's subprocess log too)."""
    with caplog.at_level("INFO", logger="prefect.flow_runs"):
        state = _run(store_url, {}, "ev-quiet")
    assert state.is_failed()
    ended = [r for r in caplog.records if r.name == "prefect.flow_runs" and "Encountered exception" in r.getMessage()]
    assert ended, [r.getMessage() for r in caplog.records]
    assert all(r.exc_info is None for r in ended)
    assert "refused, nothing changed" in ended[0].getMessage()
    assert "Traceback" not in caplog.text
