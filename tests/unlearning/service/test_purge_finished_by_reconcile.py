"""A purge of superseded versions cut off is finished by serve's next reconcile pass, and the ledger says so (SPEC 5).

Two gaps: a purge interrupted between deleting the superseded objects and telling the ledger (or one
done before the ledger heard of purges) left the requests' entries saying ``kept`` or ``pending`` with
``purged_at`` null for good: the next purge found nothing to delete, so it told nobody. And a purge
cut off by a crash or an outage waited for someone to run ``store check --repair``: the reconcile
pass (the cron) did not sweep it. Now each reconcile pass finishes what is left and tells the
entries (with the time the purge recorded, when it is known), never purges while the store keeps
superseded versions, and a purge that fails is said in its log, never the pass's failure.

Real stores (file:// and moto's s3://), a tiny run, a real Prefect server; no mocks of obliviate's
components (a failed purge is moto S3's delete refused in the network by tests/conftest.py's FlakyProxy,
as in ``test_purge_superseded_due.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows.reconcile import finish_purges, reconcile_flow
from storage import ObjectStore
from storage.check import check_store, purge_superseded, save_keep_superseded
from storage.ledger import DeletionLedger
from storage.registry import RunRegistry

_FAILED_PURGE = "could not finish the purge of superseded versions"


def _v1_alone(store: ObjectStore) -> list[str]:
    """v1's checkpoints that the current version does not use (trained on the deleted id), while stored."""
    registry = RunRegistry(store)
    used = {m.key for m in registry.manifest(registry.current("r1")).members.values()}
    v1 = store.get_json(str(store.read_pointer_version("runs/r1/current", 1).target["manifest"]))
    return [m["key"] for m in v1["members"].values() if m["key"] not in used and store.exists(m["key"])]


def _cut_off_before_the_ledger(store: ObjectStore) -> float:
    """Leave what a purge interrupted between its deletes and the ledger leaves; when it recorded v1 pruned.

    The purge runs whole (v1's objects deleted), then its ledger write is undone: the request's
    status version it wrote is removed (the entry says ``kept`` again) and ``pruned.json`` keeps only
    what a purge writes before it deletes (``pruned_at``, ``superseded``).
    """
    ledger = DeletionLedger(store)
    before = len(ledger.history("req-1"))
    purged = purge_superseded(store, apply=True)
    assert purged["runs"]["r1"]["versions"] == [1] and purged["objects"] > 0, purged
    for version in range(before + 1, len(ledger.history("req-1")) + 1):
        store.delete(f"ledger/status/req-1/v{version:09d}.json")
    assert ledger.get("req-1").details["runs"]["r1"]["superseded_versions"]["status"] == "kept"
    registry = RunRegistry(store)

    def before_the_ledger(record: dict) -> dict:
        record["versions"] = {
            v: {"pruned_at": e["pruned_at"], "superseded": True} for v, e in record["versions"].items()
        }
        return record

    registry.update_pruned("r1", before_the_ledger)
    assert _v1_alone(store) == []
    return float(registry.pruned_versions("r1")[1]["pruned_at"])


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_purge_cut_off_before_the_ledger_is_told_by_the_next_reconcile_pass(
    where, request, train_r1, settle_req1, prefect_api_url
):
    url = request.getfixturevalue("store_url" if where == "file" else "s3_url")
    store = ObjectStore(url)
    victim = train_r1(url)[1]
    save_keep_superseded(store, keep=True)  # serve --keep-superseded-versions: the entry says kept
    assert settle_req1(url, victim)["runs"]["r1"]["superseded_versions"]["status"] == "kept"
    save_keep_superseded(store, keep=False)  # a serve without it; its purge is cut off before the ledger
    pruned_at = _cut_off_before_the_ledger(store)

    result = reconcile_flow(store=url)

    details = DeletionLedger(store).get("req-1").details
    run = details["runs"]["r1"]
    assert run["superseded_versions"]["status"] == "purged" and run["superseded_versions"]["versions"] == [1], run
    assert run["purged_at"] == pruned_at and details["purged_at"] == pruned_at  # when the purge recorded it, not now
    assert result["purge"]["runs"]["r1"]["requests"] == ["req-1"], result["purge"]
    report = check_store(store, min_age_s=0)
    assert report.healthy and report.superseded == [], report.as_dict()

    told = len(DeletionLedger(store).history("req-1"))
    again = reconcile_flow(store=url)  # nothing left: no purge, nothing written
    assert again["purge"] is None and len(DeletionLedger(store).history("req-1")) == told


