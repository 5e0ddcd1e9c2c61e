"""What a run serves: rolled-back and progressive versions in the registry (issue 11, SPEC section 6).

A published version normally serves its final checkpoint M_B. Two kinds of version serve an
earlier checkpoint, recorded as ``serve_block`` in the manifest metadata and the pointer target:

* an *interim* version, published the moment a request is accepted: it serves ``min(served,
  d - 1)``, d the earliest block holding one of the request's ids under the run's fixed block
  plan, so it never saw the ids (rule: :func:`obliviate.unlearning.rollback.plan_interim`, with the
  paired margin against the pre-deletion model). :func:`roll_back` decides it for a single chain,
  :func:`roll_back_group` for all members of a sharded run at once (published for every affected
  member or for none). The held-out figures come from an :class:`InterimJudge` the caller builds
  (``flows.rollback.heldout_judge``): this module loads checkpoints, it never evaluates a model;
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

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from obliviate.unlearning.config import BlockTrainingConfig, model_from_state
from obliviate.unlearning.plan import BlockPlan
from obliviate.unlearning.rollback import ShardCheckpoints, plan_interim, rollback_block, served_floor
from storage.errors import CorruptObject, ObjectNotFound, PointerConflict
from storage.ledger import CANCELLED, DONE, REJECTED, DeletionLedger, erased_ids
from storage.objects import Manifest, ObjectInfo, ObjectStore
from storage.registry import ModelVersion, RunRegistry
from storage.retry import swap_attempts

if TYPE_CHECKING:  # torch is imported where a model or a lineage is made: reading holds and records needs none
    from torch import nn

    from obliviate.unlearning.chain import Checkpoint

_log = logging.getLogger(__name__)

ROLLBACK_KEY = "service/rollback.json"
_CAS_ATTEMPTS = 8
#: Why an interim was not published (``cause`` in :func:`roll_back`'s and :func:`roll_back_group`'s result): the
#: candidate was judged below the served floor plus its margin, or no checkpoint before the earliest affected block
#: is a model (only M_0, as for a deletion in block 1 of a single chain), so no floor could have let one through.
BELOW_FLOOR, NO_EARLIER_MODEL = "below_floor", "no_earlier_model"


def save_rollback(store: ObjectStore, *, enabled: bool, floor_points: float = 2.0) -> None:
    """Record whether accepted requests roll back at once (``serve --rollback``) and the served floor."""
    store.put_json(ROLLBACK_KEY, {"enabled": enabled, "floor_points": floor_points})


def load_rollback(store: ObjectStore) -> dict[str, Any]:
    try:
        return dict(store.get_json(ROLLBACK_KEY))
    except ObjectNotFound:
        return {"enabled": False, "floor_points": 2.0}


def forgotten_key(request_id: str) -> str:
    return f"ledger/forgotten/{request_id}.json"


def forgotten_once_key(request_id: str) -> str:
    """The pointer whose first version decides a request's forgotten record (one writer wins, the others copy it)."""
    return f"ledger/forgotten-once/{request_id}"


def record_forgotten(store: ObjectStore, request_ids: Sequence[str], *, runs: Mapping[str, Any]) -> None:
    """Record when each request became forgotten (first time only): ``ledger/forgotten/<request>.json``.

    Two writers of one request (two passes, a pass and a retrain) each checked that the record was
    absent and then wrote their own (another ``forgotten_at``): their data and commit records
    interleaved into an object whose bytes disagree with its checksum. Now the first writer's
    record is decided by a create-once pointer (``ledger/forgotten-once/<request>``, version 1), and
    every writer then writes exactly that record: identical bytes, whoever writes last.
    """
    now = time.time()
    own_runs = {run_id: _without_batch_lists(record) for run_id, record in runs.items()}
    for request_id in request_ids:
        key = forgotten_key(request_id)
        if store.exists(key):
            continue
        body = json.loads(json.dumps({"request_id": request_id, "forgotten_at": now, "runs": own_runs}, default=_plain))
        once = forgotten_once_key(request_id)
        try:
            decided = dict(store.swap_pointer(once, body, expected_version=0).target)
        except PointerConflict:
            decided = dict(store.read_pointer_version(once, 1).target)
        store.put_json(key, decided)


