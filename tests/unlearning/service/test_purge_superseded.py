"""SPEC 5: once a deletion's version is published, no stored checkpoint trained on a deleted id remains.

Every version was kept by default: after unlearning an id of block 2, v2 was exact but v1's
``ckpt-0002.pt`` and ``ckpt-0003.pt`` (trained on the id) stayed stored. Now the versions a deletion
supersedes are purged with retention's machinery (pointer versions stay as the record), a purge cut
off is reported by ``store check`` and finished by ``--repair`` (or the next attempt), and
``serve --keep-superseded-versions`` keeps them on purpose. Real stores (file:// and moto's s3://),
a tiny run; no mocks of obliviate's components (a crash or a refused delete is staged in the network
between the worker and moto S3, by tests/conftest.py's FlakyProxy).
"""

from __future__ import annotations

import functools
import json

import pytest

from actors.chains import ChainWorker
from flows.repair import check_and_repair
from flows.settle import run_pass
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.check import check_store, keeps_superseded, save_keep_superseded
from storage.ledger import DeletionLedger
from storage.registry import RunRegistry


def _trained_on(store: ObjectStore, victim: int) -> list[str]:
    """Stored checkpoints whose training saw ``victim``, judged by the block id lists of every stored manifest.

    A checkpoint M_i of a chain trained on blocks 1..i of the plan without the chain's deleted
    positions. Every stored checkpoint must be listed by some stored manifest (else it is unaccounted
    for and counted as trained on it when its own record says it excluded nothing).
    """
    registry = RunRegistry(store)
    position = int(registry.spec("r1").positions([victim])[0][0])
    keys = store.list("runs/r1/")
    listed: dict[str, list[tuple[list[list[int]], set[int], int]]] = {}
    for manifest_key in [k for k in keys if k.startswith("runs/r1/manifests/")]:
        body = store.get_json(manifest_key)
        chain = body["metadata"]["chain"]
        for index, member in body["members"].items():
            listed.setdefault(member["key"], []).append(
                (chain["plan"]["blocks"], set(chain["deleted_ids"]), int(index))
            )
    found = []
    for key in [k for k in keys if k.startswith("runs/r1/chains/") and k.endswith(".pt")]:
        if key not in listed:
            if registry.load_checkpoint(key).excluded_count == 0 and int(key[-7:-3]) >= 2:
                found.append(key)
            continue
        for blocks, deleted, index in listed[key]:
            trained = {p for block in blocks[:index] for p in block} - deleted
            if position in trained:
                found.append(key)
    return sorted(set(found))


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_deletion_leaves_no_stored_checkpoint_trained_on_its_ids(where, request, train_r1):
    url = request.getfixturevalue("store_url" if where == "file" else "s3_url")
    victim = train_r1(url)[1]
    store = ObjectStore(url)
    assert _trained_on(store, victim) != []  # v1's M_2, M_3

    result = ChainWorker(url).unlearn("r1", {"req-1": [victim]})

    assert result["status"] == "published" and result["to_version"] == 2
    assert _trained_on(store, victim) == []
    purge = result["superseded_versions"]
    assert purge["status"] == "purged" and purge["versions"] == [1] and purge["objects"] > 0
    assert result["purged_at"] >= result["published_at"]
    registry = RunRegistry(store)
    assert registry.pruned_versions("r1")[1]["superseded"] is True
    # the record stays: v1's pointer version (what it applied), v2 whole and served
    assert store.pointer_versions("runs/r1/current") == [1, 2]
    chain, _ = registry.load_chain(registry.current("r1"))
    assert chain.final.block_index == 3 and victim in registry.current("r1").deleted_ids
    report = check_store(store, min_age_s=0)
    assert report.healthy and report.superseded == [] and report.orphans == [], report.as_dict()


def test_the_current_version_verifies_and_a_purged_one_says_so(store_url, train_r1, capsys):
    from flows.cli import main

    victim = train_r1(store_url)[1]
    ChainWorker(store_url).unlearn("r1", {"req-1": [victim]})
    assert main(["verify", "--store", store_url, "--run", "r1"]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert said["bit_identical"] and all(said["bit_identical"].values()), said
    assert main(["verify", "--store", store_url, "--run", "r1", "--version", "1"]) == 2
    err = capsys.readouterr().err
    assert "version 1 of run 'r1' was purged after a later version applied deletions (SPEC 5" in err, err
    assert "its checkpoints are deleted" in err and "keep-versions" not in err and "Traceback" not in err


def test_a_pass_records_when_the_data_left_storage(store_url, train_r1):
    victim = train_r1(store_url)[1]
    worker = ChainWorker(store_url)
    submit_deletion(store_url, [victim], dataset="digits", request_id="req-1", emit=False)
    result = run_pass(store_url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})
    assert result["settled"] == {"req-1": "done"}
    details = DeletionLedger(ObjectStore(store_url)).get("req-1").details
    run = details["runs"]["r1"]
    assert run["superseded_versions"]["status"] == "purged"
    assert isinstance(run["purged_at"], float) and details["purged_at"] == run["purged_at"]  # next to exact_at
    assert isinstance(details["exact_at"], float)
    assert _trained_on(ObjectStore(store_url), victim) == []


def _runs_of(url: str) -> str:
    """What the request line of an S3 request on the store's ``runs/`` objects holds (``/bucket/prefix/runs/``)."""
    return f"/{url.removeprefix('s3://')}/runs/"


