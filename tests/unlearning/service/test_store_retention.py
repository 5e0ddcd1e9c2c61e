"""Store growth over months of use (fast; a local store, a tiny run): retention of old versions
(``store check --repair --keep-versions N``) and orphans collected while requests are open.

Retention is for stores that keep superseded versions (``serve --keep-superseded-versions``): by
default a deletion's publish purges them (SPEC 5; tests/unlearning/service/test_purge_superseded.py)."""

from __future__ import annotations

import json
import time

import pytest

from actors.chains import ChainWorker
from flows.repair import check_and_repair
from flows.train import run_spec
from flows.unlearn import submit_deletion
from obliviate.unlearning.service import work_token
from storage import ObjectStore
from storage import lease as leases
from storage.check import save_keep_superseded
from storage.errors import StorageUnavailable
from storage.ledger import CLAIMED, DeletionLedger
from storage.registry import RunRegistry


@pytest.fixture
def trained(store_url, tiny_run):
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    ChainWorker(store_url).train(spec)
    save_keep_superseded(ObjectStore(store_url), keep=True)  # retention is what prunes here
    return store_url, spec


def _forget(store_url: str, spec: dict, batches: int) -> None:
    """``batches`` deletion batches, each applied to r1 as a new version with a new chain."""
    worker = ChainWorker(store_url)
    for batch in range(batches):
        result = worker.unlearn("r1", {f"batch-{batch}": [int(spec["train_ids"][-1 - batch])]})
        assert result["status"] == "published", result


def _members(store: ObjectStore, manifest_key: str) -> list[str]:
    return [m["key"] for m in store.get_json(manifest_key)["members"].values()]


def test_keep_versions_prunes_old_versions_and_says_what_it_deleted(trained, capsys):
    """Every deletion batch wrote a new chain and every version was kept for good: `--repair` took each
    member of every historic version as referenced, and no command pruned. Now `--keep-versions N`
    prunes versions older than the newest N (never the current one), deletes only what they alone
    used, keeps their pointer versions, and says counts and bytes; without the flag nothing changes."""
    from flows.cli import main

    store_url, spec = trained
    _forget(store_url, spec, batches=3)
    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    current = registry.current("r1")
    assert current is not None and current.version >= 4
    manifests = {
        v: store.read_pointer_version("runs/r1/current", v).target["manifest"] for v in range(1, current.version + 1)
    }
    before = set(store.list(""))

    # default: keep everything (no behaviour change without the flag)
    assert check_and_repair(store_url, repair=True, min_orphan_age_s=0).healthy
    assert set(store.list("")) == before
    # without --repair: what would go, nothing deleted
    assert main(["store", "check", "--store", store_url, "--keep-versions", "2"]) == 0
    said = capsys.readouterr()
    assert "retention (--keep-versions 2): would delete" in said.err and set(store.list("")) == before
    assert json.loads(said.out)["pruned"]["deleted"] is False

    assert main(["store", "check", "--store", store_url, "--repair", "--keep-versions", "2"]) == 0
    said = capsys.readouterr()
    pruned = json.loads(said.out)["pruned"]
    kept = {current.version - 1, current.version}
    assert pruned["runs"]["r1"]["versions"] == [v for v in range(1, current.version + 1) if v not in kept]
    assert pruned["objects"] > 0 and pruned["bytes"] > 0
    assert "retention (--keep-versions 2): deleted" in said.err and "can no longer be served" in said.err
    assert sorted(registry.pruned_versions("r1")) == pruned["runs"]["r1"]["versions"]
    after = set(store.list(""))
    gone = before - after
    assert len([k for k in gone if k.endswith(".pt")]) > 0
    # every kept version is whole; every pointer version stays (the history)
    for version in kept:
        for key in _members(store, manifests[version]):
            assert store.exists(key), key
    assert store.pointer_versions("runs/r1/current") == list(range(1, current.version + 1))
    chain, _ = registry.load_chain(registry.current("r1"))
    assert chain.final.block_index == 3
    # a pruned version's manifest is gone unless it published checkpoints kept versions share (replay's recipe)
    shared = {k.rsplit("/", 1)[0] for v in kept for k in _members(store, manifests[v])}
    for version in pruned["runs"]["r1"]["versions"]:
        folder = "runs/r1/chains/" + manifests[version].rsplit("/", 1)[1].split("-", 1)[1][: -len(".json")]
        assert store.exists(manifests[version]) == (folder in shared), version
    # the store reads healthy afterwards, with nothing left over; a second pruning deletes nothing
    report = check_and_repair(store_url, repair=False, min_orphan_age_s=0)
    assert report.healthy and report.orphans == [] and report.lineage == [], report.as_dict()
    again = check_and_repair(store_url, repair=True, min_orphan_age_s=0, keep_versions=2)
    assert again.pruned is not None and again.pruned["objects"] == 0 and again.healthy


