"""Chaos suite: faults injected into the deletion service running on real servers (issue 12).

Prefect server, local Ray and the moto S3 server are real (``conftest.py``). Each case asserts:
no request lost, none applied twice, the current pointer always names a complete, checksummed
version (``store check`` finds no damage), every final model bit-identical to a retrain without
the deleted ids, and a bounded recovery time. The Ray worker killed mid-retrain and the S3
outage during publish are in ``test_resilience.py``; these add the rest.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from actors.chains import ChainWorker
from flows.reconcile import reconcile_flow
from flows.repair import check_and_repair
from flows.train import run_spec
from flows.unlearn import emit_deletion_event, served_endpoint, submit_deletion, wait_outcome
from obliviate.data import load_dataset
from obliviate.unlearning.service import RunSpec, block_data
from obliviate.unlearning.trainer import train_chain
from storage import ObjectStore
from storage.check import check_store
from storage.ledger import CLAIMED, DONE, FAILED, REJECTED, DeletionLedger
from storage.registry import RunRegistry

pytestmark = pytest.mark.slow


@pytest.fixture
def small_run(tiny_run):
    """The chaos tests' run: 4 blocks of 2 epochs at batch 16 (a retrain long enough to interrupt)."""
    return tiny_run(epochs=2, batch_size=16, learning_rate=0.005, heldout_size=150)


def _naive_equal(registry: RunRegistry, run_id: str) -> bool:
    """The run's current model equals training from scratch without every id it deleted, bit for bit."""
    spec: RunSpec = registry.spec(run_id)
    current = registry.current(run_id)
    chain = registry.load_chain(current)[0]
    positions = set(spec.positions(current.deleted_ids)[0].tolist())
    data = block_data(spec, dataset=load_dataset(spec.dataset))
    naive = train_chain(config=spec.config, data=data, excluded_ids=frozenset(positions)).final.model_state
    return all(torch.equal(chain.final.model_state[k], v) for k, v in naive.items())


def _applied_once(registry: RunRegistry, run_id: str) -> None:
    applied = registry.current(run_id).applied_requests
    assert len(applied) == len(set(applied)), applied
    purged = registry.pruned_versions(run_id)  # superseded by a later deletion (SPEC 5): their pointer versions stay
    for version in registry.history(run_id)[1:]:
        pointer = registry.store.read_pointer_version(registry.pointer_key(run_id), version)
        assert pointer.target["manifest"]  # every version names a manifest ...
        if version not in purged:
            registry.store.read_manifest(pointer.target["manifest"])  # ... that is complete and checksummed


def _wait(predicate, timeout: float, what: str) -> float:
    began = time.monotonic()
    while not predicate():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - began


def _hand_written(store: ObjectStore, request_id: str, ids: list) -> None:
    """A ledger entry written around the rules (by hand, or by an older version)."""
    store.put_json(
        f"ledger/requests/{request_id}.json",
        {"request_id": request_id, "ids": ids, "dataset": "digits", "reason": "chaos", "requested_at": time.time()},
    )