def test_a_crash_between_publish_and_purge_is_reported_and_repaired(s3_url, flaky_s3, train_r1):
    """The worker reaches moto S3 through a proxy that goes down once its purge has deleted one object
    (two DELETEs: its commit record, then its bytes): the server keeps what a worker killed there leaves.
    No local store has such a fault (root deletes whatever the permissions say)."""
    victim = train_r1(s3_url)[1]
    store = ObjectStore(s3_url)
    with flaky_s3.routed():
        worker = ChainWorker(s3_url)
    crash = flaky_s3.down_at("DELETE", _runs_of(s3_url), after=2)
    result = worker.unlearn("r1", {"req-1": [victim]})
    assert len(crash.refused) == 1, "the purge never reached its second deletion"
    assert result["status"] == "published" and result["superseded_versions"]["status"] == "pending", result
    assert RunRegistry(store).current("r1").version == 2  # published, purge cut off
    assert _trained_on(store, victim) != []

    report = check_and_repair(s3_url, repair=False, min_orphan_age_s=0)
    assert not report.healthy and [item["run"] for item in report.superseded] == ["r1"], report.as_dict()
    assert "store check --repair" in report.superseded[0]["problem"]
    repaired = check_and_repair(s3_url, repair=True, min_orphan_age_s=0)
    assert repaired.healthy and repaired.purged is not None and repaired.purged["objects"] > 0, repaired.as_dict()
    assert _trained_on(store, victim) == []
    assert check_and_repair(s3_url, repair=False, min_orphan_age_s=0).healthy


def test_the_next_attempt_finishes_a_purge_and_a_failed_purge_never_fails_the_deletion(s3_url, flaky_s3, train_r1):
    """The worker reaches moto S3 through a proxy that answers every DELETE with S3's AccessDenied, as a
    bucket policy that forbids deleting does (a local store has no such refusal: root deletes anyway)."""
    victim = train_r1(s3_url)[1]
    store = ObjectStore(s3_url)
    with flaky_s3.routed():
        worker = ChainWorker(s3_url)
    read_only = flaky_s3.fail("DELETE", status=403)
    result = worker.unlearn("r1", {"req-1": [victim]})
    read_only.stop()
    assert read_only.refused and all(_runs_of(s3_url) in line for line in read_only.refused), read_only.refused
    assert result["status"] == "published" and result["purged_at"] is None
    assert result["superseded_versions"]["status"] == "pending"
    reason = result["superseded_versions"]["reason"]
    assert f"permission denied at {s3_url}/runs/r1/" in reason and "Access Denied" in reason, reason
    assert not check_store(store, min_age_s=0).healthy

    again = worker.unlearn("r1", {"req-1": [victim]})  # the request's next attempt (a crash before settling)
    assert again["status"] == "already_applied" and again["superseded_versions"]["status"] == "purged"
    assert _trained_on(store, victim) == [] and check_store(store, min_age_s=0).healthy


def test_keep_superseded_versions_keeps_them_and_says_so(store_url, train_r1, capsys):
    from flows.cli import main

    victim = train_r1(store_url)[1]
    store = ObjectStore(store_url)
    save_keep_superseded(store, keep=True)  # what `serve --keep-superseded-versions` records
    assert keeps_superseded(store)
    result = ChainWorker(store_url).unlearn("r1", {"req-1": [victim]})
    assert result["superseded_versions"]["status"] == "kept" and result["purged_at"] is None
    assert "SPEC 5" in result["superseded_versions"]["reason"]
    assert _trained_on(store, victim) != [] and RunRegistry(store).pruned_versions("r1") == {}
    assert check_store(store, min_age_s=0).healthy
    assert main(["verify", "--store", store_url, "--run", "r1", "--version", "1"]) == 0
    capsys.readouterr()
    # a serve without the option: the store purges again, and store check says what is left
    save_keep_superseded(store, keep=False)
    report = check_store(store, min_age_s=0)
    assert not report.healthy and report.superseded[0]["versions"] == [1]
    assert check_and_repair(store_url, repair=True, min_orphan_age_s=0).healthy
    assert _trained_on(store, victim) == []


def test_serve_offers_the_opt_out(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--keep-superseded-versions" in capsys.readouterr().out


def test_an_interim_keeps_the_full_chain_it_derives_from_until_its_retrain_lands(store_url, train_r1):
    """A rolled-back (interim) version serves M_0..M_s of the full version it names (``chain_of``): a release
    serves that chain again and the retrain starts from it, so the purge keeps it; the retrain's publish
    then purges both."""
    from flows.rollback import heldout_judge
    from storage.serving import roll_back

    victim = train_r1(store_url)[1]
    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    worker = ChainWorker(store_url)
    assert worker.unlearn("r1", {"req-1": [victim]})["superseded_versions"]["versions"] == [1]
    chain, _ = registry.load_chain(registry.current("r1"))
    held = int(registry.spec("r1").train_ids[int(chain.plan.blocks[2][0])])  # block 3, still in v2
    judge_for = functools.partial(heldout_judge, registry)  # measures M_2, which the retrain did not record
    rolled = roll_back(registry, "r1", {"held-1": [held]}, floor_points=100.0, judge_for=judge_for)
    assert rolled is not None and rolled["published"], rolled
    assert registry.current("r1").version == 3
    report = check_store(store, min_age_s=0)
    assert report.healthy and report.superseded == [], report.as_dict()  # v2 is what v3 derives from
    v2 = store.read_pointer_version("runs/r1/current", 2).target["manifest"]
    assert all(store.exists(m["key"]) for m in store.get_json(v2)["members"].values())

    result = worker.unlearn("r1", {"held-1": [held]})
    assert result["status"] == "published"  # with progressive versions on the way when the run served an interim
    assert result["superseded_versions"]["versions"] == list(range(2, result["to_version"]))
    assert _trained_on(store, victim) == [] and _trained_on(store, held) == []
    assert check_store(store, min_age_s=0).healthy