def _without_batch_lists(record: Any) -> Any:
    """A run's rollback record as each request keeps it: the batch's request lists counted, not copied.

    ``below_floor`` named every request of the batch that stayed unforgotten, copied into the record
    of every forgotten request (31 KB each for a batch of 1,000); now ``below_floor_count`` says how many.
    """
    if not isinstance(record, Mapping):
        return record
    out = {key: value for key, value in record.items() if key != "below_floor"}
    if isinstance(record.get("below_floor"), (list, tuple)):
        out["below_floor_count"] = len(record["below_floor"])
    return out


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (for JSON)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot be stored as JSON")


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
    return model_from_state(config=config, state=checkpoint.model_state)


class DatasetErasures:
    """The dataset ids whose erasure is requested: every id of every standing deletion request of one dataset.

    The ledger's one rule of which rows nothing may use again but the deletion itself
    (:func:`storage.ledger.erased_ids`, the rule trainings follow too), audits included (``GET /info``'s
    ``forgotten_indices`` of a run server, the scheduled audit's target, so ``obliviate steal`` leaves them out
    of its pool and test set): a request the ledger holds ``done``, or accepted and not yet done (``pending``,
    ``claimed``, ``failed``, which ``--retry`` puts back), whether or not the audited run trained on its ids: a
    row held out of that run, or deleted from another run of the dataset, is erased all the same. A ``rejected``
    or ``cancelled`` request erased nothing. Read from the ledger at each :meth:`ids`; a request in a final
    state is read once and remembered, so a long history costs one listing per call.

    Args:
        store: the store holding the ledger.
        dataset: the dataset the runs were trained on (requests name it, ``forget --data``).
    """

    #: States a request never leaves (README "Request states"): its ids are read once.
    _FINAL = frozenset({DONE, REJECTED, CANCELLED})

    def __init__(self, store: ObjectStore, dataset: str) -> None:
        self.ledger, self.dataset = DeletionLedger(store), dataset
        self._final: dict[str, tuple[int, ...]] = {}
        self._unreadable_said: set[str] = set()
        self._lock = threading.Lock()

    def ids(self) -> frozenset[int]:
        """Every id of every standing request of the dataset, now (the union of :meth:`requests`)."""
        erased: set[int] = set()
        for ids in self.requests().values():
            erased.update(ids)
        return frozenset(erased)

    def requests(self) -> dict[str, list[int]]:
        """Request id -> the dataset ids it erases, for every standing request of the dataset that names any, now.

        What a training leaves out (:meth:`actors.chains.ChainWorker.train`): a worker keeps one of these per
        dataset, so each training and each re-read before its publish lists the ledger and reads only the requests
        not yet final. A request whose record or status cannot be read is left out (its ids are unknown here),
        with one warning naming it; ``obliviate store check`` reports the damage and how to mend it.

        Raises:
            StorageError: the ledger could not be listed or a request read.
        """
        standing: dict[str, list[int]] = {}
        for request_id in self.ledger.request_ids():
            with self._lock:
                known = self._final.get(request_id)
            if known is None:
                try:
                    entry = self.ledger.get(request_id)
                except (ObjectNotFound, CorruptObject) as err:
                    if isinstance(err, CorruptObject) and request_id not in self._unreadable_said:
                        self._unreadable_said.add(request_id)
                        _log.warning(
                            "deletion request %s: its ids cannot be read to leave them out (%s)", request_id, err
                        )
                    continue
                known = tuple(erased_ids(entry, self.dataset))
                if entry.status in self._FINAL:
                    with self._lock:
                        self._final[request_id] = known
            if known:
                standing[request_id] = list(known)
        return standing


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
    *,
    config: BlockTrainingConfig,
    plan: BlockPlan,
    deleted_ids: frozenset[int],
    members: Mapping[int, ObjectInfo],
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The lineage manifest (:func:`obliviate.unlearning.lineage.lineage_manifest`) of M_0..M_s only.

    ``source``: the metadata of the full chain's manifest the version derives from. When the version keeps that
    chain's own checkpoints M_0..M_s under the same config, plan and deleted ids (an interim or a release), its
    lineage is the chain's first s + 1 blocks, environment included: those checkpoints were made where the chain
    was trained, not where this version is published (computing it here would record the publisher's torch build
    and CPU, and load torch: ``forget --cancel`` publishes releases).
    """
    through = max(members)
    recorded = _recorded_lineage(source, config=config, plan=plan, deleted_ids=deleted_ids, members=members)
    if recorded is not None:
        blocks = [dict(b) for b in recorded["blocks"][: through + 1]]
        return {**{k: v for k, v in recorded.items() if k != "blocks"}, "through_block": through, "blocks": blocks}
    from obliviate.unlearning.lineage import lineage_manifest

    return lineage_manifest(
        config=config,
        plan=plan,
        deleted_ids=deleted_ids,
        checkpoint_sha256={i: info.sha256 for i, info in members.items()},
        through_block=through,
    )


def _recorded_lineage(
    source: Mapping[str, Any] | None,
    *,
    config: BlockTrainingConfig,
    plan: BlockPlan,
    deleted_ids: frozenset[int],
    members: Mapping[int, ObjectInfo],
) -> Mapping[str, Any] | None:
    """``source``'s lineage if it is the lineage of ``members`` (same recipe, plan, deleted ids and checkpoints), else None."""
    if source is None:
        return None
    lineage, chain = source.get("lineage"), source.get("chain")
    if not isinstance(lineage, Mapping) or not isinstance(chain, Mapping) or "environment" not in lineage:
        return None
    blocks = lineage.get("blocks") or []
    same_chain = (
        frozenset(int(i) for i in chain.get("deleted_ids", ())) == deleted_ids
        and lineage.get("config_fingerprint") == config.fingerprint
        and lineage.get("plan_fingerprint") == plan.fingerprint
        and lineage.get("deleted_count") == len(deleted_ids)
    )
    same_checkpoints = set(members) == set(range(max(members) + 1)) and all(
        i < len(blocks) and blocks[i].get("block") == i and blocks[i].get("checkpoint_sha256") == info.sha256
        for i, info in members.items()
    )
    return lineage if same_chain and same_checkpoints else None


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
    try:
        source = registry.store.read_manifest(str(chain_of["manifest"])).metadata
    except (KeyError, ObjectNotFound, CorruptObject):
        source = None  # the lineage is then computed afresh, as before
    return registry.publish(
        run_id,
        chain_name=chain_name,
        members=keep,
        metadata={
            **metadata,
            "chain": partial_chain,
            "chain_of": dict(chain_of),
            "serve_block": serve,
            "lineage": partial_lineage(config=config, plan=plan, deleted_ids=deleted, members=keep, source=source),
        },
        pointer_target={**target, "serve_block": serve},
        expected_version=expected_version,
    )


