"""forget's words for a batch that retrained nothing, and its counts."""

from __future__ import annotations

from actors.chains import ChainWorker
from flows.cli.forget import _run_outcome, describe
from flows.train import run_spec
from storage import ObjectStore
from storage.registry import RunRegistry


def test_a_batch_of_ids_forgotten_before_is_not_said_to_be_retrained(store_url, tiny_run):
    """`forget --status` said "nothing_to_forget version 3 -> 3, one retrain for the 2 requests of its batch" and
    "done (its batch was retrained when forget --now asked)", though no run was retrained."""
    ObjectStore(store_url).ensure_container()
    worker = ChainWorker(store_url)
    worker.train(run_spec(run_id="a", split_seed=0, **tiny_run(blocks=2)))
    ids = [int(i) for i in RunRegistry(ObjectStore(store_url)).spec("a").train_ids[:2]]
    assert worker.unlearn("a", {"first": ids})["status"] != "nothing_to_forget"
    audit = worker.unlearn("a", {"again-1": ids, "again-2": ids[:1]})  # a batch of two, every id forgotten already
    assert audit["status"] == "nothing_to_forget" and audit["version"] == 2
    said = _run_outcome("a", audit)
    assert said == (
        "run a: nothing left to forget (every id it trained on was already forgotten): no retrain, version stays 2"
    )
    entry = {"request_id": "again-1", "status": "done", "details": {"batch": "now", "runs": {"a": audit}}}
    line = describe(entry)
    assert line == (
        "request again-1: done (its batch was flushed when `forget --now` asked; every id in it was already "
        "forgotten, so no run was retrained)"
    )
    # a batch that was retrained keeps its words
    retrained = {**entry, "details": {"batch": "now", "runs": {"a": {"status": "published"}}}}
    assert describe(retrained) == "request again-1: done (its batch was retrained when `forget --now` asked)"


def test_one_id_is_not_counted_as_ids():
    said = _run_outcome("a", {"status": "published", "batch_requests": 2, "batch_deleted_ids": 1})
    assert "one retrain for the 2 requests of its batch, 1 id" in said and "1 ids" not in said
