"""Two purges writing one run's pruned record at once lose neither's marks (moto S3, a tiny run).

``runs/<run>/pruned.json`` was read, changed and rewritten whole with no lock: a retention pass that
read it before a purge marked its versions told wrote it back after, without the marks, so the next
purge read those versions' requests and told them again. Now the record is a pointer moved by
compare-and-swap from the version read (as a request's status is): the writer that read a stale record
loses the swap, reads again and keeps what the other wrote. The race is forced in the network: the
retention pass's write of the record is held in tests/conftest.py's FlakyProxy until the purge is done.
"""

from __future__ import annotations

import threading

from actors.chains import ChainWorker
from flows.train import run_spec
from storage import ObjectStore
from storage.check import REQUESTS_TOLD, prune_versions, purge_superseded, runs_with_purge_left, save_keep_superseded
from storage.registry import RunRegistry


def test_a_retention_pass_that_read_the_record_before_a_purge_keeps_the_purges_told_marks(s3_url, flaky_s3, tiny_run):
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    worker = ChainWorker(s3_url)
    worker.train(spec)
    store = ObjectStore(s3_url)
    save_keep_superseded(store, keep=True)  # two deletions whose versions nobody purges yet
    for batch in range(2):
        assert worker.unlearn("r1", {f"batch-{batch}": [int(spec["train_ids"][-1 - batch])]})["status"] == "published"
    save_keep_superseded(store, keep=False)

    held = flaky_s3.hold("PUT", f"/{s3_url.removeprefix('s3://')}/runs/r1/pruned")
    outcome: dict = {}

    def retention() -> None:
        try:
            with flaky_s3.routed():
                slow = ObjectStore(s3_url)
            outcome["pruned"] = prune_versions(slow, keep=1, apply=True)
        except Exception as err:  # noqa: BLE001 -- the assertion below says what was raised
            outcome["error"] = err

    thread = threading.Thread(target=retention)
    thread.start()
    try:
        held.wait()  # the retention pass read the record (empty) and is writing versions 1 and 2 pruned
        purged = purge_superseded(store, apply=True)  # the purge records them superseded and marks them told
        assert purged["runs"]["r1"]["versions"] == [1, 2], purged
        told = RunRegistry(store).pruned_versions("r1")
        assert sorted(told) == [1, 2] and all(REQUESTS_TOLD in entry for entry in told.values()), told
    finally:
        held.release()
        thread.join(120)
    assert "error" not in outcome, f"the retention pass raised {outcome.get('error')!r}"

    record = RunRegistry(store).pruned_versions("r1")
    assert sorted(record) == [1, 2] and all(REQUESTS_TOLD in entry for entry in record.values()), record
    assert all(entry.get("superseded") for entry in record.values()), record  # the purge's entries, kept whole
    assert runs_with_purge_left(store) == []  # nothing for a later purge to tell again


def test_a_record_a_store_kept_in_pruned_json_is_read_and_moved_to_the_pointer(store_url):
    """A store written before the pointer kept the record in ``runs/<run>/pruned.json``: it is read while the
    pointer has no version, and the first change writes it (with the change) to the pointer and removes the file."""
    store = ObjectStore(store_url)
    store.put_json("runs/r1/pruned.json", {"run_id": "r1", "versions": {"1": {"pruned_at": 5.0, "keep_versions": 1}}})
    registry = RunRegistry(store)
    assert registry.pruned_versions("r1") == {1: {"pruned_at": 5.0, "keep_versions": 1}}

    def told(record: dict) -> dict:
        record["versions"][1][REQUESTS_TOLD] = 6.0
        return record

    registry.update_pruned("r1", told)
    assert registry.pruned_versions("r1") == {1: {"pruned_at": 5.0, "keep_versions": 1, REQUESTS_TOLD: 6.0}}
    assert not store.exists("runs/r1/pruned.json") and store.read_pointer("runs/r1/pruned").version == 1