def group_members(store: ObjectStore, run_id: str) -> list[str] | None:
    """The member runs of sharded run ``run_id`` in shard order (``groups/<run>.json``); ``None`` if it is not one."""
    key = f"groups/{run_id}.json"
    return [str(m) for m in store.get_json(key).get("members", ())] if store.exists(key) else None


def sharded_runs(store: ObjectStore) -> dict[str, list[str]]:
    """Every sharded run: group name -> its member runs in shard order (``groups/<run>.json``)."""
    out: dict[str, list[str]] = {}
    for key in sorted(store.list("groups/")):
        if key.endswith(".json"):
            group = store.get_json(key)
            out[str(group.get("run_id") or key.rsplit("/", 1)[-1][: -len(".json")])] = [
                str(m) for m in group.get("members", ())
            ]
    return out


@dataclass(frozen=True)
class RunState:
    """One run as a rollback reads it: its current version, raw pointer target and manifest."""

    run_id: str
    version: ModelVersion
    target: dict[str, Any]
    manifest: Manifest

    @property
    def served_block(self) -> int | None:
        return served_block(self.manifest)

    @property
    def accuracies(self) -> tuple[float | None, ...]:
        """Recorded held-out accuracy of M_0..M_B (``None`` for checkpoints this version does not keep)."""
        chain_meta = self.manifest.metadata["chain"]
        recorded = tuple(c.get("heldout_accuracy") for c in chain_meta["checkpoints"])
        return recorded + (None,) * (int(chain_meta["config"]["num_blocks"]) + 1 - len(recorded))

    @property
    def holds(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in (self.target.get("holds") or {}).items()}


class InterimJudge(Protocol):
    """Held-out judgement of served combinations (:class:`obliviate.unlearning.judge.HeldoutJudge`)."""

    @property
    def reference_accuracy(self) -> float: ...

    def reference_shard_accuracy(self, shard: int) -> float: ...

    def accuracy(self, served: Mapping[int, int | None]) -> float: ...

    def margin(self, served: Mapping[int, int | None]) -> float: ...


