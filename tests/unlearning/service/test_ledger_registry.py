"""Ledger, registry and request rules on a local store (fast; no servers)."""

from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
import torch

from actors.chains import ChainWorker
from flows.train import run_spec
from flows.unlearn import submit_deletion
from obliviate.errors import ConfigError
from obliviate.unlearning.service import RequestError, RunSpec, parse_event_payload, parse_ids, work_token
from storage import CorruptObject, ObjectStore
from storage.ledger import CANCELLED, CLAIMED, DONE, FAILED, PENDING, DeletionLedger
from storage.registry import TRAIN_CHAIN, RunRegistry


@pytest.fixture
def small_run(tiny_run):
    return tiny_run(blocks=3, train_size=300, heldout_size=100)


def test_request_ids_are_checked_before_anything_is_written(store_url):
    for bad in ([], "", "1,x", [1, 1], [-3], [1.5], ["7"], [True], None, "3;4"):
        with pytest.raises(RequestError, match="rule"):
            submit_deletion(store_url, bad, dataset="digits", emit=False)
    assert DeletionLedger(ObjectStore(store_url)).request_ids() == []
    assert parse_ids("3, 17,42") == (3, 17, 42)


def test_event_payload_rules():
    assert parse_event_payload({"request_id": "del-1", "store": "x"}) == "del-1"
    for bad, match in (
        ("del-1", "object"),
        ({"ids": [1]}, "request_id"),
        ({"request_id": 7}, "request id"),
        ({"request_id": "../x"}, "request id"),
        (None, "object"),
    ):
        with pytest.raises(RequestError, match=match):
            parse_event_payload(bad)


def test_ledger_append_is_idempotent_and_refuses_reuse(store_url):
    first = submit_deletion(store_url, [5, 3], dataset="digits", request_id="ticket-1", emit=False)
    again = submit_deletion(store_url, "3,5", dataset="digits", request_id="ticket-1", emit=False)
    assert first["new"] and not again["new"] and first["status"] == again["status"] == PENDING
    with pytest.raises(RequestError, match="already holds"):
        submit_deletion(store_url, [9], dataset="digits", request_id="ticket-1", emit=False)
    ledger = DeletionLedger(ObjectStore(store_url))
    assert ledger.request_ids() == ["ticket-1"]
    assert ledger.get("ticket-1").request["ids"] == [3, 5]
    assert [h["status"] for h in ledger.history("ticket-1")] == [PENDING]


def test_only_one_of_many_concurrent_claims_wins(store_url):
    submit_deletion(store_url, [1], dataset="digits", request_id="r-1", emit=False)
    ledger = DeletionLedger(ObjectStore(store_url))
    wins, barrier = [], threading.Barrier(6)

    def claim(n: int) -> None:
        barrier.wait()
        if ledger.transition("r-1", status=CLAIMED, details={"holder": n}, allowed_from=(PENDING,)) is not None:
            wins.append(n)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(wins) == 1
    assert [h["status"] for h in ledger.history("r-1")] == [PENDING, CLAIMED]
    assert ledger.open_entries(stale_after_s=600) == []
    assert [e.request_id for e in ledger.open_entries(stale_after_s=-1)] == ["r-1"]  # a stale claim is reclaimable


