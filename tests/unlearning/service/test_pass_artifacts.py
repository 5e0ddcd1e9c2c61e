"""The dashboard artifacts of a pass cost little and follow the pass, not its requests (flows/artifacts.py).

A probe saw a serve pass blocked 79 s after its ledger settled, publishing about 2 artifacts per
request and reading each request's entry and whole status history again. The ledger here is a
real one on a real file store whose reads are counted; only Prefect's artifact calls are recorded
instead of sent to a server.
"""

from __future__ import annotations

import time
from collections import Counter

import prefect.artifacts
import pytest

from flows.artifacts import PER_REQUEST_ARTIFACTS_UP_TO, publish_request_artifacts
from storage.ledger import CLAIMED, DONE, REJECTED, DeletionLedger
from storage.objects import ObjectStore


class CountingStore(ObjectStore):
    """A real file store that counts its reads by key."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.reads: Counter[str] = Counter()

    def get_json(self, key):  # type: ignore[no-untyped-def]
        self.reads[key] += 1
        return super().get_json(key)

    def read_pointer(self, key):  # type: ignore[no-untyped-def]
        self.reads[key] += 1
        return super().read_pointer(key)

    def read_pointer_version(self, key, version):  # type: ignore[no-untyped-def]
        self.reads[f"{key}@{version}"] += 1
        return super().read_pointer_version(key, version)


@pytest.fixture
def published(monkeypatch):
    made: list[tuple[str, str, object]] = []
    monkeypatch.setattr(
        prefect.artifacts, "create_table_artifact", lambda key, table, description: made.append(("table", key, table))
    )
    monkeypatch.setattr(
        prefect.artifacts, "create_markdown_artifact", lambda key, markdown: made.append(("markdown", key, markdown))
    )
    return made


def settled_ledger(tmp_path, count: int) -> tuple[CountingStore, DeletionLedger, list[str]]:
    store = CountingStore(f"file://{tmp_path}/store")
    ledger = DeletionLedger(store)
    ids = []
    for i in range(count):
        request_id = f"req-{i:03d}"
        ledger.append(request_id=request_id, ids=[i], dataset="digits", reason="asked")
        ledger.transition(request_id, status=CLAIMED, details={"holder": "t"}, allowed_from=("pending",))
        if i % 10 == 9:
            details = {"reason": f"unknown ids [{i}]: no registered run trained on them"}
            ledger.transition(request_id, status=REJECTED, details=details, allowed_from=(CLAIMED,))
        else:
            audit = {"status": "published", "policy": "exact", "from_version": 1, "to_version": 2, "deleted_ids": [i]}
            details = {"runs": {"run-a": audit}, "finished_at": time.time()}
            ledger.transition(request_id, status=DONE, details=details, allowed_from=(CLAIMED,))
        ids.append(request_id)
    store.reads.clear()
    return store, ledger, ids


def test_a_pass_of_50_requests_makes_few_artifacts_and_reads_each_entry_once(tmp_path, published):
    store, ledger, ids = settled_ledger(tmp_path, 50)

    publish_request_artifacts(store, ledger, ids)

    assert [(kind, key) for kind, key, _ in published] == [("table", "deletion-pass"), ("table", "unlearning-record")]
    (_, _, rows), (_, _, runs) = published
    assert [row["request"] for row in rows] == ids  # every request can be found in the pass's table
    assert rows[9]["status"] == REJECTED and "unknown ids [9]" in rows[9]["why (rejected / failed)"]
    assert rows[0]["status"] == DONE and rows[0]["runs changed"] == "run-a"
    assert len(runs) == 1 and runs[0]["run"] == "run-a" and runs[0]["requests served"] == 45
    assert runs[0]["ids forgotten"] == 45  # the pass's, not the first request's
    for request_id in ids:
        assert store.reads[f"ledger/requests/{request_id}.json"] == 1
        assert store.reads[f"ledger/status/{request_id}"] == 1
    assert not [key for key in store.reads if key.startswith("ledger/status/") and "@" in key]  # no histories
    assert store.reads["runs/run-a/current@2"] <= 1  # the manifest link, once per run version
    assert sum(store.reads.values()) <= 2 * len(ids) + 1


def test_a_small_pass_keeps_one_ledger_entry_and_record_per_request(tmp_path, published):
    store, ledger, ids = settled_ledger(tmp_path, PER_REQUEST_ARTIFACTS_UP_TO)

    publish_request_artifacts(store, ledger, ids)

    kinds = Counter(key for _, key, _ in published)
    assert kinds == {"deletion-ledger": len(ids), "unlearning-record": len(ids)}
    assert "| 3 | done | 20" in str(published[0][2])  # the status history is kept for a small pass


def test_a_big_pass_splits_its_table_in_bounded_parts(tmp_path, published, monkeypatch):
    import flows.artifacts

    monkeypatch.setattr(flows.artifacts, "PASS_TABLE_ROWS", 20)
    store, ledger, ids = settled_ledger(tmp_path, 50)

    publish_request_artifacts(store, ledger, ids)

    tables = [rows for _, key, rows in published if key == "deletion-pass"]
    assert [len(rows) for rows in tables] == [20, 20, 10]  # type: ignore[arg-type]
