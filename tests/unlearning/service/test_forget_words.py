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


def test_a_batched_request_whose_ids_were_forgotten_before_is_not_said_to_be_rolled_back(store_url, tiny_run, capsys):
    """`forget --status again` said "every affected run serves a rolled-back version that never saw the ids, until
    the batch's exact retrain lands" though its forgotten record held no run: nothing was rolled back nor due."""
    from flows.batching import batch_gate, save_policy
    from flows.cli import main
    from obliviate.unlearning.batching import BatchPolicy
    from storage.ledger import DeletionLedger
    from storage.serving import forgotten_key, save_rollback

    store = ObjectStore(store_url)
    store.ensure_container()
    worker = ChainWorker(store_url)
    worker.train(run_spec(run_id="a", split_seed=0, **tiny_run(blocks=2)))
    ids = [int(i) for i in RunRegistry(store).spec("a").train_ids[:1]]
    assert worker.unlearn("a", {"first": ids})["status"] != "nothing_to_forget"  # ids gone from version 2
    save_policy(store, BatchPolicy(window_s=3600.0))  # serve --batch-window 1h --rollback
    save_rollback(store, enabled=True)
    argv = ["forget", "--store", store_url, "--ids", str(ids[0]), "--data", "digits", "--no-event"]
    assert main([*argv, "--request-id", "again"]) == 0
    gate = batch_gate(store, DeletionLedger(store).due_entries(lease_s=60.0))  # the pass's gate, rollback on
    assert not gate["flush"] and gate["requests"] == ["again"]
    assert store.get_json(forgotten_key("again"))["runs"] == {}  # recorded forgotten, no run rolled back
    capsys.readouterr()

    assert main(["forget", "--store", store_url, "--status", "again"]) == 0
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said.startswith("request again: pending, batched until 20"), said
    assert "rolled-back version" not in said and "exact retrain lands" not in said, said
    assert "no run's served version holds its ids" in said and "its batch's flush settles it" in said, said
