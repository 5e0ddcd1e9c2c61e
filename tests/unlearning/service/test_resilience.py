"""Failures while unlearning: a worker killed mid-retrain, S3 unreachable during publish."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from actors.chains import ChainWorker
from flows.reconcile import reconcile_flow
from flows.train import pool_actor_name, run_spec, train_flow
from flows.unlearn import submit_deletion
from obliviate.data import load_dataset
from obliviate.unlearning.service import RunSpec, block_data
from obliviate.unlearning.trainer import train_chain
from storage import ObjectStore
from storage.check import check_store
from storage.ledger import DeletionLedger
from storage.registry import TRAIN_CHAIN, RunRegistry

pytestmark = pytest.mark.slow

# Small batches and several epochs make each block take about a second: long enough to act mid-chain.
SLOW_BLOCKS = {
    "data": "digits",
    "model": "lenet5",
    "blocks": 5,
    "epochs": 6,
    "batch_size": 8,
    "learning_rate": 0.003,
    "schedule": "constant",
    "seed": 0,
    "train_size": 800,
    "heldout_size": 200,
    "split_seed": 0,
}


def _retrained_keys(store: ObjectStore, run_id: str) -> list[str]:
    return [k for k in store.list(f"runs/{run_id}/chains") if f"/chains/{TRAIN_CHAIN}/" not in k and k.endswith(".pt")]


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _kill_actor(prefix: str) -> None:
    import ray

    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert len(named) == 1, named
    ray.kill(ray.get_actor(named[0]["name"], namespace=named[0]["namespace"]), no_restart=False)


def _naive_final_state(spec: RunSpec, excluded_positions: set[int]):
    data = block_data(spec, dataset=load_dataset(spec.dataset))
    return train_chain(config=spec.config, data=data, excluded_ids=frozenset(excluded_positions)).final.model_state


def test_killed_training_worker_resumes_after_the_last_checkpoint(tmp_path, prefect_api_url, ray_address):
    url = f"file://{tmp_path}/store"
    store = ObjectStore(url)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train_flow(store=url, run_id="r-kill", **SLOW_BLOCKS)))
    thread.start()
    _wait(lambda: store.exists(f"runs/r-kill/chains/{TRAIN_CHAIN}/ckpt-0002.pt"), 180, "checkpoint 2")
    _kill_actor("train/r-kill/")
    thread.join(timeout=300)
    assert result["status"] == "trained" and result["version"] == 1
    assert result["resumed_blocks"] >= 2 and result["trained_blocks"] <= 3, result
    registry = RunRegistry(store)
    chain = registry.load_chain(registry.current("r-kill"))[0]
    naive = _naive_final_state(registry.spec("r-kill"), set())
    assert all(torch.equal(chain.final.model_state[k], v) for k, v in naive.items())


def test_the_training_progress_bar_rides_out_a_store_it_cannot_reach(s3_url, flaky_s3):
    # The train flow's progress bar lists checkpoints itself; a refused connection there ended the
    # training (its workers, still retrying, were killed). Here the bar's store is unreachable for
    # the whole wait, and a stand-in for Ray's ActorPool hands over the worker's result.
    import logging

    from flows.train import _results_with_progress

    class OneResultAfterAWait:
        def __init__(self) -> None:
            self.waits = 0

        def has_next(self) -> bool:
            return self.waits < 2

        def get_next(self, timeout: float) -> dict:
            self.waits += 1
            if self.waits == 1:
                raise TimeoutError  # the worker is still training: the bar polls the store
            return {"run_id": "bar", "status": "trained"}

    previous = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = flaky_s3.endpoint
    try:
        store = ObjectStore(s3_url)  # reads its endpoint here: the proxy
    finally:
        os.environ["AWS_ENDPOINT_URL"] = previous
    flaky_s3.down()
    try:
        specs = [run_spec(run_id="bar", **SLOW_BLOCKS)]
        results = _results_with_progress(OneResultAfterAWait(), store, specs, logger=logging.getLogger("bar"))
    finally:
        flaky_s3.up()
    assert flaky_s3.refused > 0  # the bar did meet the outage
    assert results == [{"run_id": "bar", "status": "trained"}]


def test_killed_unlearning_worker_resumes_and_completes(tmp_path, prefect_api_url, ray_address):
    url = f"file://{tmp_path}/store"
    store = ObjectStore(url)
    spec = run_spec(run_id="r1", **SLOW_BLOCKS)
    ChainWorker(url).train(spec)
    registry = RunRegistry(store)
    forget = registry.entry("r1")["block_sample_ids"][0][:2]  # block 1: every block is retrained
    request = submit_deletion(url, forget, dataset="digits", emit=False)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(reconcile_flow(store=url, workers=1)))
    thread.start()
    _wait(lambda: len(_retrained_keys(store, "r1")) >= 2, 180, "two retrained checkpoints")
    _kill_actor(pool_actor_name(url, 0))
    thread.join(timeout=300)
    assert result["settled"] == {request["request_id"]: "done"}
    entry = DeletionLedger(store).get(request["request_id"])
    audit = entry.details["runs"]["r1"]
    assert audit["status"] == "published" and audit["to_version"] == 2
    assert audit["resumed_checkpoints"] >= 1 and audit["blocks_retrained"] == [1, 2, 3, 4, 5]
    # Resumed or not, the result is exact: bit-identical to retraining from scratch without the ids.
    spec_obj = registry.spec("r1")
    chain = registry.load_chain(registry.current("r1"))[0]
    naive = _naive_final_state(spec_obj, set(spec_obj.positions(forget)[0].tolist()))
    assert all(torch.equal(chain.final.model_state[k], v) for k, v in naive.items())
    assert check_store(store, min_age_s=3600).healthy  # the current pointer names a complete, checksummed version


def test_s3_outage_during_publish_is_retried_and_old_version_stays_current(s3_url, flaky_s3):
    spec = run_spec(run_id="r1", **SLOW_BLOCKS)
    ChainWorker(s3_url).train(spec)
    direct = RunRegistry(ObjectStore(s3_url))  # talks to moto directly, never through the proxy
    forget = direct.entry("r1")["block_sample_ids"][0][:2]
    previous = os.environ["AWS_ENDPOINT_URL"]
    os.environ["AWS_ENDPOINT_URL"] = flaky_s3.endpoint  # the worker's store reads its endpoint once, here
    try:
        worker = ChainWorker(s3_url, retry_deadline_s=120)
    finally:
        os.environ["AWS_ENDPOINT_URL"] = previous
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(worker.unlearn("r1", {"req-1": forget})))
    thread.start()
    _wait(lambda: len(_retrained_keys(direct.store, "r1")) >= 1, 120, "the first retrained checkpoint")
    flaky_s3.down()
    time.sleep(8)
    assert thread.is_alive(), result  # still retrying, not failed
    assert direct.current("r1").version == 1 and direct.current("r1").deleted_ids == ()
    flaky_s3.up()
    thread.join(timeout=180)
    assert result["status"] == "published" and result["to_version"] == 2, result
    # The outage reached the worker (connections refused) and was absorbed by retries: botocore and
    # s3fs retry short outages themselves, storage.retry takes over beyond theirs (storage_retries).
    assert flaky_s3.refused > 0
    assert direct.current("r1").version == 2 and set(forget) <= set(direct.current("r1").deleted_ids)
    assert check_store(direct.store, min_age_s=3600).healthy  # nothing half-published by the outage