def test_a_purge_that_failed_is_finished_by_the_next_reconcile_pass_and_a_failure_never_fails_it(
    s3_url, flaky_s3, train_r1, settle_req1, prefect_api_url, caplog
):
    """The pass and the first reconcile pass reach moto S3 through a proxy that answers each DELETE of the
    run's objects with S3's AccessDenied (a bucket policy that forbids deleting them); the ledger's own
    deletes (leases, markers) go on. A local store has no such refusal (root deletes anyway), so this runs
    on S3."""
    store = ObjectStore(s3_url)
    victim = train_r1(s3_url)[1]
    runs = f"/{s3_url.removeprefix('s3://')}/runs/r1/"
    denied = flaky_s3.fail("DELETE", runs, status=403)
    with flaky_s3.routed():
        details = settle_req1(s3_url, victim)
    pending = details["runs"]["r1"]["superseded_versions"]
    assert denied.refused and pending["status"] == "pending" and details["purged_at"] is None
    assert "permission denied" in pending["reason"], pending
    assert "serve's next reconcile pass" in pending["reason"], pending  # what forget --status tells the user

    refused_before = len(denied.refused)
    with caplog.at_level(logging.INFO), flaky_s3.routed():
        failed = reconcile_flow(store=s3_url)  # still refused
    assert len(denied.refused) > refused_before, "the reconcile pass never tried to delete"
    said = [r.getMessage() for r in caplog.records if _FAILED_PURGE in r.getMessage()]
    assert len(said) == 1 and f"permission denied at {s3_url}/runs/r1/" in said[0] and "pending" in said[0], said
    assert "permission denied" in failed["purge"]["error"], failed["purge"]
    assert DeletionLedger(store).get("req-1").details["runs"]["r1"]["superseded_versions"]["status"] == "pending"
    assert _v1_alone(store) != []

    denied.stop()  # deletes allowed again: the next pass finishes it
    with flaky_s3.routed():
        result = reconcile_flow(store=s3_url)
    assert result["purge"]["objects"] > 0 and result["purge"]["runs"]["r1"]["requests"] == ["req-1"], result["purge"]
    assert _v1_alone(store) == []
    details = DeletionLedger(store).get("req-1").details
    said = details["runs"]["r1"]["superseded_versions"]
    assert said["status"] == "purged" and said["objects"] > 0, said
    assert isinstance(details["purged_at"], float) and details["purged_at"] == details["runs"]["r1"]["purged_at"]
    report = check_store(store, min_age_s=0)
    assert report.healthy and report.superseded == [], report.as_dict()


def test_a_store_that_keeps_superseded_versions_is_not_purged_by_the_reconcile_pass(
    store_url, train_r1, settle_req1, prefect_api_url
):
    store = ObjectStore(store_url)
    victim = train_r1(store_url)[1]
    save_keep_superseded(store, keep=True)
    assert settle_req1(store_url, victim)["runs"]["r1"]["superseded_versions"]["status"] == "kept"
    history = DeletionLedger(store).history("req-1")

    result = reconcile_flow(store=store_url)

    assert result.get("purge") is None
    assert _v1_alone(store) != []  # kept on purpose
    assert DeletionLedger(store).history("req-1") == history  # the entry untouched: it says kept


def test_store_check_repair_tells_the_ledger_of_a_purge_cut_off_before_it(store_url, train_r1, settle_req1):
    from flows.repair import check_and_repair

    store = ObjectStore(store_url)
    victim = train_r1(store_url)[1]
    save_keep_superseded(store, keep=True)
    settle_req1(store_url, victim)
    save_keep_superseded(store, keep=False)
    pruned_at = _cut_off_before_the_ledger(store)
    assert check_store(store, min_age_s=0).healthy  # nothing left to delete: only the ledger is behind

    repaired = check_and_repair(store_url, repair=True, min_orphan_age_s=0)

    details = DeletionLedger(store).get("req-1").details
    assert details["runs"]["r1"]["superseded_versions"]["status"] == "purged", details["runs"]["r1"]
    assert details["purged_at"] == pruned_at
    assert repaired.healthy and repaired.purged["runs"]["r1"]["requests"] == ["req-1"], repaired.as_dict()


