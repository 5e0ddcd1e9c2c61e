"""A training that unlearned requests accepted while it trained copied every other late request
(``merged_with``) and the whole audit (all requests, all deleted ids) into each late request's
training record: the records grew with the square of the late requests. Each keeps its own part
now, with counts; the lists are stored once, in a batch record."""

from __future__ import annotations

import json
from pathlib import Path

from actors.chains import ChainWorker
from flows.settle import run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.ledger import DONE, DeletionLedger


def test_late_requests_of_a_training_keep_records_of_bounded_size(tmp_path: Path, tiny_run, monkeypatch) -> None:
    url = f"file://{tmp_path / 'store'}"
    ObjectStore(url).ensure_container()
    worker = ChainWorker(url)
    spec = run_spec(run_id="after", **tiny_run(split_seed=0, blocks=2))
    late_ids = {n: [int(spec["train_ids"][i]) for i in (20 + n, 310 + n)] for n in range(4)}
    reads = {"n": 0}
    original = ChainWorker._training_exclusions

    def exclusions_then_requests(self, run, plan):
        found = original(self, run, plan)
        reads["n"] += 1
        if reads["n"] == 2:  # after the last block, before it publishes: these requests are late
            reads["late"] = {
                submit_deletion(url, ids, dataset="digits", emit=False)["request_id"]: ids for ids in late_ids.values()
            }
        return found

    monkeypatch.setattr(ChainWorker, "_training_exclusions", exclusions_then_requests)
    summary = worker.train(spec)
    monkeypatch.undo()
    late = reads["late"]
    assert sorted(summary["late_requests"]) == sorted(late)

    store = ObjectStore(url)
    ledger = DeletionLedger(store)
    batch_ids = set()
    for request_id, ids in late.items():
        record = store.get_json(f"ledger/trained/{request_id}/after.json")
        others = [r for r in late if r != request_id]
        assert "merged_with" not in record and "requests" not in record
        assert not any(other in json.dumps(record) for other in others), record
        assert record["merged_with_count"] == len(others)
        assert set(record["deleted_ids"]) <= set(ids)
        assert record["applied_by"] == "training" and record["to_version"] == 2
        batch_ids.add(record["batch_id"])
    (batch_id,) = batch_ids  # the lists, once
    batch = ledger.batch(batch_id)
    assert batch["requests"] == sorted(late)
    assert set(batch["runs"]["after"]["deleted_ids"]) == {i for ids in late.values() for i in ids}

    assert run_pass(
        url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, requests) for r, requests in per_run.items()}
    )["settled"] == dict.fromkeys(late, DONE)
    for request_id in late:
        entry = ledger.get(request_id).details["runs"]["after"]
        assert "merged_with" not in entry and entry["to_version"] == 2 and entry["batch_id"] == batch_id
