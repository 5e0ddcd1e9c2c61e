"""One rule says when a request's data left storage (SPEC 5), for the pass and for a later purge alike.

The pass (:func:`flows.settle.run_pass`) and :meth:`DeletionLedger.record_purge` each wrote the rule
"the request's ``purged_at`` is the latest of its runs' once every run that records one has it" in
their own words; now both call :func:`storage.ledger.request_purged_at`. A real file store for the
ledger part.
"""

from __future__ import annotations

from storage import ObjectStore
from storage.ledger import DONE, PENDING, DeletionLedger, request_purged_at


def test_the_latest_run_time_once_every_run_that_records_one_has_it():
    runs = {
        "r1": {"superseded_versions": {"status": "purged"}, "purged_at": 10.0},
        "r2": {"superseded_versions": {"status": "purged"}, "purged_at": 30.0},
        "r3": {"status": "nothing_to_forget"},  # records none: it stores nothing trained on the ids
        "r4": "not an audit",
    }
    assert request_purged_at(runs) == 30.0


def test_none_while_one_run_is_pending_or_kept():
    runs = {"r1": {"purged_at": 10.0}, "r2": {"superseded_versions": {"status": "pending"}, "purged_at": None}}
    assert request_purged_at(runs) is None


def test_none_when_no_run_records_one():
    # nothing says the data left storage (each run had forgotten the ids for an earlier request): never a guess
    assert request_purged_at({"r1": {"status": "nothing_to_forget"}}) is None
    assert request_purged_at({}) is None


def test_record_purge_sets_the_request_time_by_the_same_rule(store_url):
    store = ObjectStore(store_url)
    store.ensure_container()
    ledger = DeletionLedger(store)
    ledger.append(request_id="req-1", ids=[1], dataset="digits", reason=None)
    runs = {
        "r1": {"superseded_versions": {"status": "purged"}, "purged_at": 50.0},
        "r2": {"superseded_versions": {"status": "kept"}, "purged_at": None},
        "r3": {"status": "nothing_to_forget"},
    }
    ledger.transition("req-1", status=DONE, details={"runs": runs, "purged_at": None}, allowed_from=(PENDING,))

    after = ledger.record_purge("req-1", "r2", {"status": "purged", "versions": [1]}, purged_at=20.0)

    assert after is not None and after.details["runs"]["r2"]["purged_at"] == 20.0
    assert after.details["purged_at"] == 50.0 == request_purged_at(after.details["runs"])
