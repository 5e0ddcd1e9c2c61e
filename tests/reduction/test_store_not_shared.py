"""A reduction worker whose node reads another store at the flow's URL stops before computing or writing.

On a joined cluster a ``file://`` store that only the driver's machine has is, to a worker on another node, an empty
(or another) folder at the same path; a worker that reaches another S3 endpoint sees another bucket. The reduce flow
writes the matrix's plan before it hands out any tile, so a worker that cannot read the plan is not on the flow's
store. Before, such a worker wrote its tiles to its own node's disk (lost to the flow and to the next run's reuse),
and a streaming restart worker failed with "no object at .../plan.json".
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from actors.reduction import ReductionWorker
from obliviate.data import load_dataset
from obliviate.reduction.mi import prepare_images
from obliviate.reduction.tiling import TilePlan
from storage import ObjectStore
from storage.errors import StoreNotShared
from storage.tiles import DIAGONAL, PLAN, matrix_prefix, stored_tiles


@pytest.fixture(scope="module")
def digits_pool():
    data = load_dataset("digits")
    return data.subset(np.arange(0, 1797, 9)[:120])


def _node_view(store: ObjectStore, tmp_path) -> ObjectStore:
    """The same kind of store as another node sees it at the flow's URL: another folder, another bucket."""
    if store.is_local:
        return ObjectStore(f"file://{tmp_path}/other-node/store")
    node = ObjectStore(f"s3://node-{uuid.uuid4().hex[:10]}/runs")
    node.ensure_container()
    return node


def _flow_writes_plan(store: ObjectStore, data, worker: ReductionWorker) -> tuple[TilePlan, str]:
    """What the reduce flow writes before it hands out tiles (flows.reduce.compute_tiles)."""
    plan = TilePlan(n=len(data), tile_size=48)
    prefix = matrix_prefix(fingerprint=data.fingerprint, bins=256, normalize=False, tile_size=48)
    store.put_array(f"{prefix}/{DIAGONAL}", worker.diagonal(normalize=False))
    store.put_json(f"{prefix}/{PLAN}", {"n": plan.n, "tile_size": plan.tile_size})
    return plan, prefix


def _said_not_shared(said: str, node: ObjectStore, prefix: str, what: str) -> None:
    assert said.startswith(
        f"the MI matrix's plan {node.uri(prefix)}/{PLAN} is not in the store as this process (pid "
    ), said
    assert "is not the one the reduce flow wrote it in before handing out this work" in said, said
    assert ("a folder every node mounts at the same path (NFS, EFS)" if node.is_local else "AWS_ENDPOINT_URL") in said
    assert said.endswith(f"; {what} stopped without writing"), said


def test_a_tile_worker_on_a_node_without_the_flows_store_writes_no_tile_and_says_why(store, digits_pool, tmp_path):
    worker = ReductionWorker()
    worker.use_images("pool", prepare_images(digits_pool.images, levels=digits_pool.levels, bins=256))
    plan, prefix = _flow_writes_plan(store, digits_pool, worker)
    node = _node_view(store, tmp_path)
    first = plan.tiles()[0]

    with pytest.raises(StoreNotShared) as raised:
        worker.compute(first, key="pool", store=node, prefix=prefix, normalize=False, return_values=False)

    _said_not_shared(str(raised.value), node, prefix, f"tile {first.name}")
    assert node.list("") == [] and node.list_pointers("") == []  # nothing written where the flow cannot see it
    assert not (tmp_path / "other-node").exists()  # not even the folder
    # The same worker, handed the flow's store, computes and commits the tile there.
    out = worker.compute(first, key="pool", store=store, prefix=prefix, normalize=False, return_values=False)
    assert out["bytes"] > 0 and stored_tiles(store, prefix, plan) == {first}


def test_a_streaming_restart_worker_on_a_node_without_the_flows_store_says_why(store, digits_pool, tmp_path):
    worker = ReductionWorker()
    worker.use_images("pool", prepare_images(digits_pool.images, levels=digits_pool.levels, bins=256))
    plan, prefix = _flow_writes_plan(store, digits_pool, worker)
    node = _node_view(store, tmp_path)

    with pytest.raises(StoreNotShared) as raised:
        worker.use_matrix("m1", None, store=node, prefix=prefix, memory_bytes=plan.band_bytes)

    _said_not_shared(str(raised.value), node, prefix, "the restart stage")
    with pytest.raises(RuntimeError, match="use_matrix first"):  # it holds no matrix it could run restarts on
        worker.run([0, 1], key="m1", k=5)