@pytest.mark.parametrize("backend", ["store_url", "s3_url"])
def test_passes_read_only_open_requests_and_the_markers_stay_true(backend, request):
    url = request.getfixturevalue(backend)
    for name in ("a", "b", "c", "d"):
        submit_deletion(url, [1], dataset="digits", request_id=name, emit=False)
    store = ObjectStore(url)
    ledger = DeletionLedger(store)
    claim = ledger.claim("a", holder="t", lease_s=60, max_attempts=3)
    assert claim is not None and ledger.settle("a", claim_version=claim.version, status=DONE, details={}) is not None
    ledger.cancel("b", applied_to=[])
    claim = ledger.claim("c", holder="t", lease_s=60, max_attempts=3)
    assert claim is not None
    ledger.fail_attempt(
        "c", claim_version=claim.version, error="boom", max_attempts=1, first_backoff_s=1, max_backoff_s=1
    )
    assert ledger.get("c").status == FAILED and ledger.get("b").status == CANCELLED
    assert ledger.open_request_ids() == ["d"]  # settled, cancelled and failed requests drop out
    assert [e.request_id for e in ledger.due_entries(lease_s=60)] == ["d"]
    ledger.retry("c")  # a failed request put back to pending is open again
    assert ledger.open_request_ids() == ["c", "d"]
    # a crash between a terminal status and its marker's removal leaves a stale marker: skipped, then removed
    store.put_json("ledger/open/a.json", {"at": 0})
    assert [e.request_id for e in ledger.entries(open_only=True)] == ["c", "d"]
    assert not store.exists("ledger/open/a.json")


