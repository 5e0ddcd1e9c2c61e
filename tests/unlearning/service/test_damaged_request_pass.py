"""One deletion request whose ledger record is damaged never stops a pass (fast: a local store, a tiny run).

A pending request whose ``ledger/requests/<id>.json`` failed its checksum made every pass (reconcile,
serve's watcher, an event's run) fail with the checksum error before it claimed anything: no other
request was processed. Now the pass settles the others as usual and records the damaged one
``failed`` (its status pointer is a separate object) with how to mend it; nothing is applied for
ids it cannot read. Filed again under its id it is pending at once and the next pass applies it;
a request whose status is damaged too is named in the pass's log and result and left as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.settle import run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.errors import CorruptObject
from storage.ledger import DONE, FAILED, PENDING, REJECTED, DeletionLedger
from storage.registry import RunRegistry

GARBAGE = b"\0garbage{{{"


def _root(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _pass(url: str, worker: ChainWorker | None = None) -> dict:
    def unlearn_runs(per_run: dict) -> dict:
        assert worker is not None, f"no run to unlearn, yet the pass fanned out {per_run}"
        return {run_id: worker.unlearn(run_id, requests) for run_id, requests in per_run.items()}

    return run_pass(url, unlearn_runs=unlearn_runs)


def test_a_damaged_request_is_failed_with_its_mend_and_the_others_are_applied(tmp_path, tiny_run, caplog):
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    worker = ChainWorker(url)
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=2, train_size=200, heldout_size=100))
    worker.train(spec)
    healthy, damaged = [int(spec["train_ids"][3])], [int(spec["train_ids"][150])]
    submit_deletion(url, healthy, dataset="digits", request_id="req-1", emit=False)
    submit_deletion(url, damaged, dataset="digits", request_id="req-2", emit=False)
    record = _root(url) / "ledger/requests/req-2.json"
    record.write_bytes(GARBAGE)

    with caplog.at_level(logging.INFO):
        result = _pass(url, worker)
    assert result["settled"] == {"req-1": DONE, "req-2": FAILED}, result
    assert result["unreadable"]["req-2"]["status"] == FAILED
    said = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "req-2" in said and "damaged" in said
    ledger = DeletionLedger(store)
    assert ledger.get("req-1").status == DONE
    last = ledger.history("req-2")[-1]
    assert last["status"] == FAILED and last["details"]["damaged_record"]
    reason = last["details"]["reason"]
    assert "record of deletion request req-2 is damaged" in reason
    assert "forget --ids IDS --data DATASET --request-id req-2 --no-event" in reason
    current = RunRegistry(store).current("r1")
    assert current is not None and list(current.applied_requests) == ["req-1"]  # nothing applied for req-2

    again = _pass(url, worker)  # settled: not taken, nor failed again
    assert again["claimed"] == [] and again["settled"] == {} and again["unreadable"] == {}
    assert len(ledger.history("req-2")) == 2
    with pytest.raises(CorruptObject, match="--request-id req-2"):
        ledger.retry("req-2")  # still damaged: retrying says how to mend it

    record.unlink()  # the mend: remove the record and file it again under its id
    Path(f"{record}.sha256").unlink()
    refiled = submit_deletion(url, damaged, dataset="digits", request_id="req-2", emit=False)
    assert refiled["status"] == PENDING
    assert _pass(url, worker)["settled"] == {"req-2": DONE}
    assert [h["status"] for h in ledger.history("req-2")] == [PENDING, FAILED, PENDING, "claimed", DONE]
    current = RunRegistry(store).current("r1")
    assert current is not None and sorted(current.applied_requests) == ["req-1", "req-2"]


def test_a_request_restored_from_a_backup_is_retried_and_a_damaged_status_is_named(store_url, caplog):
    store = ObjectStore(store_url)
    store.ensure_container()
    ledger = DeletionLedger(store)
    for request_id, ids in (("req-1", [1]), ("req-2", [2]), ("req-3", [3])):
        ledger.append(request_id=request_id, ids=ids, dataset="digits", reason=None)
    root = _root(store_url)
    backup = (root / "ledger/requests/req-3.json").read_bytes()
    (root / "ledger/requests/req-2.json").write_bytes(GARBAGE)
    (root / "ledger/status/req-2/v000000001.json").write_bytes(GARBAGE)  # its status is damaged too
    (root / "ledger/requests/req-3.json").write_bytes(GARBAGE)

    with caplog.at_level(logging.INFO):
        result = _pass(store_url)  # no run registered: the healthy one is rejected, as before
    assert result["settled"] == {"req-1": REJECTED, "req-3": FAILED}, result
    assert result["unreadable"]["req-2"]["status"] == "unreadable"
    assert "current status of deletion request req-2 is damaged" in result["unreadable"]["req-2"]["reason"]
    said = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "request req-2 cannot be read and is left as it is" in said

    (root / "ledger/requests/req-3.json").write_bytes(backup)  # restored from a backup
    assert ledger.retry("req-3").status == PENDING
    assert ledger.get("req-3").request["ids"] == [3]