class CountingStore(ObjectStore):
    """A real file store that records the ledger keys it reads."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.ledger_reads: list[str] = []

    def get_json(self, key):  # type: ignore[no-untyped-def]
        if key.startswith("ledger/"):
            self.ledger_reads.append(key)
        return super().get_json(key)

    def read_pointer(self, key):  # type: ignore[no-untyped-def]
        if key.startswith("ledger/"):
            self.ledger_reads.append(key)
        return super().read_pointer(key)


def test_once_told_a_purge_pass_reads_no_request_again(store_url, train_r1, settle_req1):
    from storage.check import runs_with_purge_left

    store = ObjectStore(store_url)
    victim = train_r1(store_url)[1]
    save_keep_superseded(store, keep=True)
    settle_req1(store_url, victim)
    save_keep_superseded(store, keep=False)
    _cut_off_before_the_ledger(store)
    assert runs_with_purge_left(store) == ["r1"]
    assert purge_superseded(store, apply=True)["runs"]["r1"]["requests"] == ["req-1"]

    counting = CountingStore(store_url)
    assert runs_with_purge_left(counting) == []  # what a reconcile pass asks first: no run has work left
    again = purge_superseded(counting, apply=True)  # and a purge of every run (store check --repair, a deletion's)
    assert again["runs"]["r1"] == {
        "versions": [],
        "objects": 0,
        "bytes": 0,
        "held": 0,
        "purged_at": again["runs"]["r1"]["purged_at"],
    }
    assert counting.ledger_reads == [], counting.ledger_reads


def test_a_normal_deletion_leaves_the_next_reconcile_pass_no_purge_to_plan(store_url, train_r1, settle_req1):
    """The pass that applies a request purges the versions it superseded and settles the request with that purge
    (``purged``). That purge told nobody (the request was still claimed, so it could not be told) and left the
    pruned versions untold: every run a deletion touched was planned once more by the next reconcile pass. Now
    the purge knows which requests its caller settles with its result: nothing is left for a later pass."""
    from storage.check import REQUESTS_TOLD, runs_with_purge_left

    store = ObjectStore(store_url)
    victim = train_r1(store_url)[1]
    details = settle_req1(store_url, victim)
    said = details["runs"]["r1"]["superseded_versions"]
    assert said["status"] == "purged" and said["versions"] == [1], said
    record = RunRegistry(store).pruned_versions("r1")
    assert sorted(record) == [1] and all(REQUESTS_TOLD in info for info in record.values()), record
    assert runs_with_purge_left(store) == []  # what a reconcile pass asks first: no run has work left


GARBAGE = b"\0garbage{{{"


def _kept_then_purgeable(url: str, train_r1, settle_req1) -> ObjectStore:
    """req-1 applied while the store kept superseded versions (its entry says ``kept``); then a serve without it."""
    store = ObjectStore(url)
    victim = train_r1(url)[1]
    save_keep_superseded(store, keep=True)
    assert settle_req1(url, victim)["runs"]["r1"]["superseded_versions"]["status"] == "kept"
    save_keep_superseded(store, keep=False)
    return store


def _said_by_status(store: ObjectStore) -> dict:
    """req-1's run entry for r1, read from its status pointer alone (its record may be damaged)."""
    return store.read_pointer("ledger/status/req-1").target["details"]["runs"]["r1"]


def test_a_request_whose_record_is_damaged_is_told_its_purge_and_leaves_nothing_to_plan(
    store_url, train_r1, settle_req1
):
    """A purge told a request by reading its record, so a damaged record kept its run untold and every pass
    planned the run's purge again until the record was mended. The run entries live in the request's status:
    now the purge reads and writes only that, and the record's damage (store check's business) holds nothing."""
    from storage.check import runs_with_purge_left

    store = _kept_then_purgeable(store_url, train_r1, settle_req1)
    (Path(store_url.removeprefix("file://")) / "ledger/requests/req-1.json").write_bytes(GARBAGE)

    result = finish_purges(store_url, logger=logging.getLogger("test-reconcile"))

    assert result["runs"]["r1"]["versions"] == [1] and result["runs"]["r1"]["requests"] == ["req-1"], result
    said = _said_by_status(store)
    assert said["superseded_versions"]["status"] == "purged" and isinstance(said["purged_at"], float), said
    assert runs_with_purge_left(store) == []  # nothing for the next pass to plan