def test_keep_versions_is_refused_unless_a_whole_number_of_at_least_one(trained, capsys):
    from flows.cli import main

    store_url, _ = trained
    for bad in ("0", "-1", "2.5", "x"):
        assert main(["store", "check", "--store", store_url, "--repair", "--keep-versions", bad]) == 2
        assert f"must be a whole number >= 1 (the current version is always kept); got '{bad}'" in (
            capsys.readouterr().err
        )


def test_pruning_keeps_the_full_version_an_interim_derives_from(trained):
    """A rolled-back (interim) version keeps only M_0..M_s and names the full version it derives from
    (``chain_of``): a release serves that chain again and a retrain starts from it, so it is kept
    even when older than the newest N."""
    store_url, spec = trained
    _forget(store_url, spec, batches=1)  # v2 full
    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    from storage.serving import roll_back

    last_block_id = int(spec["train_ids"][-10])
    result = roll_back(registry, "r1", {"held-1": [last_block_id]}, floor_points=100.0)
    assert result is not None and result["published"], result
    current = registry.current("r1")
    assert current is not None and current.version == 3
    report = check_and_repair(store_url, repair=True, min_orphan_age_s=0, keep_versions=1)
    assert report.pruned is not None and report.pruned["runs"]["r1"]["versions"] == [1]
    assert report.healthy, report.as_dict()
    full = store.read_pointer_version("runs/r1/current", 2).target["manifest"]
    assert all(store.exists(k) for k in _members(store, full))  # the chain v3 derives from is whole


def test_orphans_are_collected_while_requests_are_pending(trained):
    """A batch window keeps a request open nearly always, and `--repair` collected nothing while any
    request was pending or claimed ("... still open ... nothing is collected now"). A pending request
    writes nothing: garbage of older bases, lost publishes and settled leases are collected now; only
    work from the version served now (what the next attempt resumes) waits."""
    store_url, spec = trained
    _forget(store_url, spec, batches=1)  # v2 derives from itself: every attempt now starts from v2
    store = ObjectStore(store_url)
    old_base = "runs/r1/chains/u000001-deadbeef0000/ckpt-0003.pt"  # an attempt from v1 that lost its race
    lost_manifest = "runs/r1/manifests/v000002-u000001-deadbeef0000.json"  # its publish lost the swap
    resumable = "runs/r1/chains/u000002-feedface0000/ckpt-0003.pt"  # a crashed attempt from v2
    for key in (old_base, resumable):
        store.put_bytes(key, b"left behind")
    store.put_json(lost_manifest, {"members": {}, "metadata": {}, "created_at": 0.0})
    submit_deletion(store_url, spec["train_ids"][:1], dataset="digits", request_id="settled-1", emit=False)
    DeletionLedger(store).cancel("settled-1", applied_to=[])
    settled_lease = leases.lease_key("settled-1", 1)
    store.put_json(settled_lease, {"holder": "h", "claim_version": 1, "renewed_at": 0.0, "lease_s": 4.0})
    submit_deletion(store_url, spec["train_ids"][1:2], dataset="digits", request_id="open-1", emit=False)

    report = check_and_repair(store_url, repair=True, min_orphan_age_s=0)
    assert sorted(report.collected) == sorted([old_base, lost_manifest, settled_lease]), report.as_dict()
    assert not store.exists(old_base) and not store.exists(lost_manifest) and not store.exists(settled_lease)
    assert store.exists(resumable) and "still open" in (report.orphans_held_back or "")
    assert report.healthy

    DeletionLedger(store).cancel("open-1", applied_to=[])
    report = check_and_repair(store_url, repair=True, min_orphan_age_s=0)
    assert report.collected == [resumable] and not store.exists(resumable)


