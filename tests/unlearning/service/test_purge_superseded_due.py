"""SPEC 5's purge touches only versions a published retrain superseded, and the ledger hears of a later purge.

``store check`` reported an ordinary rollback state as damage (exit 1, "their purge after the
deletion's publish did not finish"): after one applied deletion, every version other than the
current one and its full chain counted as superseded, so the first interim of an open batch (and
a release's predecessors) was due, and ``--repair`` deleted its manifest. A purge that
``store check --repair`` (or a later deletion) finished left each request's ledger entry saying
``kept`` or ``pending`` with ``purged_at`` null. Real stores, a tiny run; no mocks of obliviate's
components (a failed purge is moto S3's delete refused in the network, by tests/conftest.py's FlakyProxy).
"""

from __future__ import annotations

import functools

from actors.chains import ChainWorker
from flows.repair import check_and_repair
from storage import ObjectStore
from storage.check import SUPERSEDED_KEY, check_store, purge_superseded, save_keep_superseded
from storage.ledger import DeletionLedger
from storage.registry import RunRegistry


def _two_interims(url: str, train_r1) -> tuple[ObjectStore, RunRegistry, dict[str, list[int]]]:
    """One deletion applied (v2), then two requests held by interims of one open batch (v3 serves M_2, v4 M_1)."""
    from flows.rollback import heldout_judge
    from storage.serving import roll_back

    firsts = train_r1(url)
    store = ObjectStore(url)
    registry = RunRegistry(store)
    spec = registry.spec("r1")
    assert ChainWorker(url).unlearn("r1", {"z": [firsts[0]]})["status"] == "published"  # v2: deleted_ids
    chain, _ = registry.load_chain(registry.current("r1"))
    held = {"a": [int(spec.train_ids[int(chain.plan.blocks[2][0])])]}  # block 3
    judge_for = functools.partial(heldout_judge, registry)
    assert roll_back(registry, "r1", held, floor_points=100.0, judge_for=judge_for)["published"]
    held["b"] = [int(spec.train_ids[int(chain.plan.blocks[1][0])])]  # block 2
    assert roll_back(registry, "r1", held, floor_points=100.0, judge_for=judge_for)["published"]
    assert registry.current("r1").version == 4
    return store, registry, held


def test_interims_of_an_open_batch_are_not_superseded_and_the_purge_keeps_them(store_url, train_r1):
    store, _, held = _two_interims(store_url, train_r1)
    first_interim = str(store.read_pointer_version("runs/r1/current", 3).target["manifest"])

    report = check_store(store, min_age_s=0)
    assert report.healthy and report.superseded == [], report.as_dict()
    purged = purge_superseded(store, apply=True)  # what `store check --repair` or a later attempt runs
    assert purged["objects"] == 0 and purged["runs"]["r1"]["versions"] == [], purged
    assert store.exists(first_interim)

    result = ChainWorker(store_url).unlearn("r1", held)  # the batch's retrain lands: now they are superseded
    assert result["status"] == "published", result
    assert {2, 3, 4} <= set(result["superseded_versions"]["versions"]), result["superseded_versions"]
    assert not store.exists(first_interim)
    assert check_store(store, min_age_s=0).healthy


def test_a_release_after_interims_is_not_reported_as_an_unfinished_purge(store_url, train_r1):
    from storage.serving import release

    store, registry, held = _two_interims(store_url, train_r1)
    assert release(registry, "r1", set(held)) is not None  # forget --cancel of both: v5 serves v2's chain again
    assert registry.current("r1").version == 5
    report = check_store(store, min_age_s=0)
    assert report.healthy and report.superseded == [], report.as_dict()


def _purged_in_ledger(url: str, versions: list[int]) -> None:
    details = DeletionLedger(ObjectStore(url)).get("req-1").details
    run = details["runs"]["r1"]
    said = run["superseded_versions"]
    assert said["status"] == "purged" and said["versions"] == versions and said["objects"] > 0, run
    assert isinstance(run["purged_at"], float) and details["purged_at"] == run["purged_at"], details


def test_a_kept_purge_finished_by_repair_reaches_the_ledger(store_url, train_r1, settle_req1):
    firsts = train_r1(store_url)
    store = ObjectStore(store_url)
    save_keep_superseded(store, keep=True)  # serve --keep-superseded-versions
    details = settle_req1(store_url, firsts[1])
    assert details["runs"]["r1"]["superseded_versions"]["status"] == "kept" and details["purged_at"] is None
    save_keep_superseded(store, keep=False)  # a serve without the option
    repaired = check_and_repair(store_url, repair=True, min_orphan_age_s=0)
    assert repaired.healthy and repaired.purged["runs"]["r1"]["requests"] == ["req-1"], repaired.as_dict()
    _purged_in_ledger(store_url, [1])
    again = check_and_repair(store_url, repair=True, min_orphan_age_s=0)  # idempotent: nothing more written
    assert again.healthy and again.purged is None
    _purged_in_ledger(store_url, [1])


def test_a_pending_purge_finished_by_repair_reaches_the_ledger(s3_url, flaky_s3, train_r1, settle_req1):
    """The pass reaches moto S3 through a proxy that answers each DELETE of the run's objects with S3's
    AccessDenied (a bucket policy that forbids deleting them); the ledger's own deletes (leases, markers)
    go on. A local store has no such refusal (root deletes anyway), so this runs on S3."""
    firsts = train_r1(s3_url)
    denied = flaky_s3.fail("DELETE", f"/{s3_url.removeprefix('s3://')}/runs/", status=403)
    with flaky_s3.routed():
        details = settle_req1(s3_url, firsts[1])
    denied.stop()
    assert denied.refused, "the purge never tried to delete"
    assert details["runs"]["r1"]["superseded_versions"]["status"] == "pending" and details["purged_at"] is None
    assert "permission denied" in details["runs"]["r1"]["superseded_versions"]["reason"], details["runs"]["r1"]
    assert check_and_repair(s3_url, repair=True, min_orphan_age_s=0).healthy
    _purged_in_ledger(s3_url, [])  # v1 was recorded pruned by the failed purge; the repair deleted its objects


def test_the_setting_says_what_wrote_it(store_url):
    store = ObjectStore(store_url)
    save_keep_superseded(store, keep=True)
    assert store.get_json(SUPERSEDED_KEY)["by"] == "serve --keep-superseded-versions"
    save_keep_superseded(store, keep=False)
    assert store.get_json(SUPERSEDED_KEY)["by"] == "serve"