def test_a_request_whose_status_is_damaged_is_noted_once_and_told_once_mended(store_url, train_r1, settle_req1, caplog):
    """Its status damaged, a request cannot be told: its run stayed untold and was planned on every pass. Now the
    purge notes it once in the run's pruned record with the damage and its mend, says it once in the pass's log,
    plans the run no more, and the first pass after the status is mended tells it."""
    from storage.check import UNTOLD_DAMAGED, runs_with_purge_left

    store = _kept_then_purgeable(store_url, train_r1, settle_req1)
    status = max((Path(store_url.removeprefix("file://")) / "ledger/status/req-1").glob("v*.json"))
    backup = status.read_bytes()
    status.write_bytes(GARBAGE)
    logger = logging.getLogger("test-reconcile")

    with caplog.at_level(logging.WARNING):
        first = finish_purges(store_url, logger=logger)
    run = first["runs"]["r1"]
    assert run["versions"] == [1] and first["objects"] > 0 and run["requests"] == [], first
    assert list(run["untold"]) == ["req-1"] and "To mend: restore ledger/status/req-1/" in run["untold"]["req-1"]
    said = [r.getMessage() for r in caplog.records if "could not be told" in r.getMessage()]
    assert len(said) == 1 and "req-1" in said[0] and "To mend" in said[0], said
    noted = RunRegistry(store).pruned_record("r1")[1][UNTOLD_DAMAGED]
    assert list(noted) == ["req-1"] and noted["req-1"]["reason"] == run["untold"]["req-1"], noted
    assert runs_with_purge_left(store) == []  # the damage is noted: no pass plans the run for it again

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert finish_purges(store_url, logger=logger) is None
    assert not [r for r in caplog.records if "could not be told" in r.getMessage()]  # said once

    status.write_bytes(backup)  # the mend: restored from a backup
    assert runs_with_purge_left(store) == ["r1"]
    mended = finish_purges(store_url, logger=logger)
    assert mended["runs"]["r1"]["requests"] == ["req-1"], mended
    said = _said_by_status(store)
    assert said["superseded_versions"]["status"] == "purged" and said["superseded_versions"]["versions"] == [1]
    assert UNTOLD_DAMAGED not in RunRegistry(store).pruned_record("r1")[1]
    assert runs_with_purge_left(store) == []


def test_store_check_says_a_purge_waits_on_a_damaged_status(store_url, train_r1, settle_req1, capsys):
    """store check reported a request's damaged status with its mend, but not that a purge noted in its run's pruned
    record waits on it (untold_damaged): the user could not know that mending it also lets the purge tell the
    request. Now the damage's line says which run's purge waits and that the next pass after the mend tells it."""
    from flows.cli import main

    store = _kept_then_purgeable(store_url, train_r1, settle_req1)
    status = max((Path(store_url.removeprefix("file://")) / "ledger/status/req-1").glob("v*.json"))
    status.write_bytes(GARBAGE)

    def said() -> dict:
        (item,) = [i for i in check_store(store).corrupt if i["key"].startswith("ledger/status/req-1/")]
        return item

    before = said()  # damaged, but no purge noted yet: nothing waits
    assert "To mend" in before["error"] and "purge_waiting" not in before and "A purge waits" not in before["error"]

    finish_purges(store_url, logger=logging.getLogger("test-reconcile"))
    after = said()
    assert after["purge_waiting"] == [{"run": "r1", "versions": [1]}], after
    assert (
        "A purge waits to tell this request" in after["error"]
        and "run r1 (superseded version(s) [1]" in (after["error"])
    ), after["error"]
    assert after["error"].index("To mend") < after["error"].index("A purge waits")

    assert main(["store", "check", "--store", store_url]) == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if "damaged ledger/status/req-1/" in line]
    assert "A purge waits to tell this request" in line and "next reconcile pass" in line, line
