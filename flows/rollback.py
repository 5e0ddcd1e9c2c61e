"""Exact forgetting at acceptance, by rollback (SPEC section 6): interim versions for every affected run.

When ``serve --rollback`` is on, every run an accepted request affects publishes an *interim*
version at once (:func:`storage.serving.roll_back`): it serves the last checkpoint before the
request's earliest affected block, M_{d-1}, which never saw the ids, and keeps only M_0..M_{d-1}.
Its pointer target carries ``serve_block`` (``None``: nothing can be served, the run is paused
until its retrain lands), ``holds`` and ``forgotten_requests``; :func:`served_model` is what
anything serving or auditing a run must load. When M_{d-1} is below the served-accuracy floor
(the pre-deletion accuracy minus ``floor_points``) nothing is published, the run keeps serving
its version and the batch flushes now: those requests become forgotten when their retrain lands
(``serve --floor-points 100`` accepts any drop, so every request rolls back at once unless its ids
lie in block 1 of a single chain: M_0 is no model, so that batch flushes now too). The batch's retrain starts from the full chain the interim
derives from (``chain_of``), publishes each retrained block as it lands (progressive versions,
:mod:`actors.chains`), and finally the full model, whose ``serve_block`` is absent unless a
request accepted meanwhile still holds it back.

The time each request became forgotten is kept in ``ledger/forgotten/<request>.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from storage.ledger import CANCELLED, REJECTED, DeletionLedger
from storage.objects import ObjectStore
from storage.registry import RunRegistry
from storage.serving import (
    ROLLBACK_KEY,
    load_rollback,
    pointer_target,
    record_forgotten,
    release,
    roll_back,
    save_rollback,
    served_model,
    shard_runs,
)

__all__ = [
    "ROLLBACK_KEY",
    "load_rollback",
    "publish_interim",
    "record_forgotten",
    "release_refused",
    "save_rollback",
    "served_model",
]


def publish_interim(store: ObjectStore, pending: Sequence[Any], *, floor_points: float) -> dict[str, Any]:
    """Publish an interim version for every run the pending requests affect; returns what was done.

    Returns:
        ``{"flush_now": bool, "runs": {run_id: {"serve_block", "accuracy", "version", "published"}}}``.
    """
    registry = RunRegistry(store)
    out: dict[str, Any] = {"flush_now": False, "runs": {}}
    unforgotten: set[str] = set()
    shards = shard_runs(store)
    for run_id in registry.run_ids():
        spec = registry.spec(run_id)
        requests = {
            e.request_id: [int(i) for i in e.request["ids"]]
            for e in pending
            if e.request.get("dataset") == spec.dataset
        }
        if not requests:
            continue
        done = roll_back(registry, run_id, requests, floor_points=floor_points, is_shard=run_id in shards)
        if done is not None:
            out["flush_now"] = out["flush_now"] or done.pop("flush_now")
            unforgotten.update(done.get("below_floor", ()))
            out["runs"][run_id] = done
    forgotten = [e.request_id for e in pending if e.request_id not in unforgotten]
    record_forgotten(store, forgotten, runs=out["runs"])
    return out


def release_refused(store: ObjectStore) -> dict[str, list[str]]:
    """Release every hold of a request that was rejected or cancelled before it was applied (run -> released).

    A refused request forgets nothing, so the runs it rolled back serve their full model again (or
    the newest block other holds allow); run by the batch gate of every pass.
    """
    registry, ledger = RunRegistry(store), DeletionLedger(store)
    out: dict[str, list[str]] = {}
    for run_id in registry.run_ids():
        _, target = pointer_target(registry, run_id)
        refused = set()
        for request_id in target.get("holds") or {}:
            if ledger.exists(request_id) and ledger.get(request_id).status in (REJECTED, CANCELLED):
                refused.add(request_id)
        if refused and release(registry, run_id, refused) is not None:
            out[run_id] = sorted(refused)
    return out
