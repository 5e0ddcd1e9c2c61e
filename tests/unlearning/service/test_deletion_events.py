"""End to end: Prefect server + moto S3 + local Ray; deletions arrive as events at `obliviate serve`."""

from __future__ import annotations

import logging
import time

import pytest

from actors.chains import ChainWorker
from flows.train import run_spec
from flows.unlearn import emit_deletion_event, submit_deletion, wait_for_request
from obliviate.unlearning.service import RequestError
from storage import ObjectStore
from storage.ledger import DeletionLedger
from storage.registry import RunRegistry

pytestmark = pytest.mark.slow


def train(store_url: str, run_id: str, *, options: dict, split_seed: int, seed: int = 0) -> dict:
    """Train a tiny run with the worker the train flow uses (in-process: the flow is tested elsewhere)."""
    return ChainWorker(store_url).train(run_spec(run_id=run_id, **options | {"split_seed": split_seed, "seed": seed}))


def _wait_events(ledger: DeletionLedger, count: int, timeout: float = 90.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = ledger.events()
        if len(events) >= count and all(e["outcome"] != "processing" for e in events):  # each one settled
            return events
        time.sleep(0.5)
    raise AssertionError(f"only {len(ledger.events())} of {count} events recorded after {timeout} s")


def test_deletion_event_unlearns_every_affected_run_exactly_once(
    s3_url, prefect_api_url, ray_address, serve, tiny_run, caplog
):
    options = tiny_run(epochs=2, train_size=600)
    store = ObjectStore(s3_url)
    registry, ledger = RunRegistry(store), DeletionLedger(store)
    a = train(s3_url, "run-a", options=options, split_seed=0)
    b = train(s3_url, "run-b", options=options, split_seed=1)
    c = train(s3_url, "run-c", options=options, split_seed=2, seed=3)
    assert {a["version"], b["version"], c["version"]} == {1}
    specs = {r: registry.spec(r) for r in ("run-a", "run-b", "run-c")}
    # Ids in run-a and run-b's training sets but held out of run-c: exactly two runs are affected.
    shared = sorted((set(specs["run-a"].train_ids) & set(specs["run-b"].train_ids)) & set(specs["run-c"].heldout_ids))
    forget = shared[:3]
    assert len(forget) == 3

    serve(s3_url, "--verify")
    submitted = submit_deletion(s3_url, forget, dataset="digits", reason="test: GDPR art. 17")
    assert submitted["event_id"] is not None, submitted
    entry = wait_for_request(s3_url, submitted["request_id"], timeout_s=150)
    assert entry["status"] == "done", entry
    runs = entry["details"]["runs"]
    assert sorted(runs) == ["run-a", "run-b"]
    for run_id in ("run-a", "run-b"):
        audit = runs[run_id]
        assert audit["status"] == "published" and audit["from_version"] == 1 and audit["to_version"] == 2
        assert audit["deleted_ids"] == forget
        assert audit["blocks_retrained"][-1] == 4 and audit["blocks_retrained"][0] == audit["first_affected_block"]
        assert audit["verification"]["bit_identical_to_naive"] is True
        assert audit["verification"]["consistency_with_naive"] == 1.0
        current = registry.current(run_id)
        assert current.version == 2 and set(forget) <= set(current.deleted_ids)
        chain, _ = registry.load_chain(current)
        positions, _ = specs[run_id].positions(forget)
        assert set(positions.tolist()) <= chain.deleted_ids
    assert registry.current("run-c").version == 1  # never trained on the ids: untouched

    # The same event again (same request id): recorded as a duplicate, no new version.
    with caplog.at_level(logging.WARNING):
        emit_deletion_event(store.url, {"request_id": submitted["request_id"]}, api_url=prefect_api_url)
    # draining the sender logged "Still processing items: 1 items remaining..." on every forget
    assert not [r for r in caplog.records if r.name == "EventsWorker"], caplog.records
    # Malformed payloads: rejected in the ledger's event log, nothing changed.
    emit_deletion_event(store.url, {"ids": [1, 2, 3]}, api_url=prefect_api_url)
    emit_deletion_event(store.url, {"request_id": "never-submitted"}, api_url=prefect_api_url)
    events = _wait_events(ledger, 4)
    outcomes = sorted(e["outcome"] for e in events)
    # The repeat is a duplicate; so is the first event when serve's watcher got to the request before it.
    assert outcomes.count("rejected") == 2 and outcomes.count("duplicate") >= 1, events
    assert outcomes.count("processed") + outcomes.count("duplicate") == 2, events
    reasons = " ".join(e.get("reason", "") for e in events)
    assert "request_id" in reasons and "not there" in reasons
    assert [s["status"] for s in ledger.history(submitted["request_id"])] == ["pending", "claimed", "done"]

    # Out of range: refused up front (as `forget` refuses them). Held out of every run: a row all the same,
    # so the request is done with nothing to forget now (no run retrained) and the id recorded for later trainings.
    held_out_everywhere = sorted(set.intersection(*(set(s.heldout_ids) for s in specs.values())))
    with pytest.raises(RequestError, match=r"digits \(1797 rows: ids 0..1796\); got \[99999\]"):
        submit_deletion(s3_url, [held_out_everywhere[0], 99999], dataset="digits")
    held_out = submit_deletion(s3_url, held_out_everywhere[:1], dataset="digits")
    accepted = wait_for_request(s3_url, held_out["request_id"], timeout_s=90)
    assert accepted["status"] == "done" and accepted["details"]["not_trained_on"] == held_out_everywhere[:1]
    assert accepted["details"]["runs"] == {}
    assert {r: registry.current(r).version for r in specs} == {"run-a": 2, "run-b": 2, "run-c": 1}

    # Two requests back to back for the same run: both applied, in order, none lost or stale.
    only_a = sorted(set(specs["run-a"].train_ids) - set(specs["run-b"].train_ids) - set(specs["run-c"].train_ids))
    first = submit_deletion(s3_url, only_a[:2], dataset="digits")
    second = submit_deletion(s3_url, only_a[2:4], dataset="digits")
    for request in (first, second):
        assert wait_for_request(s3_url, request["request_id"], timeout_s=150)["status"] == "done"
    final = registry.current("run-a")
    assert set(only_a[:4]) | set(forget) <= set(final.deleted_ids)
    assert {first["request_id"], second["request_id"]} <= set(final.applied_requests)
    assert final.version in (3, 4)  # merged into one unlearning, or applied one after the other
    assert registry.current("run-b").version == 2