def test_a_ledger_written_before_open_markers_is_indexed_once(store_url):
    for name in ("old-1", "old-2"):
        submit_deletion(store_url, [2], dataset="digits", request_id=name, emit=False)
    store = ObjectStore(store_url)
    ledger = DeletionLedger(store)
    ledger.cancel("old-1", applied_to=[])
    for key in store.list("ledger/open"):  # as an earlier version wrote it: no markers, no index record
        store.delete(key)
    store.delete("ledger/open-index.json")
    fresh = DeletionLedger(store)
    assert [e.request_id for e in fresh.open_entries(stale_after_s=600)] == ["old-2"]  # nothing pending is lost
    assert store.exists("ledger/open-index.json") and store.list("ledger/open") == ["ledger/open/old-2.json"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/obliviate-pwned",))


def test_checkpoints_load_with_weights_only_and_code_is_refused(store_url, tmp_path, small_run):
    worker = ChainWorker(store_url)
    summary = worker.train(run_spec(run_id="r1", split_seed=0, **small_run))
    registry = RunRegistry(ObjectStore(store_url))
    key = registry.checkpoint_key("r1", TRAIN_CHAIN, 1)
    assert registry.load_checkpoint(key).block_index == 1
    # A checkpoint replaced by a pickle that runs code when unpickled: refused, nothing executed.
    marker = "/tmp/obliviate-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    buffer = io.BytesIO()
    torch.save({"format": "obliviate.checkpoint/1", "tensors": {}, "meta": _Exploit()}, buffer, pickle_protocol=2)
    registry.store.put_bytes(key, buffer.getvalue())
    with pytest.raises(CorruptObject, match="weights_only=True"):
        registry.load_checkpoint(key)
    assert not os.path.exists(marker)
    # The published version's manifest still pins the original bytes: loading it notices the swap.
    with pytest.raises(CorruptObject):
        registry.load_chain(registry.current("r1"))
    assert summary["version"] == 1


def test_train_resumes_from_stored_checkpoints_bit_for_bit(store_url, tmp_path, small_run):
    spec = run_spec(run_id="r1", split_seed=0, **small_run)
    ChainWorker(store_url).train(spec)
    registry = RunRegistry(ObjectStore(store_url))
    reference = registry.load_chain(registry.current("r1"))[0]
    # A second store holding only M_0, M_1 of the same run, as left by a killed worker.
    partial = f"file://{tmp_path}/partial"
    for index in (0, 1):
        for suffix in (".json", ".pt"):
            key = registry.checkpoint_key("r1", TRAIN_CHAIN, index)[: -len(".pt")] + suffix
            ObjectStore(partial).put_bytes(key, registry.store.get_bytes(key))
    ObjectStore(partial).put_json("runs/r1/spec.json", spec)
    summary = ChainWorker(partial).train(spec)
    assert summary["resumed_blocks"] == 1 and summary["trained_blocks"] == 2
    resumed = RunRegistry(ObjectStore(partial))
    chain = resumed.load_chain(resumed.current("r1"))[0]
    for key, value in reference.final.model_state.items():
        assert torch.equal(value, chain.final.model_state[key])
    assert resumed.entry("r1")["block_sample_ids"] == registry.entry("r1")["block_sample_ids"]


def test_registry_records_blocks_and_refuses_a_different_spec_under_the_same_run(store_url, small_run):
    ChainWorker(store_url).train(run_spec(run_id="r1", split_seed=0, **small_run))
    registry = RunRegistry(ObjectStore(store_url))
    entry = registry.entry("r1")
    spec = registry.spec("r1")
    assert entry["current_version"] == 1 and entry["num_blocks"] == 3
    held = sorted(i for block in entry["block_sample_ids"] for i in block)
    assert held == sorted(spec.train_ids)
    assert 0 < entry["metrics"]["heldout_accuracy"] <= 1
    with pytest.raises(ConfigError, match="already exists"):
        registry.put_spec(RunSpec.from_dict(run_spec(run_id="r1", split_seed=1, **small_run)))
    # Once trained too: the same options reuse the model; other options are refused, naming what differs.
    assert ChainWorker(store_url).train(run_spec(run_id="r1", split_seed=0, **small_run))["status"] == "already_trained"
    with pytest.raises(ConfigError, match=r"config\.local_epochs: 1 stored, 2 asked\); a run id names one training"):
        ChainWorker(store_url).train(run_spec(run_id="r1", split_seed=0, **(small_run | {"epochs": 2})))
    assert registry.spec("r1").config.local_epochs == 1 and registry.current("r1").version == 1


def test_unlearning_applies_once_and_rejects_stale_bases(store_url, small_run):
    worker = ChainWorker(store_url)
    spec = run_spec(run_id="r1", split_seed=0, **small_run)
    worker.train(spec)
    ids = spec["train_ids"][:2]
    audit = worker.unlearn("r1", {"req-1": ids})
    assert audit["status"] == "published" and audit["to_version"] == 2
    assert worker.unlearn("r1", {"req-1": ids})["status"] == "already_applied"
    registry = RunRegistry(ObjectStore(store_url))
    # A publisher that read version 1 cannot move the pointer now: the CAS refuses a stale base.
    from storage import PointerConflict

    with pytest.raises(PointerConflict):
        registry.store.swap_pointer(registry.pointer_key("r1"), {"manifest": "x"}, expected_version=1)
    # A second request merged with a repeat of the first: only the new ids are retrained away.
    more = spec["train_ids"][2:4]
    audit = worker.unlearn("r1", {"req-1": ids, "req-2": more})
    assert audit["requests"] == ["req-2"] and audit["deleted_ids"] == sorted(more) and audit["to_version"] == 3
    current = registry.current("r1")
    assert set(ids) | set(more) == set(current.deleted_ids) and current.applied_requests == ("req-1", "req-2")
    assert work_token(base_version=1, excluded_positions=[3, 1], policy="exact") == work_token(
        base_version=1, excluded_positions=[1, 3], policy="exact"
    )
    assert np.isfinite(current.metrics["heldout_accuracy"])


def test_a_second_delivery_of_an_event_keeps_the_record_of_the_one_that_did_the_work(store_url):
    # With two serves, the delivery that found the request done rewrote the record to "duplicate".
    ledger = DeletionLedger(ObjectStore(store_url))
    ledger.record_event("ev-1", {"outcome": "processed", "request_id": "r", "status": "done"})
    ledger.record_event("ev-1", {"outcome": "duplicate", "request_id": "r", "status": "done"})
    assert [(e["event_id"], e["outcome"]) for e in ledger.events()] == [("ev-1", "processed")]
    ledger.record_event("ev-2", {"outcome": "duplicate", "request_id": "r", "status": "done"})
    ledger.record_event("ev-2", {"outcome": "rejected", "reason": "x"})  # other outcomes are recorded as they come
    assert {e["event_id"]: e["outcome"] for e in ledger.events()} == {"ev-1": "processed", "ev-2": "rejected"}
