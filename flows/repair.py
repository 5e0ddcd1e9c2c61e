"""Repairing a store: rebuild damaged chain checkpoints by deterministic replay (``store check --repair``).

Exact training is bit-identical (SPEC 4-5: every block's randomness comes from the chain seed and
the block index), so checkpoint M_i of a chain is a pure function of M_(i-1), the run's data, its
block plan and the ids excluded when the chain was trained. :func:`rebuild_checkpoint` replays
that one block and rewrites the object only if the replayed bytes hash to the checksum recorded
when it was first committed (and pinned by every manifest that uses it). Anything else (a
DeepObliviate checkpoint, a damaged predecessor that cannot be rebuilt, a damaged manifest or run
spec) is reported as unrecoverable with the runs and versions that depend on it.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from obliviate.data import load_dataset
from obliviate.errors import ConfigError
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.plan import BlockPlan
from obliviate.unlearning.service import block_data
from storage.check import (
    StoreReport,
    check_store,
    claim_of_training,
    collect_orphans,
    filings_in_flight,
    live_claims,
    prune_versions,
)
from storage.errors import CorruptObject, ObjectNotFound
from storage.lease import holder_text
from storage.objects import ObjectInfo, ObjectStore
from storage.registry import RunRegistry
from storage.tiles import MI_TILES, drop_matrix_object

if TYPE_CHECKING:  # torch is imported where a checkpoint is replayed: `store check` alone needs none
    from obliviate.unlearning.chain import Checkpoint

_CKPT = re.compile(r"^runs/(?P<run>[^/]+)/chains/(?P<chain>[^/]+)/ckpt-(?P<index>\d{4})\.(?P<ext>pt|json)$")
_VERSION_POINTER = re.compile(r"^runs/[^/]+/current/v\d+\.json$")  # storage.registry: runs/<run>/current


#: Beside a live writer (a running serve, a training, a deletion pass), an orphan younger than this may be one of its
#: writes in flight: a temporary file not yet linked, or bytes not yet committed (a checkpoint's, a claim's or lease's).
#: Collecting it fails that write.
MIN_ORPHAN_AGE_BESIDE_WRITERS_S = 60.0
# How live_writers names a running serve: the one writer that does not finish by itself.
_SERVE_WRITER = "the live `obliviate serve` of "


def live_writers(store: ObjectStore) -> list[str]:
    """Who writes ``store`` now, as far as the store says: a serve that announced itself, each claim held live, each
    request being filed.

    A ``train`` holds its run's training claim and a deletion pass the store's pass claim (:func:`live_claims`) on
    this host or any other that shares the store. A ``forget`` holds none: a request it is filing shows as a
    half-filed one whose open marker is younger than :data:`MIN_ORPHAN_AGE_BESIDE_WRITERS_S`
    (:func:`storage.check.filings_in_flight`).
    """
    from flows.unlearn import SERVE_LIVE, served_endpoint

    writers = []
    api_url, why = served_endpoint(store)
    if why == SERVE_LIVE:
        writers.append(f"{_SERVE_WRITER}{store.url}{f' (announced through {api_url})' if api_url else ''}")
    for claim in live_claims(store):
        who, run = holder_text(claim.target), claim_of_training(claim.key)
        writers.append(f"the training of run {run!r} by {who}" if run else f"the deletion pass of {who}")
    for request_id, age_s, who in filings_in_flight(store, younger_than_s=MIN_ORPHAN_AGE_BESIDE_WRITERS_S):
        writers.append(
            f"the filing of request {request_id!r} by a `forget`{f', {who}' if who else ''} (its open marker is "
            f"{age_s:.0f} s old, its record not committed yet)"
        )
    return writers


def refuse_young_orphans_beside_writers(store: ObjectStore, *, min_orphan_age_s: float) -> None:
    """Refuse ``--repair --orphan-age`` below :data:`MIN_ORPHAN_AGE_BESIDE_WRITERS_S` while :func:`live_writers` write.

    ``--orphan-age 0`` beside a running serve deleted the temporary files of its pass claim's writes between their
    write and their link, and serve's pass failed with "could not write ... does not exist (any more)"; beside a
    running ``obliviate train`` it deleted a checkpoint's temporary before its rename, and the training failed the
    same way.

    Raises:
        ConfigError: someone writes ``store`` now and ``min_orphan_age_s`` is below the floor.
    """
    if min_orphan_age_s >= MIN_ORPHAN_AGE_BESIDE_WRITERS_S:
        return
    writers = live_writers(store)
    if not writers:
        return
    serving = any(writer.startswith(_SERVE_WRITER) for writer in writers)
    until_serve_stops = " (a serve writes for as long as it runs: stop it first)" if serving else ""
    shown = "; ".join(writers[:3]) + (f"; and {len(writers) - 3} more" if len(writers) > 3 else "")
    raise ConfigError(
        f"--orphan-age {min_orphan_age_s:g} would collect writes in flight of {shown}: while a command writes the "
        f"store, orphans must be at least {MIN_ORPHAN_AGE_BESIDE_WRITERS_S:g} s old to be collected (a write in "
        f"flight is younger). Pass --orphan-age {MIN_ORPHAN_AGE_BESIDE_WRITERS_S:g} or more, or repair once they "
        f"finished{until_serve_stops}."
    )


def check_and_repair(
    store_url: str, *, repair: bool, min_orphan_age_s: float = 600.0, keep_versions: int | None = None
) -> StoreReport:
    """``obliviate store check [--repair] [--keep-versions N]``: check; with ``repair``, rebuild and collect orphans.

    ``keep_versions``: retention (:func:`storage.check.prune_versions`): with ``repair`` the versions
    of each run older than its newest N are pruned first (what only they used is deleted); without
    it, the report says what would be. ``None`` (the default) keeps every version.
    """
    store = ObjectStore(store_url)
    if repair:
        refuse_young_orphans_beside_writers(store, min_orphan_age_s=min_orphan_age_s)
    pruned = None if keep_versions is None else prune_versions(store, keep=keep_versions, apply=repair)
    report = check_store(store, min_age_s=min_orphan_age_s)
    report.pruned = pruned
    if not repair:
        for item in report.corrupt:
            item["repairable_by_replay"] = is_checkpoint(item["key"])
        return report
    # A lost object nothing needs is garbage: collected below with the other orphans, not rebuilt.
    damaged = sorted(
        ({item["key"] for item in report.corrupt} | {p["key"] for p in report.lineage if is_checkpoint(p["key"])})
        - set(report.orphans),
        key=_block_order,
    )
    registry = RunRegistry(store)
    results = {item["key"]: item["part_of"] for item in report.corrupt if item.get("part_of")}
    damage = {item["key"]: item for item in report.corrupt}
    for key in damaged:
        if key.startswith(f"{MI_TILES}/"):
            report.repaired.append(_drop_damaged_matrix_object(store, key))
            continue
        if key.startswith("ledger/") or _VERSION_POINTER.match(key):
            # a ledger record or a version of a run's version pointer: not replayable; the check said what it
            # loses and exactly how to mend it, which replay's "not a chain checkpoint" would replace
            said = damage[key]
            report.unrecoverable.append({"key": key, "error": said["error"], "needed_by": said.get("needed_by", [])})
            continue
        if key in results:  # a reduce result's file: not a replayable checkpoint, and the result is cheap to redo
            report.unrecoverable.append(
                {
                    "key": key,
                    "error": "a file of a reduce result, not rebuildable by replay: running the same `obliviate "
                    "reduce` again rewrites the result",
                    "part_of": results[key],
                }
            )
            continue
        try:
            report.repaired.append(rebuild_checkpoint(registry, key))
        except (CorruptObject, ObjectNotFound, ValueError, KeyError) as err:
            needed = next((c.get("needed_by", []) for c in report.corrupt if c["key"] == key), [])
            report.unrecoverable.append({"key": key, "error": str(err), "needed_by": needed})
    collect_orphans(store, report)
    after = check_store(store, min_age_s=min_orphan_age_s)
    report.corrupt, report.lineage = after.corrupt, after.lineage
    report.deleted_ids_held, report.unfinished_trainings = after.deleted_ids_held, after.unfinished_trainings
    return report


def is_checkpoint(key: str) -> bool:
    """Whether ``key`` is a chain checkpoint (or its timing record), the objects replay rebuilds."""
    return bool(_CKPT.match(key))


def _drop_damaged_matrix_object(store: ObjectStore, key: str) -> dict[str, Any]:
    """Delete a damaged part of a stored MI matrix: a cache that the next ``reduce`` of its data computes again."""
    drop_matrix_object(store, key)
    return {
        "key": key,
        "how": "deleted (an MI matrix cache): the next `obliviate reduce` of that data computes it again",
    }


def _block_order(key: str) -> tuple[str, int, str]:
    match = _CKPT.match(key)
    return (match.group("run"), int(match.group("index")), key) if match else ("~", 0, key)


def rebuild_checkpoint(registry: RunRegistry, key: str) -> dict[str, Any]:
    """Rebuild one damaged checkpoint (or its timing sidecar) by replaying its block.

    Raises:
        CorruptObject: the replay does not reproduce the committed bytes, or its inputs are damaged.
        ObjectNotFound: no published version uses the chain this checkpoint belongs to.
    """
    from obliviate.unlearning.trainer import BlockTrainer, initial_checkpoint

    store = registry.store
    match = _CKPT.match(key)
    if match is None:
        raise CorruptObject(f"{store.uri(key)} is not a chain checkpoint; only checkpoints can be rebuilt by replay.")
    run_id, chain_name, index = match.group("run"), match.group("chain"), int(match.group("index"))
    if match.group("ext") == "json":  # the timing sidecar: informational only
        store.put_json(key, {"seconds": None, "rebuilt": True})
        return {"key": key, "how": "timing sidecar rewritten (its time is unknown now)"}
    manifest = _publishing_manifest(store, run_id, chain_name)
    expected = _committed_sha256(store, key, manifest.members.get(str(index)))
    chain_meta = manifest.metadata["chain"]
    config = BlockTrainingConfig.from_dict(chain_meta["config"])
    plan = BlockPlan.from_dict(chain_meta["plan"])
    spec = registry.spec(run_id)
    data = block_data(spec, dataset=load_dataset(spec.dataset))
    if index == 0:
        rebuilt = initial_checkpoint(config, data=data)
    else:
        predecessor = manifest.members.get(str(index - 1))
        if predecessor is None:
            raise ObjectNotFound(f"manifest {manifest.key} has no checkpoint {index - 1} to replay from.")
        start = registry.load_checkpoint(predecessor.key, expected=predecessor)
        excluded = frozenset(int(i) for i in chain_meta.get("deleted_ids", []))
        trainer = BlockTrainer(config=config, data=data, plan=plan)
        evaluate = _as_recorded(chain_meta, index)
        rebuilt = list(trainer.run(start=start, last_block=index, excluded_ids=excluded, evaluate=evaluate))[-1]
    payload = _serialised(rebuilt)
    digest = hashlib.sha256(payload).hexdigest()
    if digest != expected:
        raise CorruptObject(
            f"replaying block {index} of chain {chain_name} of run {run_id} gives sha256 {digest[:12]}..., not the "
            f"committed {expected[:12]}...: this checkpoint was not produced by exact training from its predecessor "
            "(e.g. a DeepObliviate chain), so it cannot be rebuilt. Retrain the run or roll back the versions using it."
        )
    store.put_bytes(key, payload)
    return {"key": key, "how": f"replayed block {index} from checkpoint {index - 1}" if index else "re-initialised M_0"}


def _as_recorded(chain_meta: dict[str, Any], index: int) -> Callable[[int], bool] | None:
    """Whether the replay of block ``index`` evaluates held-out accuracy: as the chain recorded it.

    The accuracy is in the checkpoint's bytes, so the replay must evaluate exactly when the chain
    did: an exact retrain evaluates only the blocks it serves and M_B (``actors.chains``), a
    training every ``accuracy_every``-th block. The publishing manifest's chain lists each
    checkpoint's ``heldout_accuracy`` (``None``: not evaluated). ``None`` here (nothing recorded
    for the block): the trainer's default.
    """
    for entry in chain_meta.get("checkpoints") or ():
        if int(entry.get("block_index", -1)) == index and "heldout_accuracy" in entry:
            evaluated = entry["heldout_accuracy"] is not None
            return lambda _block: evaluated
    return None


def _committed_sha256(store: ObjectStore, key: str, member: ObjectInfo | None) -> str:
    """The checksum the rebuilt bytes must have: the one the publishing manifest pinned, else the commit record's.

    The manifest comes first: an object overwritten together with its commit record (another
    checkpoint's bytes and record copied over it) has a record that agrees with the wrong bytes.
    """
    if member is not None and member.key == key:
        return member.sha256
    return store.info(key).sha256


def _serialised(checkpoint: Checkpoint) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(checkpoint.to_state(), buffer)
    return buffer.getvalue()


def _publishing_manifest(store: ObjectStore, run_id: str, chain_name: str):
    """The manifest of the version that chain ``chain_name`` published (its chain metadata is the recipe)."""
    for key in store.list(f"runs/{run_id}/manifests"):
        if key.endswith(f"-{chain_name}.json"):
            return store.read_manifest(key)
    raise ObjectNotFound(
        f"no published version of run {run_id} comes from chain {chain_name}: it is an orphan (a lost race or a "
        "crashed attempt), not needed by any model; `store check --repair` collects it."
    )
