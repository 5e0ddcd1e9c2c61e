"""What a run serves: rolled-back and progressive versions in the registry (issue 11, SPEC section 6).

A published version normally serves its final checkpoint M_B. Two kinds of version serve an
earlier checkpoint, recorded as ``serve_block`` in the manifest metadata and the pointer target:

* an *interim* version (:func:`roll_back`), published the moment a request is accepted: it
  serves ``min(served, d - 1)``, d the earliest block holding one of the request's ids under the
  run's fixed block plan, so it never saw the ids (rule: :func:`obliviate.unlearning.rollback.plan_interim`);
* a *progressive* version, published by a batch's retrain (:mod:`actors.chains`) as each retrained
  block M'_i lands: M'_i was trained from a checkpoint that never saw the batch's ids on data
  without them, so it is exact too, and served accuracy climbs back block by block.

Both keep only the checkpoints M_0..M_s they may serve (``s = serve_block``; ``None``: the run is
paused, only M_0 kept), so their lineage never lists a block trained on a held request's ids,
and record ``chain_of``, the full version whose chain a retrain starts from. The pointer target
carries ``holds`` (request id -> the earliest block holding its ids): every later publish serves
at most ``min(holds) - 1`` until the request is applied, so a request accepted while a retrain
runs stays forgotten when that retrain lands; ``forgotten_requests`` lists what was rolled back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from obliviate.unlearning.chain import Checkpoint
from obliviate.unlearning.config import BlockTrainingConfig, model_from_state
from obliviate.unlearning.lineage import lineage_manifest
from obliviate.unlearning.plan import BlockPlan
from obliviate.unlearning.rollback import ShardCheckpoints, plan_interim
from storage.errors import ObjectNotFound, PointerConflict
from storage.objects import Manifest, ObjectInfo, ObjectStore
from storage.registry import ModelVersion, RunRegistry

ROLLBACK_KEY = "service/rollback.json"
_CAS_ATTEMPTS = 8


def save_rollback(store: ObjectStore, *, enabled: bool, floor_points: float = 2.0) -> None:
    """Record whether accepted requests roll back at once (``serve --rollback``) and the served floor."""
    store.put_json(ROLLBACK_KEY, {"enabled": enabled, "floor_points": floor_points})


def load_rollback(store: ObjectStore) -> dict[str, Any]:
    try:
        return dict(store.get_json(ROLLBACK_KEY))
    except ObjectNotFound:
        return {"enabled": False, "floor_points": 2.0}


def record_forgotten(store: ObjectStore, request_ids: Sequence[str], *, runs: Mapping[str, Any]) -> None:
    """Record when each request became forgotten (first time only): ``ledger/forgotten/<request>.json``."""
    now = time.time()
    for request_id in request_ids:
        key = f"ledger/forgotten/{request_id}.json"
        if not store.exists(key):
            store.put_json(key, {"request_id": request_id, "forgotten_at": now, "runs": dict(runs)})


def pointer_target(registry: RunRegistry, run_id: str) -> tuple[ModelVersion | None, dict[str, Any]]:
    """The current version and its raw pointer target (``serve_block``, ``holds``, ``forgotten_requests``)."""
    pointer = registry.store.read_pointer(registry.pointer_key(run_id))
    if pointer is None:
        return None, {}
    return ModelVersion.from_pointer(run_id, pointer), dict(pointer.target)


def chain_source(version: ModelVersion, manifest: Manifest) -> tuple[int, str]:
    """``(version, manifest key)`` of the full chain a version derives from (itself when it is full)."""
    source = manifest.metadata.get("chain_of")
    if source:
        return int(source["version"]), str(source["manifest"])
    return version.version, version.manifest_key


def served_block(manifest: Manifest) -> int | None:
    """The checkpoint a version serves: ``serve_block`` when rolled back, else its last one (M_B)."""
    if "serve_block" in manifest.metadata:
        block = manifest.metadata["serve_block"]
        return None if block is None else int(block)
    return max(int(k) for k in manifest.members)


def served_checkpoint(registry: RunRegistry, version: ModelVersion) -> tuple[Checkpoint | None, Manifest]:
    """The checkpoint a version serves (loaded alone, checksum-verified), or ``None`` when paused."""
    manifest = registry.manifest(version)
    block = served_block(manifest)
    if block is None:
        return None, manifest
    member = manifest.members[str(block)]
    return registry.load_checkpoint(member.key, expected=member), manifest


def served_model(registry: RunRegistry, run_id: str) -> nn.Module | None:
    """The model run ``run_id`` serves now: M_B, M_s of a rolled-back version, or ``None`` (paused / untrained)."""
    current = registry.current(run_id)
    if current is None:
        return None
    checkpoint, manifest = served_checkpoint(registry, current)
    if checkpoint is None:
        return None
    config = BlockTrainingConfig.from_dict(manifest.metadata["chain"]["config"])
    return model_from_state(config, checkpoint.model_state)


def first_blocks(
    registry: RunRegistry, run_id: str, requests: Mapping[str, Sequence[int]], *, deleted: frozenset[int] | set[int]
) -> dict[str, int]:
    """Request id -> the earliest block (fixed plan) holding one of its ids this run trained on and not deleted."""
    spec = registry.spec(run_id)
    plan = BlockPlan.from_dict(registry.store.get_json(f"runs/{run_id}/plan.json"))
    out: dict[str, int] = {}
    for request_id, ids in requests.items():
        positions = [int(p) for p in spec.positions([int(i) for i in ids])[0] if int(p) not in deleted]
        if positions:
            out[request_id] = int(plan.block_of(positions).min())
    return out


def serve_cap(holds: Mapping[str, int]) -> int | None:
    """The newest block any version may serve while ``holds`` wait (``None``: no cap)."""
    return min(holds.values()) - 1 if holds else None


def partial_lineage(
    *, config: BlockTrainingConfig, plan: BlockPlan, deleted_ids: frozenset[int], members: Mapping[int, ObjectInfo]
) -> dict[str, Any]:
    """The lineage manifest (:func:`obliviate.unlearning.lineage.lineage_manifest`) of M_0..M_s only."""
    return lineage_manifest(
        config=config,
        plan=plan,
        deleted_ids=deleted_ids,
        checkpoint_sha256={i: info.sha256 for i, info in members.items()},
        through_block=max(members),
    )


def publish_served(
    registry: RunRegistry,
    run_id: str,
    *,
    chain_name: str,
    chain_meta: Mapping[str, Any],
    members: Mapping[int, ObjectInfo],
    serve: int | None,
    chain_of: Mapping[str, Any],
    target: Mapping[str, Any],
    metadata: Mapping[str, Any],
    expected_version: int,
) -> ModelVersion:
    """Publish a version serving M_serve that keeps only M_0..M_serve (CAS on ``expected_version``).

    Raises:
        PointerConflict: another publisher moved the pointer first.
    """
    keep = {i: info for i, info in members.items() if i <= (serve or 0)}
    config = BlockTrainingConfig.from_dict(chain_meta["config"])
    plan = BlockPlan.from_dict(chain_meta["plan"])
    deleted = frozenset(int(i) for i in chain_meta["deleted_ids"])
    partial_chain = {**chain_meta, "checkpoints": [c for c in chain_meta["checkpoints"] if c["block_index"] in keep]}
    return registry.publish(
        run_id,
        chain_name=chain_name,
        members=keep,
        metadata={
            **metadata,
            "chain": partial_chain,
            "chain_of": dict(chain_of),
            "serve_block": serve,
            "lineage": partial_lineage(config=config, plan=plan, deleted_ids=deleted, members=keep),
        },
        pointer_target={**target, "serve_block": serve},
        expected_version=expected_version,
    )


def shard_runs(store: ObjectStore) -> set[str]:
    """Every run that is a shard of a sharded run (listed as a member by some ``groups/<run>.json``)."""
    members: set[str] = set()
    for key in store.list("groups/"):
        if key.endswith(".json"):
            members.update(str(m) for m in store.get_json(key).get("members", ()))
    return members


def roll_back(
    registry: RunRegistry,
    run_id: str,
    requests: Mapping[str, Sequence[int]],
    *,
    floor_points: float,
    is_shard: bool = False,
) -> dict[str, Any] | None:
    """Publish an interim version of ``run_id`` that never saw the ids of ``requests`` (request id -> ids).

    A single chain publishes M_{d-1} only if it meets the floor; a shard of a sharded run always
    rolls back, and leaves the vote (pauses) when nothing before block d is a model: the other
    shards serve (the group's accuracy is not judged here, see docs/unlearning.md).

    Idempotent: requests already held change nothing. Lost races (a retrain publishing a block
    meanwhile) are retried on the newer version.

    Returns:
        ``None`` if no request touches the run, else ``{"serve_block", "accuracy", "version",
        "flush_now", "published"}`` (``flush_now``: the interim is below the served floor, the
        reference accuracy minus ``floor_points``; then nothing is published and ``below_floor``
        lists the requests that stay unforgotten until their retrain lands).
    """
    for _ in range(_CAS_ATTEMPTS):
        current, target = pointer_target(registry, run_id)
        if current is None:
            return None
        manifest = registry.manifest(current)
        chain_meta = manifest.metadata["chain"]
        deleted = frozenset(int(i) for i in chain_meta["deleted_ids"])
        todo = {r: ids for r, ids in requests.items() if r not in current.applied_requests}
        firsts = first_blocks(registry, run_id, todo, deleted=deleted)
        if not firsts:
            return None
        holds = {**{str(k): int(v) for k, v in (target.get("holds") or {}).items()}, **firsts}
        accuracies = tuple(c.get("heldout_accuracy") for c in chain_meta["checkpoints"])
        served_now = served_block(manifest)
        reference = manifest.metadata.get("reference_accuracy", accuracies[-1]) or 0.0
        full_accuracies = accuracies + (None,) * (int(chain_meta["config"]["num_blocks"]) + 1 - len(accuracies))
        interim = plan_interim(
            shards=[ShardCheckpoints(0, full_accuracies, served_now)],
            affected={0: min(firsts.values())},
            served_floor=reference - floor_points / 100,
            shard_floor=0.0,
        )
        block = interim.served[0]
        if not interim.publish and not is_shard:
            # The issue-11 floor: a below-floor interim is never served; the run keeps its version
            # (which still holds the ids) and the batch flushes now, so the request is forgotten
            # when its retrain lands rather than at acceptance.
            return {
                "serve_block": served_now,
                "accuracy": interim.accuracy,
                "version": current.version,
                "flush_now": True,
                "published": False,
                "below_floor": sorted(firsts),
            }
        if block == served_now and set(firsts) <= set(target.get("holds") or {}):
            return {
                "serve_block": block,
                "accuracy": interim.accuracy,
                "version": current.version,
                "flush_now": interim.flush_now,
                "published": False,
            }
        forgotten = sorted(set(target.get("forgotten_requests") or []) | set(firsts))
        version_of, manifest_of = chain_source(current, manifest)
        try:
            version = publish_served(
                registry,
                run_id,
                chain_name=f"interim-{current.version:06d}-{block}",
                chain_meta=chain_meta,
                members={int(k): v for k, v in manifest.members.items()},
                serve=block,
                chain_of={"version": version_of, "manifest": manifest_of},
                target={
                    **{k: v for k, v in target.items() if k != "manifest"},
                    "metrics": {**current.metrics, "served_accuracy": interim.accuracy},
                    "forgotten_requests": forgotten,
                    "holds": holds,
                },
                metadata={
                    **{k: v for k, v in manifest.metadata.items() if k not in ("lineage",)},
                    "interim_for": sorted(firsts),
                    "record": None,
                    "reference_accuracy": reference,
                    "published_for": "rollback",
                    "published_at": time.time(),
                },
                expected_version=current.version,
            )
        except PointerConflict:
            continue
        return {
            "serve_block": block,
            "accuracy": interim.accuracy,
            "version": version.version,
            "flush_now": interim.flush_now,
            "published": True,
        }
    raise PointerConflict(f"run {run_id}: the version pointer kept moving over {_CAS_ATTEMPTS} rollback attempts.")


def release(registry: RunRegistry, run_id: str, request_ids: set[str] | frozenset[str]) -> ModelVersion | None:
    """Drop the holds of requests refused or withdrawn before they were applied; serve what they held back.

    The newest block the remaining holds allow of the full chain the current version derives from
    is served again (its final model when no hold remains). A version of a retrain in flight is left
    alone: that retrain drops such holds itself after its next block.

    Returns:
        the published version, or ``None`` if nothing was held by these requests.
    """
    for _ in range(_CAS_ATTEMPTS):
        current, target = pointer_target(registry, run_id)
        if current is None or "retraining" in target:
            return None
        holds = {str(k): int(v) for k, v in (target.get("holds") or {}).items()}
        if not set(holds) & set(request_ids):
            return None
        remaining = {r: b for r, b in holds.items() if r not in request_ids}
        version_of, key_of = chain_source(current, registry.manifest(current))
        full = registry.store.read_manifest(key_of)
        members = {int(k): v for k, v in full.members.items()}
        kept = {k: v for k, v in target.items() if k not in ("manifest", "serve_block", "holds", "forgotten_requests")}
        metadata = {k: v for k, v in full.metadata.items() if k not in ("serve_block", "chain_of", "interim_for")}
        try:
            if not remaining:
                return registry.publish(
                    run_id,
                    chain_name=f"release-{current.version:06d}",
                    members=members,
                    metadata={**metadata, "published_for": "release", "released": sorted(set(holds) - set(remaining))},
                    pointer_target={**kept, "metrics": dict(full.metadata.get("metrics") or current.metrics)},
                    expected_version=current.version,
                )
            cap = serve_cap(remaining)
            return publish_served(
                registry,
                run_id,
                chain_name=f"release-{current.version:06d}-{cap}",
                chain_meta=full.metadata["chain"],
                members=members,
                serve=cap if cap and cap > 0 else None,
                chain_of={"version": version_of, "manifest": key_of},
                target={**kept, "holds": remaining, "forgotten_requests": sorted(remaining)},
                metadata={**metadata, "published_for": "release", "interim_for": sorted(remaining)},
                expected_version=current.version,
            )
        except PointerConflict:
            continue
    raise PointerConflict(f"run {run_id}: the version pointer kept moving over {_CAS_ATTEMPTS} release attempts.")
