"""``store check --repair`` rebuilds a damaged checkpoint of an exact retrain chain bit for bit.

A retrain evaluates held-out accuracy only on the blocks it serves and on M_B, so its middle
checkpoints record none; the replay evaluated every block, its bytes differed in that one field,
and repair called the checkpoint "not produced by exact training" (while ``verify`` proved it was).
The replay now evaluates exactly where the chain did.
"""

from __future__ import annotations

from pathlib import Path

from actors.chains import ChainWorker
from flows.repair import check_and_repair
from flows.settle import run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from obliviate.unlearning.plan import BlockPlan
from storage import ObjectStore
from storage.ledger import DONE
from storage.registry import TRAIN_CHAIN, RunRegistry


def test_a_truncated_middle_checkpoint_of_a_retrain_chain_is_rebuilt(tmp_path: Path, tiny_run) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    worker = ChainWorker(url)
    spec = run_spec(run_id="r1", **tiny_run(split_seed=0, blocks=3, train_size=300, heldout_size=100))
    worker.train(spec)
    plan = BlockPlan.from_dict(store.get_json("runs/r1/plan.json"))
    ids = [int(spec["train_ids"][int(plan.block_ids(1)[0])])]  # block 1: blocks 1..3 are retrained
    request = submit_deletion(url, ids, dataset="digits", emit=False)["request_id"]
    settled = run_pass(url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})
    assert settled["settled"] == {request: DONE}

    registry = RunRegistry(store)
    manifest = registry.manifest(registry.current("r1"))
    key = manifest.members["2"].key
    assert f"/chains/{TRAIN_CHAIN}/" not in key  # the retrain's own chain
    assert registry.load_checkpoint(key).heldout_accuracy is None  # not served, so not evaluated
    original = store.get_bytes(key)
    path = tmp_path / "store" / key
    path.write_bytes(path.read_bytes()[:100])

    report = check_and_repair(url, repair=True, min_orphan_age_s=0)
    assert report.unrecoverable == [], report.unrecoverable
    assert [r["key"] for r in report.repaired] == [key] and report.healthy
    assert store.get_bytes(key) == original
    assert check_and_repair(url, repair=False, min_orphan_age_s=0).healthy