def test_a_live_claimed_attempt_keeps_its_checkpoints_in_progress(trained):
    """A claimed request's retrain writes checkpoints no version references yet, under the chain of the
    version it started from: while its lease is live they are never collected; an older orphan is."""
    store_url, spec = trained
    store = ObjectStore(store_url)
    ledger = DeletionLedger(store)
    submit_deletion(store_url, spec["train_ids"][:1], dataset="digits", request_id="claimed-1", emit=False)
    claim = ledger.claim("claimed-1", holder="worker-a", lease_s=60.0, max_attempts=3)
    assert claim is not None and claim.status == CLAIMED
    leases.renew(store, "claimed-1", claim_version=claim.version, holder="worker-a", lease_s=60.0)
    token = work_token(base_version=1, excluded_positions=[3], policy="exact")
    in_progress = [f"runs/r1/chains/{token}/ckpt-0002.{ext}" for ext in ("json", "pt")]
    store.put_json(in_progress[0], {"seconds": 0.1})
    store.put_bytes(in_progress[1], b"M'_2 of the attempt")
    crashed_tmp = "runs/r1/chains/train-xdeadbeef0000/ckpt-0001.pt"  # a training folder of a published run
    store.put_bytes(crashed_tmp, b"left behind")
    time.sleep(0.01)

    report = check_and_repair(store_url, repair=True, min_orphan_age_s=0, keep_versions=1)
    assert all(store.exists(key) for key in in_progress)
    assert report.collected == [crashed_tmp] and not store.exists(crashed_tmp)
    assert "still open" in (report.orphans_held_back or "") and report.healthy


def test_an_interrupted_pruning_leaves_every_kept_version_whole_and_the_next_repair_finishes_it(
    s3_url, flaky_s3, tiny_run
):
    """Versions are recorded pruned before anything is deleted, and only what no kept version uses is
    deleted: a pruning cut off after its first deletion leaves a healthy store whose leftovers are
    orphans, and the next `--repair` collects them.

    The pruning reaches moto S3 through a proxy that goes down once it has deleted one object (two
    DELETEs: its commit record, then its bytes): what it left on the server is what a process killed
    there leaves. No local store has such a fault (root deletes whatever the permissions say).
    """
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    ChainWorker(s3_url).train(spec)
    store = ObjectStore(s3_url)
    save_keep_superseded(store, keep=True)
    _forget(s3_url, spec, batches=2)
    crash = flaky_s3.down_at("DELETE", f"/{s3_url.removeprefix('s3://')}/runs/r1/", after=2)
    with flaky_s3.routed(), pytest.raises(StorageUnavailable):
        check_and_repair(s3_url, repair=True, min_orphan_age_s=0, keep_versions=1)
    assert len(crash.refused) == 1, "the pruning never reached its second deletion"

    report = check_and_repair(s3_url, repair=False, min_orphan_age_s=0)  # straight to the server
    assert report.healthy and report.lineage == [] and report.orphans, report.as_dict()
    assert RunRegistry(store).pruned_versions("r1")  # recorded first
    finished = check_and_repair(s3_url, repair=True, min_orphan_age_s=0)
    assert finished.collected == report.orphans and finished.healthy
    assert check_and_repair(s3_url, repair=False, min_orphan_age_s=0).orphans == []


def test_retention_and_orphans_on_s3(s3_url, tiny_run):
    """The same on S3 (moto): pruning finds every run's versions and objects, orphans go with a request open."""
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    ChainWorker(s3_url).train(spec)
    save_keep_superseded(ObjectStore(s3_url), keep=True)
    _forget(s3_url, spec, batches=2)
    store = ObjectStore(s3_url)
    orphan = "runs/r1/chains/u000001-deadbeef0000/ckpt-0003.pt"  # older base than the current v3
    store.put_bytes(orphan, b"left behind")
    submit_deletion(s3_url, spec["train_ids"][:1], dataset="digits", request_id="open-1", emit=False)
    report = check_and_repair(s3_url, repair=True, min_orphan_age_s=0, keep_versions=1)
    assert report.pruned is not None and report.pruned["runs"]["r1"]["versions"] == [1, 2]
    assert report.pruned["objects"] > 0 and report.healthy, report.as_dict()
    assert orphan in report.collected and not store.exists(orphan)
    assert check_and_repair(s3_url, repair=False, min_orphan_age_s=0).orphans == []


def test_verify_of_a_pruned_version_says_it_was_pruned(trained, capsys):
    """verify --version V of a pruned version exited 4 ("failed"), saying `store check --repair` would
    rebuild a checkpoint that retention had deleted on purpose."""
    from flows.cli import main

    store_url, spec = trained
    _forget(store_url, spec, batches=2)
    assert main(["store", "check", "--store", store_url, "--repair", "--keep-versions", "1"]) == 0
    current = RunRegistry(ObjectStore(store_url)).current("r1")
    assert current is not None
    capsys.readouterr()
    assert main(["verify", "--store", store_url, "--run", "r1", "--version", "1", "--no-prefect"]) == 2
    err = capsys.readouterr().err
    assert "version 1 of run 'r1' was pruned by `obliviate store check --repair --keep-versions 1`" in err
    assert f"e.g. --version {current.version}" in err and "rebuilds" not in err
