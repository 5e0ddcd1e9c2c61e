"""A request a run applied by training without its ids names that run (and version) in its audit trail."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.cli import main
from flows.settle import AttemptPolicy, run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.ledger import DONE, PENDING, DeletionLedger

TRAINED_WITHOUT_IDS = "trained_without_ids"  # actors.chains.TRAINED_WITHOUT_IDS


def _in_process(worker: ChainWorker):
    def unlearn_runs(per_run):
        return {run_id: worker.unlearn(run_id, requests) for run_id, requests in per_run.items()}

    return unlearn_runs


def _run_and_a_request(tmp_path: Path, tiny_run) -> tuple[str, ChainWorker, dict, str]:
    """A store with run "before" trained and a pending request for two of its training ids."""
    url = f"file://{tmp_path / 'store'}"
    ObjectStore(url).ensure_container()
    worker = ChainWorker(url)
    first = run_spec(run_id="before", **tiny_run(split_seed=0, blocks=2))
    worker.train(first)
    ids = [int(first["train_ids"][i]) for i in (10, 300)]
    return url, worker, first, submit_deletion(url, ids, dataset="digits", emit=False)["request_id"]


def _status_output(url: str, request_id: str, capsys) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["forget", "--store", url, "--status", request_id]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_a_run_trained_after_a_request_was_done_is_named_in_its_audit_trail(tmp_path: Path, tiny_run, capsys) -> None:
    url, worker, _, request_id = _run_and_a_request(tmp_path, tiny_run)
    assert run_pass(url, unlearn_runs=_in_process(worker))["settled"] == {request_id: DONE}

    worker.train(run_spec(run_id="after", **tiny_run(split_seed=0, seed=1, blocks=2)))
    entry = DeletionLedger(ObjectStore(url)).get(request_id)
    assert entry.status == DONE and sorted(entry.details["runs"]) == ["after", "before"]
    trained = entry.details["runs"]["after"]
    assert trained["status"] == TRAINED_WITHOUT_IDS and trained["version"] == 1 and trained["applied_by"] == "training"
    assert entry.details["runs"]["before"]["status"] == "published"  # the pass's own entry is kept
    shown, said = _status_output(url, request_id, capsys)
    assert shown["details"]["runs"]["after"]["version"] == 1
    assert "run after: trained without its ids, version 1" in said
    # A rerun of the training (already trained) adds nothing to the trail.
    worker.train(run_spec(run_id="after", **tiny_run(split_seed=0, seed=1, blocks=2)))
    assert DeletionLedger(ObjectStore(url)).get(request_id).version == entry.version


def test_a_pending_request_a_run_trained_without_names_that_run_once_done(tmp_path: Path, tiny_run, capsys) -> None:
    url, worker, _, request_id = _run_and_a_request(tmp_path, tiny_run)

    worker.train(run_spec(run_id="after", **tiny_run(split_seed=0, seed=1, blocks=2)))
    ledger = DeletionLedger(ObjectStore(url))
    assert ledger.get(request_id).status == PENDING  # untouched: its pass records the runs
    shown, said = _status_output(url, request_id, capsys)
    assert shown["applied_by_training"]["after"]["version"] == 1
    assert "run after: trained without its ids, version 1" in said

    run_pass(url, unlearn_runs=_in_process(worker), attempts=AttemptPolicy(max_attempts=1))
    entry = ledger.get(request_id)
    assert entry.status == DONE
    # The pass found run "after" already applied it; the trail says how: trained without the ids, version 1.
    assert entry.details["runs"]["after"]["status"] == TRAINED_WITHOUT_IDS
    assert entry.details["runs"]["after"]["version"] == 1
    assert entry.details["runs"]["before"]["status"] == "published"


@pytest.mark.slow
def test_a_request_accepted_while_a_run_trained_names_its_version_2(s3_url, flaky_s3, tiny_run) -> None:
    """A second request arrives after the training's last look at the ledger, before it publishes.

    The training reaches moto S3 through a proxy that holds its first request for its version 1's
    manifest (its last block trained, its exclusions read for the last time); meanwhile the request
    is filed straight against the store, as a concurrent ``forget`` would.
    """
    url = s3_url
    worker = ChainWorker(url)
    first = run_spec(run_id="before", **tiny_run(split_seed=0, blocks=2))
    worker.train(first)
    ids = [int(first["train_ids"][i]) for i in (10, 300)]
    request_id = submit_deletion(url, ids, dataset="digits", emit=False)["request_id"]
    assert run_pass(url, unlearn_runs=_in_process(worker))["settled"] == {request_id: DONE}

    late_ids = [int(first["train_ids"][i]) for i in (20, 310)]
    with flaky_s3.routed():
        trainer = ChainWorker(url)
    held = flaky_s3.hold("/runs/after/manifests/v000001")
    trained: dict = {}
    training = threading.Thread(
        target=lambda: trained.update(
            trainer.train(run_spec(run_id="after", **tiny_run(split_seed=0, seed=1, blocks=2)))
        )
    )
    training.start()
    try:
        held.wait(120)
        late_id = submit_deletion(url, late_ids, dataset="digits", emit=False)["request_id"]
    finally:
        held.release()
        training.join(120)
    assert trained["late_requests"] == [late_id] and trained["version"] == 2
    assert trained["left_out_for_requests"] == [request_id]
    ledger = DeletionLedger(ObjectStore(url))
    assert ledger.get(request_id).details["runs"]["after"]["version"] == 1
    assert run_pass(url, unlearn_runs=_in_process(worker))["settled"] == {late_id: DONE}
    late = ledger.get(late_id).details["runs"]["after"]
    assert late["applied_by"] == "training" and late["to_version"] == 2 and late["status"] == "published"
