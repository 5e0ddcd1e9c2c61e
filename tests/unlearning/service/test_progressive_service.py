"""While a batch retrains, each exact block is served as it lands; a request accepted meanwhile is
rolled back by the running retrain, not by the next pass (issue 11, SPEC 6 Rollback)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from actors.chains import ChainWorker
from flows.batching import batch_gate, save_policy
from flows.rollback import heldout_judge, save_rollback
from flows.train import run_spec
from flows.verify import verify_run
from obliviate.unlearning.batching import DAY_S, BatchPolicy
from obliviate.unlearning.lineage import effective_block_ids, ids_sha256
from obliviate.unlearning.plan import BlockPlan
from obliviate.unlearning.shards import shard_probabilities
from storage import ObjectStore
from storage.check import save_keep_superseded
from storage.ledger import DeletionLedger
from storage.objects import Manifest
from storage.registry import ModelVersion, RunRegistry
from storage.serving import RunState, checkpoint_model, served_block

pytestmark = pytest.mark.slow


@pytest.fixture
def small_run(tiny_run) -> dict:
    return tiny_run(blocks=5, epochs=2, train_size=600, split_seed=0)


def _setup(url: str, run_id: str, options: dict, *, floor_points: float = 100.0):
    store = ObjectStore(url)
    spec = run_spec(run_id=run_id, **options)
    ChainWorker(url).train(spec)
    plan = BlockPlan.from_dict(store.get_json(f"runs/{run_id}/plan.json"))
    save_policy(store, BatchPolicy(window_s=DAY_S))  # requests wait in the batch: only rollback forgets them now
    save_rollback(store, enabled=True, floor_points=floor_points)  # 100: any checkpoint meets this floor
    save_keep_superseded(store, keep=True)  # the tests read every version published (by default they are purged)

    def ids_in(block: int, count: int = 2) -> tuple[list[int], list[int]]:
        positions = [int(p) for p in plan.block_ids(block)[:count]]
        return [int(spec["train_ids"][p]) for p in positions], positions

    return store, plan, ids_in


def _versions(registry: RunRegistry, run_id: str, first: int) -> list[tuple[int, dict, Manifest]]:
    key = registry.pointer_key(run_id)
    out = []
    for version in range(first, registry.current(run_id).version + 1):
        pointer = registry.store.read_pointer_version(key, version)
        out.append((version, pointer.target, registry.store.read_manifest(pointer.target["manifest"])))
    return out


def _assert_never_trained_on(manifest: Manifest, *, plan: BlockPlan, positions: list[int], original: Manifest) -> None:
    """No checkpoint the version lists (lineage and members) was trained on ``positions``."""
    first = int(plan.block_of(positions).min())
    deleted = frozenset(int(i) for i in manifest.metadata["chain"]["deleted_ids"])
    for entry in manifest.metadata["lineage"]["blocks"]:
        block = entry["block"]
        if block < first:
            continue
        assert set(positions) <= deleted, f"block {block} listed by a chain that kept the ids"
        assert entry["ids_sha256"] == ids_sha256(effective_block_ids(plan, block=block, deleted=deleted))
        assert entry["checkpoint_sha256"] != original.members[str(block)].sha256  # not the block that saw them
        assert manifest.members[str(block)].sha256 == entry["checkpoint_sha256"]


def test_a_batch_retrain_publishes_each_exact_block_as_it_lands(tmp_path, small_run) -> None:
    url = f"file://{tmp_path / 'store'}"
    store, plan, ids_in = _setup(url, "pg", small_run)
    registry = RunRegistry(store)
    original = registry.manifest(registry.current("pg"))
    ids, positions = ids_in(2)
    ledger = DeletionLedger(store)
    ledger.append(request_id="r1", ids=ids, dataset="digits", reason=None)
    gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert not gate["flush"] and gate["interim"]["runs"]["pg"]["serve_block"] == 1
    audit = ChainWorker(url).unlearn("pg", {"r1": ids})
    assert audit["status"] == "published"
    versions = _versions(registry, "pg", first=2)
    # v2 interim (serves M_1), v3..v5 one per retrained block 2..4 (exact), v6 the full model
    assert [v for v, _, _ in versions] == [2, 3, 4, 5, 6]
    assert [served_block(m) for _, _, m in versions] == [1, 2, 3, 4, 5]
    assert [m.metadata.get("published_for") for _, _, m in versions] == [
        "rollback", "progressive", "progressive", "progressive", None,
    ]  # fmt: skip
    assert [p["block"] for p in audit["progressive_versions"]] == [2, 3, 4]
    for _, target, manifest in versions:
        _assert_never_trained_on(manifest, plan=plan, positions=positions, original=original)
        assert "r1" not in target["applied_requests"] or target is versions[-1][1]
    final_target, final = versions[-1][1], versions[-1][2]
    assert "serve_block" not in final.metadata and final_target["applied_requests"] == ["r1"]
    accuracies = [t["metrics"].get("served_accuracy") for _, t, _ in versions[1:-1]]
    assert all(a is not None for a in accuracies)  # each block's held-out accuracy is on the version
    # a progressive version is a proof by replay too: its M'_2, M'_3 re-train bit for bit
    report = verify_run(url, "pg", version=4, blocks="all")
    assert report["status"] == "passed" and report["blocks_replayed"] == [1, 2, 3], report
    # a gate judging that version (a request accepted while it was served) judges its own M'_3, not
    # the M_3 of the chain it derives from, which saw r1's ids
    pointer = store.read_pointer_version(registry.pointer_key("pg"), 4)
    version = ModelVersion.from_pointer("pg", pointer)
    state = RunState("pg", version, pointer.target, registry.manifest(version))
    judge = heldout_judge(registry, [state])
    retrained, _ = registry.load_chain(registry.current("pg"))
    assert torch.equal(judge.probabilities(shard=0, block=3), shard_probabilities(retrained.model(3), x=judge.x))
    before = shard_probabilities(checkpoint_model(registry, original, 3), x=judge.x)
    assert not torch.equal(judge.probabilities(shard=0, block=3), before)


def _accept_mid_retrain(url: str, run_id: str, first: list[int], later: list[int]) -> dict:
    """Run r1's retrain (``first``) and accept r2 (``later``) once its first block is served; wait for it."""
    store, registry, ledger = ObjectStore(url), RunRegistry(ObjectStore(url)), DeletionLedger(ObjectStore(url))
    ledger.append(request_id="r1", ids=first, dataset="digits", reason=None)
    batch_gate(store, ledger.open_entries(stale_after_s=600.0))  # r1 in block 1: no interim, it flushes now
    ledger.claim("r1", holder="test", lease_s=600.0, max_attempts=3)  # r1 is the running batch
    outcome: dict = {}
    retrain = threading.Thread(target=lambda: outcome.update(ChainWorker(url).unlearn(run_id, {"r1": first})))
    retrain.start()
    deadline = time.monotonic() + 120
    while served_block(registry.manifest(registry.current(run_id))) in (None, 0) and time.monotonic() < deadline:
        time.sleep(0.05)  # the retrain's first block (M'_1) is served
    accepted_at = time.time()
    ledger.append(request_id="r2", ids=later, dataset="digits", reason=None)  # accepted mid-retrain, no pass runs
    retrain.join(timeout=300)
    assert outcome.get("status") == "published", outcome
    assert outcome["published_at"] > accepted_at, "the retrain ended before r2 was accepted; lengthen it"
    return outcome


