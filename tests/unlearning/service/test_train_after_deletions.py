"""A run trained after deletion requests were accepted on its store never trains on their ids."""

from __future__ import annotations

from pathlib import Path

from actors.chains import ChainWorker
from flows.train import run_spec
from flows.unlearn import submit_deletion
from flows.verify import verify_run
from obliviate.unlearning.plan import BlockPlan
from storage import ObjectStore
from storage.registry import RunRegistry


def test_a_run_trained_after_a_request_leaves_its_ids_out_and_is_proved_by_replay(tmp_path: Path, tiny_run) -> None:
    url = f"file://{tmp_path / 'store'}"
    ObjectStore(url).ensure_container()
    worker = ChainWorker(url)
    first = run_spec(run_id="before", **tiny_run(split_seed=0))
    worker.train(first)
    ids = [int(first["train_ids"][i]) for i in (150, 390)]
    request = submit_deletion(url, ids, dataset="digits", emit=False)  # accepted, not yet applied anywhere

    later = worker.train(run_spec(run_id="after", **tiny_run(split_seed=0, seed=1)))
    registry = RunRegistry(ObjectStore(url))
    current = registry.current("after")
    assert current is not None and current.version == 1
    assert sorted(current.deleted_ids) == sorted(ids) and list(current.applied_requests) == [request["request_id"]]
    assert later["left_out_ids"] == 2 and later["left_out_for_requests"] == [request["request_id"]]
    chain, _ = registry.load_chain(current)
    spec = registry.spec("after")
    positions, _ = spec.positions(ids)
    assert chain.deleted_ids == frozenset(positions.tolist())
    # Its checkpoints live in a folder named by what they left out, never beside ones trained on the ids.
    folders = {key.split("/")[3] for key in ObjectStore(url).list("runs/after/chains")}
    assert len(folders) == 1 and folders.pop().startswith("train-x")
    # The pass that later applies the request finds this run has nothing to forget.
    assert worker.unlearn("after", {request["request_id"]: ids})["status"] == "already_applied"
    result = verify_run(url, "after", blocks="all")
    assert result["status"] == "passed", result["problems"]


def test_an_interrupted_training_resumed_after_a_request_retrains_from_the_block_before_its_ids(
    tmp_path: Path, tiny_run
) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    worker = ChainWorker(url)
    spec = run_spec(run_id="cut", **tiny_run(split_seed=0))
    worker.train(spec)
    # A crash after every checkpoint was written but before the version was published: the
    # checkpoints M_0..M_4 stay, trained on every id; nothing is published or registered.
    for name in store._names_under("runs/cut/current") + store._names_under("registry"):
        (tmp_path / "store" / name).unlink()
    assert RunRegistry(store).current("cut") is None and RunRegistry(store).run_ids() == []
    plan = BlockPlan.from_dict(store.get_json("runs/cut/plan.json"))
    position = int(plan.block_ids(2)[0])  # a sample of block 2 of 4
    ids = [int(spec["train_ids"][position])]
    submit_deletion(url, ids, dataset="digits", emit=False)

    resumed = worker.train(spec)
    assert resumed["resumed_blocks"] == 1 and resumed["trained_blocks"] == 3  # M_0, M_1 kept; blocks 2..4 retrained
    registry = RunRegistry(store)
    current = registry.current("cut")
    assert current is not None and sorted(current.deleted_ids) == sorted(ids)
    assert verify_run(url, "cut", blocks="all")["status"] == "passed"