JudgeFor = Callable[[Sequence[RunState]], InterimJudge]
"""Builds the judge of a run's (or a sharded run's members', in shard order) interim versions."""


def run_state(registry: RunRegistry, run_id: str) -> RunState | None:
    current, target = pointer_target(registry, run_id)
    if current is None:
        return None
    return RunState(run_id, current, target, registry.manifest(current))


def checkpoint_model(registry: RunRegistry, manifest: Manifest, block: int) -> nn.Module:
    """M_block of a version's chain as a module (checksum-verified; the version must keep it)."""
    member = manifest.members[str(block)]
    checkpoint = registry.load_checkpoint(member.key, expected=member)
    return model_from_state(
        config=BlockTrainingConfig.from_dict(manifest.metadata["chain"]["config"]), state=checkpoint.model_state
    )


def full_chain(registry: RunRegistry, state: RunState) -> Manifest:
    """The manifest of the full chain ``state``'s version derives from (an interim keeps only M_0..M_s)."""
    _, key = chain_source(state.version, state.manifest)
    return state.manifest if key == state.manifest.key else registry.store.read_manifest(key)


def reference_model(registry: RunRegistry, state: RunState) -> nn.Module:
    """The model before the deletions a rollback of ``state`` judges: the final M_B of the full chain it derives from."""
    full = full_chain(registry, state)
    return checkpoint_model(registry, full, max(int(k) for k in full.members))