def test_a_request_accepted_mid_retrain_is_not_held_where_the_held_block_misses_the_floor(tmp_path, small_run):
    url = f"file://{tmp_path / 'store'}"
    store, _plan, ids_in = _setup(url, "fl", small_run, floor_points=0.0)  # no drop at all: M'_1, M'_2 miss it
    outcome = _accept_mid_retrain(url, "fl", ids_in(1)[0], ids_in(3)[0])
    assert outcome["held_by"] == [] and outcome["not_held_below_floor"] == ["r2"]
    assert outcome["progressive_versions"] == []  # nothing below the floor was served on the way
    assert not store.exists("ledger/forgotten/r2.json")  # forgotten only when its own retrain lands
    registry = RunRegistry(store)
    assert "serve_block" not in registry.manifest(registry.current("fl")).metadata  # the full model, r1 applied
    # the next pass judges r2 by the same rule: below the floor, its batch flushes now
    gate = batch_gate(store, DeletionLedger(store).open_entries(stale_after_s=600.0))
    assert gate["flush"] and gate["reason"] == "rollback_below_floor"


def test_a_request_accepted_while_a_retrain_runs_is_rolled_back_by_that_retrain(s3_url, small_run) -> None:
    store, plan, ids_in = _setup(s3_url, "cc", small_run)
    registry = RunRegistry(store)
    original = registry.manifest(registry.current("cc"))
    ids1, positions1 = ids_in(1)
    ids2, positions2 = ids_in(3)
    ledger = DeletionLedger(store)
    outcome = _accept_mid_retrain(s3_url, "cc", ids1, ids2)
    assert outcome["held_by"] == ["r2"]
    forgotten = store.get_json("ledger/forgotten/r2.json")["forgotten_at"]
    assert forgotten < outcome["published_at"]  # rolled back by the running retrain, before it landed
    versions = _versions(registry, "cc", first=2)
    held = False
    for _, target, manifest in versions:
        _assert_never_trained_on(manifest, plan=plan, positions=positions1, original=original)
        held = held or "r2" in (target.get("holds") or {})
        if held:  # from r2's hold on, nothing served saw r2's ids (block 3 and later)
            block = served_block(manifest)
            assert block is None or block < 3
            assert block is None or target["metrics"]["served_accuracy"] is not None  # measured if not recorded
    assert held and ledger.get("r2").status == "pending"
    final_target, final = versions[-1][1], versions[-1][2]
    assert final_target["applied_requests"] == ["r1"] and final_target["holds"] == {"r2": 3}
    assert served_block(final) == 2
    # r2's own retrain (the next batch) releases the hold: the full model is served again
    audit = ChainWorker(s3_url).unlearn("cc", {"r2": ids2})
    assert audit["status"] == "published" and audit["held_by"] == []
    last = registry.manifest(registry.current("cc"))
    assert "serve_block" not in last.metadata and served_block(last) == small_run["blocks"]
    _assert_never_trained_on(last, plan=plan, positions=positions1 + positions2, original=original)
