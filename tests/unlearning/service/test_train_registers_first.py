"""A training registers its run before it publishes version 1, so no served model is unregistered.

It used to publish first: a registration that failed then (read-only or full disk) left version 1
served while every pass rejected the deletion requests for its ids for good ("no registered run was
trained on dataset ..."), and a rerun of ``train`` answered ``already_trained`` without applying them.
The faults here are real failed writes: the object's name is taken by a folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.chains import TRAINED_WITHOUT_IDS, ChainWorker
from flows.settle import run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.errors import StorageError
from storage.ledger import DONE, DeletionLedger
from storage.registry import RunRegistry


def _pass(url: str, worker: ChainWorker) -> dict:
    return run_pass(url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, req) for r, req in per_run.items()})


def test_a_failed_registration_publishes_nothing(tmp_path: Path, tiny_run) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    worker = ChainWorker(url)
    spec = run_spec(run_id="r1", **tiny_run(split_seed=0, blocks=2))
    (tmp_path / "store" / "registry" / "r1.json").mkdir(parents=True)  # registry/r1.json cannot be written

    with pytest.raises(StorageError, match="registry/r1.json"):
        worker.train(spec)
    registry = RunRegistry(store)
    assert registry.current("r1") is None  # nothing served that a deletion request could not reach
    assert registry.run_ids() == []

    (tmp_path / "store" / "registry" / "r1.json").rmdir()
    assert worker.train(spec)["status"] == "trained"  # the rerun resumes the stored checkpoints
    ids = [int(spec["train_ids"][i]) for i in (3, 250)]
    request = submit_deletion(url, ids, dataset="digits", emit=False)["request_id"]
    assert _pass(url, worker)["settled"] == {request: DONE}
    current = registry.current("r1")
    assert current is not None and current.version == 2 and list(current.applied_requests) == [request]


def test_a_registered_run_whose_publish_failed_keeps_the_requests_for_its_ids(tmp_path: Path, tiny_run) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    worker = ChainWorker(url)
    spec = run_spec(run_id="r1", **tiny_run(split_seed=0, blocks=2))
    manifest = tmp_path / "store" / "runs" / "r1" / "manifests" / "v000001-train.json"
    manifest.mkdir(parents=True)  # version 1's manifest cannot be written: registered, not published

    with pytest.raises(StorageError, match="v000001-train.json"):
        worker.train(spec)
    registry = RunRegistry(store)
    assert registry.run_ids() == ["r1"] and registry.current("r1") is None

    # A request for its ids is accepted (the run is registered), not rejected; nothing is served meanwhile.
    ids = [int(spec["train_ids"][i]) for i in (3, 250)]
    request = submit_deletion(url, ids, dataset="digits", emit=False)["request_id"]
    assert _pass(url, worker)["settled"] == {request: DONE}
    ledger = DeletionLedger(store)
    assert ledger.get(request).details["runs"]["r1"]["status"] == "not_trained"

    # The rerun trains without its ids, and the request's audit says so.
    manifest.rmdir()
    summary = worker.train(spec)
    assert summary["status"] == "trained" and summary["left_out_for_requests"] == [request]
    current = registry.current("r1")
    assert current is not None and current.version == 1 and list(current.applied_requests) == [request]
    positions, _ = registry.spec("r1").positions(ids)
    assert sorted(current.deleted_ids) == sorted(ids) and positions.size == 2
    trained = ledger.get(request).details["runs"]["r1"]
    assert trained["status"] == TRAINED_WITHOUT_IDS and trained["version"] == 1


def test_rerunning_a_served_run_with_no_registration_applies_the_requests_it_missed(tmp_path: Path, tiny_run) -> None:
    """A store written by the old order: version 1 served, registry entry missing (its write failed)."""
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    worker = ChainWorker(url)
    spec = run_spec(run_id="r1", **tiny_run(split_seed=0, blocks=2))
    worker.train(spec)
    for name in store._names_under("registry"):
        (tmp_path / "store" / name).unlink()
    registry = RunRegistry(store)
    assert registry.run_ids() == [] and registry.current("r1") is not None
    ids = [int(spec["train_ids"][i]) for i in (3, 250)]
    request = submit_deletion(url, ids, dataset="digits", emit=False)["request_id"]  # accepted, not yet settled

    summary = worker.train(spec)
    assert summary["status"] == "already_trained" and summary["late_requests"] == [request]
    assert summary["version"] == 2 and registry.run_ids() == ["r1"]
    current = registry.current("r1")
    assert current is not None and list(current.applied_requests) == [request]
    assert sorted(current.deleted_ids) == sorted(ids)
    assert _pass(url, worker)["settled"] == {request: DONE}