def _publish_interim(
    registry: RunRegistry,
    state: RunState,
    *,
    block: int | None,
    firsts: Mapping[str, int],
    accuracy: float | None,
    reference: float,
    extra: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Publish ``state``'s interim version serving M_block with ``firsts`` added to its holds (CAS).

    Raises:
        PointerConflict: another publisher moved the pointer first.
    """
    current, target, manifest = state.version, state.target, state.manifest
    version_of, manifest_of = chain_source(current, manifest)
    return publish_served(
        registry,
        state.run_id,
        chain_name=f"interim-{current.version:06d}-{block}",
        chain_meta=manifest.metadata["chain"],
        members={int(k): v for k, v in manifest.members.items()},
        serve=block,
        chain_of={"version": version_of, "manifest": manifest_of},
        target={
            **{k: v for k, v in target.items() if k != "manifest"},
            "metrics": {**current.metrics, "served_accuracy": accuracy},
            "forgotten_requests": sorted(set(target.get("forgotten_requests") or []) | set(firsts)),
            "holds": {**state.holds, **firsts},
        },
        metadata={
            **{k: v for k, v in manifest.metadata.items() if k not in ("lineage",)},
            "interim_for": sorted(firsts),
            "record": None,
            "reference_accuracy": reference,
            "published_for": "rollback",
            "published_at": time.time(),
            **(extra or {}),
        },
        expected_version=current.version,
    )


def with_measured(
    accuracies: tuple[float | None, ...], block: int | None, measure: Callable[[int], float] | None
) -> tuple[float | None, ...]:
    """``accuracies`` with M_block's filled in by ``measure`` where it was not recorded.

    A retrain records held-out accuracy only for the blocks it serves as they land and for M_B
    (:meth:`actors.chains.ChainWorker._retrain_exact`): a rollback to another of its blocks has
    that block judged here, once, instead of every block being evaluated on the way to exact.
    Without ``measure`` (or for M_0, which is no model) the value stays unknown.
    """
    if block is None or block < 1 or accuracies[block] is not None or measure is None:
        return accuracies
    return (*accuracies[:block], float(measure(block)), *accuracies[block + 1 :])


def _accuracy_alone(judged: Callable[[], InterimJudge], shard: int, block: int) -> float:
    """Held-out accuracy of one shard's M_block voting alone (``judged``: the judge, built on first use)."""
    return judged().accuracy({shard: block})


def _chain_margin(
    judged: Callable[[], InterimJudge] | None,
    accuracies: tuple[float | None, ...],
    *,
    floor: float,
    seen: dict[int, float],
) -> Callable[[Mapping[int, int | None]], float]:
    """``margin_of`` of a single chain: its judge's paired margin, evaluated once per block into ``seen``.

    A candidate already below the bare floor is not evaluated (no margin can lift it): 0.
    """

    def margin_of(served: Mapping[int, int | None]) -> float:
        block = served[0]
        if block is None or judged is None or (accuracies[block] or 0.0) < floor:
            return 0.0
        if block not in seen:
            seen[block] = judged().margin({0: block})
        return seen[block]

    return margin_of


RELEASE_JUDGEMENTS = "release_judgements"
"""Interim manifest metadata: the judgement of each block a release of its holds may serve (:func:`release_judgements`)."""


def release_judgements(
    registry: RunRegistry,
    state: RunState,
    judged: Callable[[], InterimJudge],
    *,
    served: int,
    holds: Mapping[str, int],
) -> list[dict[str, Any]]:
    """The held-out judgement of every block a release of some of ``holds`` may serve, made while the judge is loaded.

    A release (``forget --cancel``, a refused request) serves the newest block in (``served``, cap] the floor
    accepts, cap below the earliest remaining hold: a block in ``served + 1 .. max(holds) - 1``. An interim
    that places several holds at once serves below all of them, so no interim was published at those blocks and
    the release had to load the models to judge them. Each record is what ``HeldoutJudge.meets_floor`` weighs,
    independent of the floor: the candidate's held-out accuracy (the same checkpoint the judge loads then: the
    version's own, else the full chain's), the pre-deletion model's, and their paired margin; with the checkpoint
    it judged, so a release reads it only for that very checkpoint. The floor is applied when the release reads
    them (``flows.rollback.recorded_judgements``). A block whose checkpoint is damaged or missing is left out: the
    release judges it with the models, and meets the damage, as before.
    """
    top = max(holds.values(), default=served + 1) - 1
    full = full_chain(registry, state) if top > served else state.manifest
    out: list[dict[str, Any]] = []
    for block in range(served + 1, top + 1):
        candidate = state.manifest.members.get(str(block)) or full.members.get(str(block))
        if candidate is None:
            continue
        alone = {0: block}
        try:
            judge = judged()
            record = {
                "block": block,
                "checkpoint": candidate.as_dict(),
                "accuracy": float(judge.accuracy(alone)),
                "reference_accuracy": float(judge.reference_accuracy),
                "margin_points": float(judge.margin(alone)),
            }
        except (CorruptObject, ObjectNotFound):
            continue
        out.append(record)
    return out


def _moved(registry: RunRegistry, states: Sequence[RunState]) -> bool:
    """Whether a run's pointer moved since ``states`` were read (a checkpoint they name may be purged by now).

    A retrain that publishes purges the versions it superseded (SPEC 5, :func:`storage.check.purge_superseded`),
    so a plan judging the checkpoints of a version read before meets them gone: like a lost
    compare-and-swap, the plan starts again on the newer version.
    """
    for state in states:
        current = registry.current(state.run_id)
        if current is None or current.version != state.version.version:
            return True
    return False


def roll_back(
    registry: RunRegistry,
    run_id: str,
    requests: Mapping[str, Sequence[int]],
    *,
    floor_points: float,
    judge_for: JudgeFor | None = None,
) -> dict[str, Any] | None:
    """Publish an interim version of single-chain run ``run_id`` that never saw the ids of ``requests``.

    The interim serves M_{d-1} (or the block it serves already, if earlier) and is published only
    if its recorded held-out accuracy is at least the pre-deletion accuracy minus ``floor_points``
    plus its paired margin (``judge_for(...).margin``: its held-out disagreement with the
    pre-deletion model, the final M_B of the full chain it derives from); the rule is
    :func:`obliviate.unlearning.rollback.plan_interim`, as in ``bench/deletion_stream.py``. Without
    ``judge_for`` the margin is 0. A candidate already below the bare floor is not evaluated (no
    margin can lift it). Sharded runs: :func:`roll_back_group`.

    Idempotent: requests already held change nothing (and are not judged again). Lost races (a
    retrain publishing a block meanwhile) are retried on the newer version.

    Returns:
        ``None`` if no request touches the run, else ``{"serve_block", "accuracy", "margin_points",
        "version", "flush_now", "published"}`` (``flush_now``: the interim is not publishable; then
        nothing is published, ``below_floor`` lists the requests that stay unforgotten until
        their retrain lands, ``cause`` says why (:data:`BELOW_FLOOR`, or :data:`NO_EARLIER_MODEL`
        when the candidate would be M_0), with ``candidate_block``, ``first_affected_block``,
        ``floor`` and ``reference_accuracy`` beside ``accuracy`` and ``margin_points``).
    """
    for _ in swap_attempts(_CAS_ATTEMPTS):
        state = run_state(registry, run_id)
        if state is None:
            return None
        current, manifest = state.version, state.manifest
        deleted = frozenset(int(i) for i in manifest.metadata["chain"]["deleted_ids"])
        todo = {r: ids for r, ids in requests.items() if r not in current.applied_requests}
        firsts = first_blocks(registry, run_id, todo, deleted=deleted)
        if not firsts:
            return None
        accuracies, served_now = state.accuracies, state.served_block
        if served_now is not None and set(firsts) <= set(state.holds):  # judged and published by an earlier pass
            return {
                "serve_block": served_now,
                "accuracy": accuracies[served_now],
                "version": current.version,
                "flush_now": False,
                "published": False,
            }
        reference = manifest.metadata.get("reference_accuracy", accuracies[-1]) or 0.0
        floor = served_floor(pre_deletion_accuracy=reference, floor_points=floor_points)
        first = min(firsts.values())
        # one judge for the measured accuracy and the margin, built only if either is needed
        judged = None if judge_for is None else functools.cache(functools.partial(judge_for, [state]))
        try:
            accuracies = with_measured(
                accuracies,
                rollback_block(served_block=served_now, first_affected_block=first),
                None if judged is None else functools.partial(_accuracy_alone, judged, 0),
            )
            margins: dict[int, float] = {}
            margin_of = _chain_margin(judged, accuracies, floor=floor, seen=margins)
            interim = plan_interim(
                shards=[ShardCheckpoints(0, accuracies, served_now)],
                affected={0: first},
                served_floor=floor,
                shard_floor=0.0,
                margin_of=margin_of,
            )
        except ObjectNotFound:
            if _moved(registry, [state]):  # a retrain published meanwhile and purged what was judged: re-plan
                continue
            raise
        block = interim.served[0]
        margin = None if block is None else margins.get(block)
        if not interim.publish:
            # The issue-11 floor: a below-floor interim is never served; the run keeps its version
            # (which still holds the ids) and the batch flushes now, so the request is forgotten
            # when its retrain lands rather than at acceptance. With no checkpoint before the earliest
            # affected block but M_0 (a deletion in block 1), no floor is why: M_0 is no model.
            target = rollback_block(served_block=served_now, first_affected_block=first)
            return {
                "serve_block": served_now,
                "accuracy": interim.accuracy,
                "margin_points": margin,
                "version": current.version,
                "flush_now": True,
                "published": False,
                "below_floor": sorted(firsts),
                "cause": NO_EARLIER_MODEL if target in (None, 0) else BELOW_FLOOR,
                "candidate_block": target,
                "first_affected_block": first,
                "floor": floor,
                "reference_accuracy": reference,
            }
        ahead = (
            []
            if judged is None or block is None
            else release_judgements(registry, state, judged, served=block, holds={**state.holds, **firsts})
        )
        try:
            version = _publish_interim(
                registry,
                state,
                block=block,
                firsts=firsts,
                accuracy=interim.accuracy,
                reference=reference,
                extra={"interim_margin_points": margin, RELEASE_JUDGEMENTS: ahead},
            )
        except PointerConflict:
            continue
        return {
            "serve_block": block,
            "accuracy": interim.accuracy,
            "margin_points": margin,
            "version": version.version,
            "flush_now": False,
            "published": True,
        }
    raise PointerConflict(f"run {run_id}: the version pointer kept moving over {_CAS_ATTEMPTS} rollback attempts.")


def roll_back_group(
    registry: RunRegistry,
    group: str,
    members: Sequence[str],
    requests: Mapping[str, Sequence[int]],
    *,
    floor_points: float,
    judge_for: JudgeFor,
    shard_floor_points: float = 5.0,
) -> dict[str, Any] | None:
    """Plan and publish the interim version of sharded run ``group`` as a whole (members in shard order).

    The group's interim is decided at once by :func:`obliviate.unlearning.rollback.plan_interim`,
    as in ``bench/deletion_stream.py``: every affected member rolls back to before its earliest
    affected block; a member leaves the vote (``serve_block`` ``None``) when it rolls back to M_0,
    when its rolled-back accuracy is below the shard floor (the weakest member's pre-deletion
    held-out accuracy minus ``shard_floor_points``), or when leaving raises the ensemble's judged
    accuracy; the ensemble (mean of the voting members' probabilities) is published only if its
    held-out accuracy is at least the pre-deletion ensemble's minus ``floor_points`` plus its paired
    margin against the pre-deletion ensemble's predictions. Then each affected member publishes its
    decided block. If the group's interim is not publishable, no member publishes anything and
    ``flush_now`` is set: the requests stay unforgotten until their retrain lands.

    Idempotent: when every affected member already holds its requests nothing is judged or
    published. A member's lost race restarts the whole plan on fresh versions; members published
    before it then hold the requests and are not published again, or, if the re-plan finds the
    interim no longer publishable (or a crash left a partial publish), are released again
    (``undone`` lists them).

    Returns:
        ``None`` if no request touches the group (or a member is untrained), else ``{"runs": {member:
        {"serve_block", "accuracy", "version", "flush_now", "published"}}, "accuracy", "margin_points",
        "floor", "flush_now", "below_floor"}`` (``accuracy``: the group's interim held-out accuracy; when not
        publishable also ``cause``, as :func:`roll_back`'s, and ``reference_accuracy``).
    """
    for _ in swap_attempts(_CAS_ATTEMPTS):
        states = [run_state(registry, m) for m in members]
        if not states or any(s is None for s in states):
            return None
        ready = [s for s in states if s is not None]
        firsts: dict[int, dict[str, int]] = {}
        for k, state in enumerate(ready):
            todo = {r: ids for r, ids in requests.items() if r not in state.version.applied_requests}
            deleted = frozenset(int(i) for i in state.manifest.metadata["chain"]["deleted_ids"])
            found = first_blocks(registry, state.run_id, todo, deleted=deleted)
            if found:
                firsts[k] = found
        if not firsts:
            return None
        requests_here = sorted({r for found in firsts.values() for r in found})
        if all(set(found) <= set(ready[k].holds) for k, found in firsts.items()):
            return {
                "runs": {
                    ready[k].run_id: {
                        "serve_block": ready[k].served_block,
                        "version": ready[k].version.version,
                        "flush_now": False,
                        "published": False,
                    }
                    for k in sorted(firsts)
                },
                "flush_now": False,
                "below_floor": [],
            }
        try:
            judged = functools.cache(functools.partial(judge_for, ready))
            judge = judged()
            floor = served_floor(pre_deletion_accuracy=judge.reference_accuracy, floor_points=floor_points)
            shard_floor = min(judge.reference_shard_accuracy(k) for k in range(len(ready))) - shard_floor_points / 100
            affected = {k: min(found.values()) for k, found in firsts.items()}
            accuracies = [s.accuracies for s in ready]
            for k, first in affected.items():
                accuracies[k] = with_measured(
                    accuracies[k],
                    rollback_block(served_block=ready[k].served_block, first_affected_block=first),
                    functools.partial(_accuracy_alone, judged, k),
                )
            interim = plan_interim(
                shards=[ShardCheckpoints(k, accuracies[k], s.served_block) for k, s in enumerate(ready)],
                affected=affected,
                served_floor=floor,
                shard_floor=shard_floor,
                ensemble_accuracy=judge.accuracy,
                margin_of=judge.margin,
            )
        except ObjectNotFound:
            if _moved(registry, ready):  # a retrain published meanwhile and purged what was judged: re-plan
                continue
            raise
        margin = judge.margin(interim.served) if interim.accuracy is not None else None
        summary: dict[str, Any] = {
            "accuracy": interim.accuracy,
            "margin_points": margin,
            "floor": floor,
            "shard_floor": shard_floor,
        }
        if not interim.publish:
            targets = [
                rollback_block(served_block=s.served_block, first_affected_block=affected[k])
                if k in affected
                else s.served_block
                for k, s in enumerate(ready)
            ]
            summary["cause"] = NO_EARLIER_MODEL if all(t in (None, 0) for t in targets) else BELOW_FLOOR
            summary["reference_accuracy"] = judge.reference_accuracy
            undone = _undo_partial_publish(registry, ready, requests_here)
            return {
                "undone": undone,
                "runs": {
                    ready[k].run_id: {
                        "serve_block": ready[k].served_block,
                        "accuracy": interim.accuracy,
                        "version": ready[k].version.version,
                        "flush_now": True,
                        "published": False,
                        "below_floor": sorted(firsts[k]),
                    }
                    for k in sorted(firsts)
                },
                **summary,
                "flush_now": True,
                "below_floor": requests_here,
                "reason": interim.reason,
            }
        runs: dict[str, Any] = {}
        try:
            for k in sorted(firsts):
                state, block = ready[k], interim.served[k]
                shard_accuracy = None if block is None else accuracies[k][block]
                if block == state.served_block and set(firsts[k]) <= set(state.holds):
                    version_number, published = state.version.version, False
                else:
                    version_number = _publish_interim(
                        registry,
                        state,
                        block=block,
                        firsts=firsts[k],
                        accuracy=shard_accuracy,
                        reference=state.manifest.metadata.get("reference_accuracy", state.accuracies[-1]) or 0.0,
                        extra={
                            "group_interim": {
                                "group": group,
                                "served": {str(k): b for k, b in interim.served.items()},
                                **summary,
                            }
                        },
                    ).version
                    published = True
                runs[state.run_id] = {
                    "serve_block": block,
                    "accuracy": shard_accuracy,
                    "version": version_number,
                    "flush_now": False,
                    "published": published,
                }
        except PointerConflict:
            continue
        return {"runs": runs, **summary, "flush_now": False, "below_floor": [], "left_vote": list(interim.left_vote)}
    raise PointerConflict(
        f"sharded run {group}: a member's pointer kept moving over {_CAS_ATTEMPTS} rollback attempts."
    )


def _undo_partial_publish(registry: RunRegistry, ready: Sequence[RunState], requests: Sequence[str]) -> list[str]:
    """Release the holds an interrupted group publish left on some members; returns those members.

    A lost race (or a crash) between members' publishes can leave some members rolled back for a
    request the group's re-plan now finds unpublishable. Such a request was never recorded
    forgotten, so its partial interim is undone: those members serve again what they served
    before it (a group never serves a vote that was not judged as a whole). Holds of requests
    already recorded forgotten belong to an earlier, whole interim and stay.
    """
    undone = []
    for state in ready:
        stray = {r for r in state.holds if r in requests and not registry.store.exists(forgotten_key(r))}
        if stray and release(registry, state.run_id, stray) is not None:
            undone.append(state.run_id)
    return undone


def release(
    registry: RunRegistry,
    run_id: str,
    request_ids: set[str] | frozenset[str],
    *,
    acceptable: Callable[[int], bool] | None = None,
) -> ModelVersion | None:
    """Drop the holds of requests refused or withdrawn before they were applied; serve what they held back.

    With no hold left the full chain the current version derives from is served again (its final
    model: the pre-deletion model itself). Otherwise the newest block the remaining holds allow is
    served, if ``acceptable`` (the floor's judgement of a candidate block) accepts it; else the newest
    accepted block between it and the block served now, and failing that the block served now (it was
    judged when its hold was placed), with the released holds dropped all the same. A version of a
    retrain in flight is left alone: that retrain drops such holds itself after its next block.

    Returns:
        the published version, or ``None`` if nothing was held by these requests.
    """
    for _ in swap_attempts(_CAS_ATTEMPTS):
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
            serve = _released_block(serve_cap(remaining), served_block(registry.manifest(current)), acceptable)
            return publish_served(
                registry,
                run_id,
                chain_name=f"release-{current.version:06d}-{serve}",
                chain_meta=full.metadata["chain"],
                members=members,
                serve=serve,
                chain_of={"version": version_of, "manifest": key_of},
                target={**kept, "holds": remaining, "forgotten_requests": sorted(remaining)},
                metadata={**metadata, "published_for": "release", "interim_for": sorted(remaining)},
                expected_version=current.version,
            )
        except PointerConflict:
            continue
    raise PointerConflict(f"run {run_id}: the version pointer kept moving over {_CAS_ATTEMPTS} release attempts.")


def _released_block(cap: int | None, served_now: int | None, acceptable: Callable[[int], bool] | None) -> int | None:
    """What a release serves: the newest block in (``served_now``, ``cap``] that ``acceptable`` takes, else ``served_now``.

    ``None`` (or block 0) is a paused shard: it serves nothing. Never a block above ``cap``.
    """
    cap = cap if cap and cap > 0 else None
    if acceptable is None or cap is None:
        return cap
    for block in range(cap, served_now or 0, -1):
        if acceptable(block):
            return block
    return served_now if served_now is None or served_now <= cap else cap