def test_poison_next_to_good_requests_then_serve_killed_and_restarted(
    s3_url, prefect_api_url, ray_address, serve, small_run
):
    store = ObjectStore(s3_url)
    registry, ledger = RunRegistry(store), DeletionLedger(store)
    # Slower blocks (about a second each) so that serve can be killed while it retrains.
    slow = {**small_run, "epochs": 6, "batch_size": 8, "train_size": 600}
    ChainWorker(s3_url).train(run_spec(run_id="run-a", split_seed=0, **slow))
    specs = {"run-a": registry.spec("run-a")}
    train_ids = list(specs["run-a"].train_ids)
    blocks = registry.entry("run-a")["block_sample_ids"]

    process = serve(s3_url, "--lease", "4")
    # Poison next to good requests: one beyond int64, one not even a number, arriving between two good ones.
    good_1 = submit_deletion(s3_url, blocks[3][:2], dataset="digits")["request_id"]
    _hand_written(store, "poison-big", [2**64])
    _hand_written(store, "poison-text", ["x1"])
    for poison in ("poison-big", "poison-text"):
        emit_deletion_event(store.url, {"request_id": poison}, api_url=prefect_api_url)
    good_2 = submit_deletion(s3_url, blocks[3][2:4], dataset="digits")["request_id"]
    began = time.monotonic()
    for request_id, expected in ((good_1, DONE), (good_2, DONE), ("poison-big", REJECTED), ("poison-text", REJECTED)):
        entry, settled = wait_outcome(s3_url, request_id, timeout_s=150)
        assert settled and entry["status"] == expected, entry
    assert time.monotonic() - began < 150

    # kill -9 of serve while it applies a request (ids of block 1: every block is retrained).
    victim = submit_deletion(s3_url, blocks[0][:2], dataset="digits")["request_id"]
    _wait(lambda: ledger.get(victim).status in (CLAIMED, DONE), 90, "the request to be claimed")
    os.kill(process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # The watchdog withdraws the announcement: forget no longer reports success to a dead serve.
    _wait(lambda: served_endpoint(store)[0] is None, 30, "the announcement to be withdrawn")
    serve(s3_url, "--lease", "4")
    entry, settled = wait_outcome(s3_url, victim, timeout_s=150)
    recovery = time.monotonic() - killed_at
    assert settled and entry["status"] == DONE, entry
    assert recovery < 180, recovery
    # Nothing lost, nothing applied twice, a complete checksummed version current, exact models.
    assert all(ledger.get(r).status in (DONE, REJECTED) for r in ledger.request_ids())
    current = registry.current("run-a")
    assert {good_1, good_2, victim} <= set(current.applied_requests)
    _applied_once(registry, "run-a")
    assert set(blocks[3][:4]) | set(blocks[0][:2]) <= set(current.deleted_ids)
    assert check_store(store, min_age_s=3600).healthy
    assert _naive_equal(registry, "run-a")
    assert set(train_ids) >= set(current.deleted_ids)


def test_flipped_byte_fails_terminally_then_repair_and_retry_complete_it(
    tmp_path, prefect_api_url, ray_address, small_run
):
    url = f"file://{tmp_path}/store"
    store = ObjectStore(url)
    registry, ledger = RunRegistry(store), DeletionLedger(store)
    for run_id, split_seed in (("run-a", 0), ("run-b", 1)):
        ChainWorker(url).train(run_spec(run_id=run_id, split_seed=split_seed, **small_run))
    spec_a, spec_b = registry.spec("run-a"), registry.spec("run-b")
    # Ids both runs trained on, in run-a's last block: run-a retrains from its M_3 (damaged below).
    last_a = registry.entry("run-a")["block_sample_ids"][3]
    shared = sorted(set(last_a) & set(spec_b.train_ids))[:2]
    key = registry.load_chain(registry.current("run-a"))[1].members["3"].key
    path = tmp_path / "store" / key
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 3] ^= 0x40
    path.write_bytes(bytes(damaged))

    request = submit_deletion(url, shared, dataset="digits", emit=False)["request_id"]
    result = reconcile_flow(store=url, workers=1, max_attempts=2)
    entry = ledger.get(request)
    assert result["settled"][request] == FAILED and entry.status == FAILED, result["settled"]
    assert "sha256" in entry.details["last_error"] and len(entry.details["errors"]) == 2
    assert registry.current("run-a").version == 1  # the damaged run kept its old version

    report = check_and_repair(url, repair=True, min_orphan_age_s=0)
    assert [r["key"] for r in report.repaired] == [key] and report.healthy
    ledger.retry(request)
    assert reconcile_flow(store=url, workers=1)["settled"] == {request: DONE}
    audits = ledger.get(request).details["runs"]
    assert audits["run-a"]["status"] == "published" and audits["run-b"]["status"] == "already_applied"
    for run_id in ("run-a", "run-b"):
        assert registry.current(run_id).version == 2 and set(shared) <= set(registry.current(run_id).deleted_ids)
        _applied_once(registry, run_id)
        assert _naive_equal(registry, run_id)
    assert spec_a.run_id == "run-a"


def test_two_racing_requests_on_one_run_leave_one_exact_model_and_collectable_garbage(tmp_path, small_run):
    url = f"file://{tmp_path}/store"
    store = ObjectStore(url)
    registry = RunRegistry(store)
    ChainWorker(url).train(run_spec(run_id="run-a", split_seed=0, **small_run))
    blocks = registry.entry("run-a")["block_sample_ids"]
    results: dict[str, dict] = {}
    barrier = threading.Barrier(2)

    def apply(request_id: str, ids: list[int]) -> None:
        worker = ChainWorker(url)  # two independent workers (two passes), both starting from version 1
        barrier.wait()
        results[request_id] = worker.unlearn("run-a", {request_id: ids})

    threads = [
        threading.Thread(target=apply, args=("race-1", blocks[2][:2])),
        threading.Thread(target=apply, args=("race-2", blocks[3][:2])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert {r["status"] for r in results.values()} == {"published"}
    assert sorted(r["to_version"] for r in results.values()) == [2, 3]
    losers = [r for r in results.values() if r["lost_races"]]
    assert len(losers) == 1 and losers[0]["lost_races"][0]["base_version"] == 1  # the audit records the lost race
    current = registry.current("run-a")
    assert set(current.applied_requests) == {"race-1", "race-2"} and current.version == 3
    _applied_once(registry, "run-a")
    assert _naive_equal(registry, "run-a")
    # The loser's chain is garbage; nothing is open, so store check collects it and the store stays healthy.
    report = check_and_repair(url, repair=True, min_orphan_age_s=0)
    assert report.collected and all("/chains/u000001-" in k or "/manifests/" in k for k in report.collected)
    assert check_store(store, min_age_s=0).orphans == [] and report.healthy
    assert registry.load_chain(registry.current("run-a"))[0].final.block_index == 4
