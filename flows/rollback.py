"""Exact forgetting at acceptance, by rollback (SPEC section 6): interim versions in the store.

When ``serve --rollback`` is on and a request waits in the open batch, every run it affects
publishes an *interim* version at once: the same stored chain, but the model it serves is the
last checkpoint before the request's earliest affected block, M_{d-1}, which never saw the ids
(:func:`obliviate.unlearning.rollback.plan_interim` with one chain). The interim version's
pointer target carries ``serve_block`` (``None``: nothing can be served, the run is paused until
its retrain lands) and ``forgotten_requests``; :func:`served_model` is what anything serving or
auditing a run must load. When M_{d-1} is below the served-accuracy floor (final accuracy minus
``floor_points``) the batch flushes now; the interim version is still published (exactness first).
The batch's retrain then starts from the interim version's chain (it applied nothing) and
publishes a full version, whose ``serve_block`` is absent (the final model).

The time each request became forgotten is kept in ``ledger/forgotten/<request>.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from obliviate.unlearning.plan import BlockPlan
from obliviate.unlearning.rollback import ShardCheckpoints, plan_interim
from storage.errors import ObjectNotFound
from storage.objects import ObjectStore
from storage.registry import RunRegistry

ROLLBACK_KEY = "service/rollback.json"


def save_rollback(store: ObjectStore, *, enabled: bool, floor_points: float = 2.0) -> None:
    store.put_json(ROLLBACK_KEY, {"enabled": enabled, "floor_points": floor_points})


def load_rollback(store: ObjectStore) -> dict[str, Any]:
    try:
        return dict(store.get_json(ROLLBACK_KEY))
    except ObjectNotFound:
        return {"enabled": False, "floor_points": 2.0}


def served_model(registry: RunRegistry, run_id: str) -> nn.Module | None:
    """The model run ``run_id`` serves now: M_B, or M_{serve_block} of an interim version, or None (paused)."""
    current = registry.current(run_id)
    if current is None:
        return None
    chain, manifest = registry.load_chain(current)
    if "serve_block" not in manifest.metadata:
        return chain.model()
    block = manifest.metadata["serve_block"]
    return None if block is None else chain.model(int(block))


def publish_interim(store: ObjectStore, pending: Sequence[Any], *, floor_points: float) -> dict[str, Any]:
    """Publish an interim version for every run the pending requests affect; returns what was done.

    Returns:
        ``{"flush_now": bool, "runs": {run_id: {"serve_block", "accuracy", "version"}}}``.
    """
    registry = RunRegistry(store)
    now = time.time()
    out: dict[str, Any] = {"flush_now": False, "runs": {}}
    specs = {run_id: registry.spec(run_id) for run_id in registry.run_ids()}
    for run_id, spec in specs.items():
        requests = {
            e.request_id: [int(i) for i in e.request["ids"]]
            for e in pending
            if e.request.get("dataset") == spec.dataset
        }
        current = registry.current(run_id)
        if current is None or not requests:
            continue
        manifest = registry.manifest(current)
        chain_meta = manifest.metadata["chain"]
        deleted = {int(i) for i in chain_meta["deleted_ids"]}
        plan = BlockPlan.from_dict(chain_meta["plan"])
        positions = [
            int(p)
            for p in spec.positions(sorted({i for ids in requests.values() for i in ids}))[0]
            if int(p) not in deleted
        ]
        if not positions:
            continue
        first = int(plan.block_of(positions).min())
        accuracies = tuple(c.get("heldout_accuracy") for c in chain_meta["checkpoints"])
        served_now = manifest.metadata.get("serve_block", len(accuracies) - 1)
        final = accuracies[-1] or 0.0
        interim = plan_interim(
            shards=[ShardCheckpoints(0, accuracies, served_now)],
            affected={0: first},
            served_floor=final - floor_points / 100,
            shard_floor=0.0,
        )
        block = interim.served[0]
        out["flush_now"] = out["flush_now"] or interim.flush_now
        if block == served_now and "serve_block" in manifest.metadata:
            out["runs"][run_id] = {"serve_block": block, "accuracy": interim.accuracy, "version": current.version}
            continue
        forgotten = sorted(set(current.applied_requests) | set(requests))
        version = registry.publish(
            run_id,
            chain_name=f"interim-{current.version:06d}-{block}",
            members={int(k): v for k, v in manifest.members.items()},
            metadata={**manifest.metadata, "serve_block": block, "interim_for": sorted(requests), "record": None},
            pointer_target={
                "applied_requests": list(current.applied_requests),
                "deleted_ids": list(current.deleted_ids),
                "metrics": {**current.metrics, "served_accuracy": interim.accuracy},
                "serve_block": block,
                "forgotten_requests": forgotten,
            },
            expected_version=current.version,
        )
        out["runs"][run_id] = {"serve_block": block, "accuracy": interim.accuracy, "version": version.version}
    for entry in pending:
        key = f"ledger/forgotten/{entry.request_id}.json"
        if not store.exists(key):
            store.put_json(key, {"request_id": entry.request_id, "forgotten_at": now, "runs": out["runs"]})
    return out
