"""A training that unlearned requests accepted while it trained copied every other late request
(``merged_with``) and the whole audit (all requests, all deleted ids) into each late request's
training record: the records grew with the square of the late requests. Each keeps its own part
now, with counts; the lists are stored once, in a batch record."""

from __future__ import annotations

import json
import threading

import pytest

from actors.chains import ChainWorker
from flows.settle import run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.ledger import DONE, DeletionLedger


@pytest.mark.slow
def test_late_requests_of_a_training_keep_records_of_bounded_size(s3_url, flaky_s3, tiny_run) -> None:
    """Four requests are filed after the training's last look at the ledger, before it publishes.

    The training reaches moto S3 through a proxy that holds its first request for its version 1's
    manifest; meanwhile the requests are filed straight against the store, as concurrent ``forget``
    commands would, so the training finds them late and unlearns them right after publishing.
    """
    url = s3_url
    with flaky_s3.routed():
        worker = ChainWorker(url)
    spec = run_spec(run_id="after", **tiny_run(split_seed=0, blocks=2))
    late_ids = {n: [int(spec["train_ids"][i]) for i in (20 + n, 310 + n)] for n in range(4)}
    held = flaky_s3.hold("/runs/after/manifests/v000001")
    summary: dict = {}
    training = threading.Thread(target=lambda: summary.update(worker.train(spec)))
    training.start()
    try:
        held.wait(120)
        late = {submit_deletion(url, ids, dataset="digits", emit=False)["request_id"]: ids for ids in late_ids.values()}
    finally:
        held.release()
        training.join(120)
    assert sorted(summary["late_requests"]) == sorted(late)
    assert summary["left_out_for_requests"] == [] and summary["version"] == 2

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
