"""Two filings of one request id at once: exactly one request is kept, the other filer is answered as a repeat.

``DeletionLedger.append`` checked that the request's record was absent, then wrote it: two ``forget``
commands with the same ``--request-id`` and different ids both found it absent, both answered
``"new": true``, and the last write replaced the first request (with ``serve`` running, the loser's
event was handled as the winner's request). The record is now created only if absent
(:meth:`ObjectStore.put_json_once`, the create-if-absent write of pointer versions).
"""

from __future__ import annotations

import threading

import pytest

from obliviate.unlearning.service import RequestError, RunSpec
from storage import ObjectStore
from storage.check import check_store
from storage.errors import ObjectExists
from storage.ledger import DeletionLedger
from storage.objects import COMMIT_SUFFIX


def _file(ledger: DeletionLedger, ids: list[int], out: dict, name: str) -> None:
    try:
        entry, new = ledger.append(request_id="race-1", ids=ids, dataset="digits", reason=name)
        out[name] = ("filed", new, entry.request["ids"])
    except RequestError as err:
        out[name] = ("refused", str(err))


@pytest.mark.parametrize("held", ["record", "commit"])
def test_two_filings_of_one_request_id_at_once_keep_one_request(s3_url, flaky_s3, held):
    """The first filer's write is held in the network while the second files the same request id.

    ``record``: its record's bytes are held, so the second creates the record first and is kept.
    ``commit``: its bytes are stored and their commit record held, so the second finds them uncommitted,
    commits them as found, and is refused; the first is kept.
    """
    with flaky_s3.routed():
        first = DeletionLedger(ObjectStore(s3_url))
    second = DeletionLedger(ObjectStore(s3_url))
    key = "/ledger/requests/race-1.json" + (COMMIT_SUFFIX if held == "commit" else "")
    hold = flaky_s3.hold("PUT", key)
    results: dict = {}
    filing = threading.Thread(target=_file, args=(first, [1, 2, 3], results, "first"))
    filing.start()
    try:
        hold.wait(60)
        _file(second, [7, 8], results, "second")
    finally:
        hold.release()
    filing.join(120)
    kept, lost, ids = ("second", "first", [7, 8]) if held == "record" else ("first", "second", [1, 2, 3])
    assert results[kept] == ("filed", True, ids), results
    assert results[lost][0] == "refused", results
    assert f"'race-1' already holds {len(ids)} ids of 'digits'" in results[lost][1], results
    store = ObjectStore(s3_url)
    entry = DeletionLedger(store).get("race-1")  # its record read back verified against its checksum
    assert entry.request["ids"] == ids and entry.request["reason"] == kept and entry.status == "pending"
    assert DeletionLedger(store).request_ids() == ["race-1"]
    report = check_store(store, min_age_s=0)
    assert report.corrupt == [] and report.uncommitted == [], report.as_dict()


def test_two_filings_with_the_same_ids_at_once_are_one_request_and_a_repeat(s3_url, flaky_s3):
    with flaky_s3.routed():
        first = DeletionLedger(ObjectStore(s3_url))
    second = DeletionLedger(ObjectStore(s3_url))
    hold = flaky_s3.hold("PUT", "/ledger/requests/race-1.json")
    results: dict = {}
    filing = threading.Thread(target=_file, args=(first, [4, 5], results, "first"))
    filing.start()
    try:
        hold.wait(60)
        _file(second, [4, 5], results, "second")
    finally:
        hold.release()
    filing.join(120)
    assert results == {"second": ("filed", True, [4, 5]), "first": ("filed", False, [4, 5])}, results


@pytest.mark.parametrize("where", ["store_url", "s3_url"])
def test_put_json_once_creates_once_and_commits_bytes_it_finds_uncommitted(where, request):
    store = ObjectStore(request.getfixturevalue(where))
    store.ensure_container()
    store.put_json_once("once/a.json", {"n": 1})
    with pytest.raises(ObjectExists, match="once/a.json is already stored"):
        store.put_json_once("once/a.json", {"n": 2})
    assert store.get_json("once/a.json") == {"n": 1}
    # bytes whose writer has not committed them (yet): committed as found, never replaced
    store._create_exclusive(store._path("once/b.json"), b'{"n": 3}')
    assert not store.exists("once/b.json")
    with pytest.raises(ObjectExists):
        store.put_json_once("once/b.json", {"n": 4})
    assert store.get_json("once/b.json") == {"n": 3}


def test_two_trainings_of_one_run_id_storing_other_specs_at_once_keep_one(s3_url, flaky_s3, tiny_run):
    """``RunRegistry.put_spec`` checked that the spec was absent, then wrote it: two trainings of one run id
    with other options both stored theirs, and the one whose spec was replaced trained on unrefused."""
    from flows.train import run_spec
    from obliviate.errors import ConfigError
    from storage.registry import RunRegistry

    specs = {seed: RunSpec.from_dict(run_spec(run_id="r1", split_seed=0, **tiny_run(seed=seed))) for seed in (1, 2)}
    with flaky_s3.routed():
        first = RunRegistry(ObjectStore(s3_url))
    second = RunRegistry(ObjectStore(s3_url))
    hold = flaky_s3.hold("PUT", "/runs/r1/spec.json")
    results: dict = {}

    def put(registry: RunRegistry, seed: int) -> None:
        try:
            registry.put_spec(specs[seed])
            results[seed] = "stored"
        except ConfigError as err:
            results[seed] = str(err)

    storing = threading.Thread(target=put, args=(first, 1))
    storing.start()
    try:
        hold.wait(60)
        put(second, 2)
    finally:
        hold.release()
    storing.join(120)
    assert results[2] == "stored" and "run 'r1' already exists" in results[1], results
    assert second.spec("r1").to_dict() == specs[2].to_dict()
