"""Exact forgetting at acceptance, by rollback (SPEC section 6): interim versions for every affected run.

When ``serve --rollback`` is on, every run an accepted request affects publishes an *interim*
version at once if it meets the served-accuracy floor, by the same rule as
``bench/deletion_stream.py`` (:func:`obliviate.unlearning.rollback.plan_interim`):

* a single chain (:func:`storage.serving.roll_back`) serves M_{d-1}, the last checkpoint before
  the request's earliest affected block d, which never saw the ids, and keeps only M_0..M_{d-1}. It
  is published only if its recorded held-out accuracy is at least the pre-deletion accuracy minus
  ``floor_points`` *plus* its paired margin (:func:`obliviate.unlearning.rollback.paired_margin_points`,
  its default z, as the bench): the margin grows with how often M_{d-1} and the pre-deletion model (the final M_B of the
  full chain the version derives from) disagree on the run's held-out set;
* a sharded run (``groups/<run>.json``, :func:`storage.serving.roll_back_group`) is judged as one
  model: every affected shard rolls back to before its earliest affected block, a shard leaves the
  vote when it rolls back to M_0, falls below the shard floor (the weakest shard's pre-deletion
  held-out accuracy minus :data:`SHARD_FLOOR_POINTS`) or lowers the ensemble's judged accuracy, and
  the ensemble (argmax of the mean of the voting shards' softmax probabilities) must clear the
  pre-deletion ensemble's accuracy minus ``floor_points`` plus its paired margin against the
  pre-deletion ensemble's predictions. Then every affected shard publishes its block
  (``serve_block`` ``None``: out of the vote), or none does.

:func:`heldout_judge` computes these figures: it loads the run's held-out set from its registered
dataset spec (once per process) and evaluates only the checkpoints a judgement needs (tens of
milliseconds for LeNet-5). An interim version's pointer target carries ``serve_block``, ``holds`` and
``forgotten_requests``; :func:`served_model` is what anything serving or auditing a run must load.
When the interim is not publishable (below the floor plus margin, or a deletion in block 1 of a
single chain: M_0 is no model; ``serve --floor-points 100`` accepts any drop but still needs a
model), nothing is published, the run keeps serving its version and the batch flushes now: those
requests become forgotten when their retrain lands. Why is kept (:func:`flush_reason`: ``rollback_below_floor``,
or ``rollback_no_earlier_model`` when every refused run had only M_0 before its earliest affected block, so no
floor would have helped) with each run's figures (:func:`_refusal`: the candidate's held-out accuracy, the floor,
the paired margin, the points short), logged by the gate and noted on each pending request (``interim_refused``). The same holds when the interim cannot be judged or
published because a checkpoint it needs is damaged or missing: the run keeps serving its version, each
affected request records the damage and its mend (``interim_error``, ``interim_mend`` on its pending status),
and the batch flushes now; its exact retrain fails on the damage only if it needs that checkpoint too (then
the request ends ``failed`` after its attempts, as without rollback). The batch's retrain starts from the full chain
the interim derives from (``chain_of``), publishes each retrained block as it lands (progressive
versions, :mod:`actors.chains`), and finally the full model, whose ``serve_block`` is absent unless
a request accepted meanwhile still holds it back (held only where the block it leaves served meets
the same floor; otherwise that request's batch flushes at the next pass).

The time each request became forgotten is kept in ``ledger/forgotten/<request>.json``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from obliviate.data import load_dataset
from obliviate.errors import ConfigError
from obliviate.unlearning.rollback import served_floor
from obliviate.unlearning.service import RunSpec, block_data
from storage.errors import CorruptObject, ObjectNotFound
from storage.ledger import PENDING, DeletionLedger
from storage.objects import Manifest, ObjectInfo, ObjectStore
from storage.registry import RunRegistry
from storage.serving import (
    BELOW_FLOOR,
    NO_EARLIER_MODEL,
    RELEASE_JUDGEMENTS,
    ROLLBACK_KEY,
    RunState,
    chain_source,
    checkpoint_model,
    full_chain,
    load_rollback,
    pointer_target,
    record_forgotten,
    reference_model,
    release,
    roll_back,
    roll_back_group,
    run_state,
    save_rollback,
    served_model,
    sharded_runs,
)

if TYPE_CHECKING:  # torch is imported where a judgement loads models: `forget --cancel` of an unheld request needs none
    import torch

    from obliviate.unlearning.judge import HeldoutJudge

__all__ = [
    "ROLLBACK_KEY",
    "heldout_judge",
    "judged_block",
    "load_rollback",
    "publish_interim",
    "record_forgotten",
    "release_refused",
    "save_rollback",
    "served_model",
]


SHARD_FLOOR_POINTS = 5.0
"""A rolled-back shard below the weakest shard's pre-deletion held-out accuracy minus this leaves the vote (as the bench)."""


def heldout_judge(registry: RunRegistry, states: Sequence[RunState], *, z: float | None = None) -> HeldoutJudge:
    """The held-out judge of a run's interim versions (``states``: one run, or a sharded run's members in order).

    The held-out set is loaded from the run's registered dataset spec (cached per process, so a
    pass costs one data load at most); the reference is each member's pre-deletion model, the final
    M_B of the full chain its version derives from; candidates are loaded from the version's kept
    checkpoints when a judgement needs them.

    Raises:
        ConfigError: members that do not share one held-out set (a sharded run always does).
    """
    from obliviate.unlearning.judge import HeldoutJudge

    specs = [registry.spec(s.run_id) for s in states]
    first = specs[0]
    for spec in specs[1:]:
        if (spec.dataset_fingerprint, spec.heldout_ids) != (first.dataset_fingerprint, first.heldout_ids):
            raise ConfigError(
                f"the shards of a sharded run must share one held-out set to be judged as one model; {spec.run_id} "
                f"and {first.run_id} differ. Train the shards together (train --shards S)."
            )
    x, y = _heldout(first)
    chains = [full_chain(registry, s) for s in states]

    def load(shard: int, block: int) -> torch.nn.Module:
        # A block the version keeps is loaded from it: a progressive version keeps its retrain's new
        # M'_0..M'_s, while the full chain it derives from still holds the blocks that saw the ids.
        # Candidates beyond what a rolled-back version keeps come from that full chain.
        manifest = states[shard].manifest
        return checkpoint_model(registry, manifest if str(block) in manifest.members else chains[shard], block)

    return HeldoutJudge(x=x, y=y, reference=[reference_model(registry, s) for s in states], load=load, z=z)


_HELDOUT: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _heldout(spec: RunSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A run's held-out tensors, from its registered dataset (loaded once per process and held-out set)."""
    key = (spec.dataset, spec.dataset_fingerprint, hash(spec.heldout_ids))
    if key not in _HELDOUT:
        data = block_data(spec, dataset=load_dataset(spec.dataset))
        _HELDOUT.clear()  # one held-out set at a time: a service judges few datasets
        _HELDOUT[key] = (data.x_heldout, data.y_heldout)
    return _HELDOUT[key]


def publish_interim(store: ObjectStore, pending: Sequence[Any], *, floor_points: float) -> dict[str, Any]:
    """Publish an interim version for every run the pending requests affect; returns what was done.

    A single chain is judged alone (:func:`storage.serving.roll_back`), a sharded run as one model
    (:func:`storage.serving.roll_back_group`), both by the bench's rule with the paired margin
    against the pre-deletion model on the run's held-out set (:func:`heldout_judge`).

    A run (or sharded run) whose interim needs a damaged or missing checkpoint (:class:`CorruptObject`,
    :class:`ObjectNotFound`) publishes nothing and keeps serving its version; its requests stay unforgotten,
    record the damage and its mend on their pending status, and the batch flushes now, so their exact retrain
    is not held back; the other runs' interims are published as usual.

    Returns:
        ``{"flush_now": bool, "runs": {run_id: {"serve_block", "accuracy", "version", "published"}},
        "groups": {group: {"accuracy", "margin_points", "floor", ...}},
        "failed": {run_id or group: {"error", "mend", "requests"}}}``.
    """
    registry = RunRegistry(store)
    out: dict[str, Any] = {"flush_now": False, "runs": {}, "groups": {}, "failed": {}, "refused": {}}
    unforgotten: set[str] = set()

    def damaged(name: str, requests: dict[str, list[int]], err: Exception) -> None:
        out["flush_now"] = True  # their exact retrain starts now instead of waiting for the batch
        unforgotten.update(requests)  # the run still serves a version that saw their ids
        out["failed"][name] = {
            "error": f"{type(err).__name__}: {err}"[:2000],
            "mend": "`obliviate store check --repair` rebuilds the damaged checkpoint by replay; meanwhile the run "
            "keeps serving its version and the requests' batch flushes now for their exact retrain",
            "requests": sorted(requests),
        }

    def judge_for(states: Sequence[RunState]) -> HeldoutJudge:
        return heldout_judge(registry, states)

    def requests_of(run_id: str) -> dict[str, list[int]]:
        dataset = registry.spec(run_id).dataset
        return {
            e.request_id: [int(i) for i in e.request["ids"]] for e in pending if e.request.get("dataset") == dataset
        }

    groups, registered = sharded_runs(store), registry.run_ids()
    members = {m for ms in groups.values() for m in ms}
    for group, shards in groups.items():
        requests = requests_of(shards[0]) if shards and set(shards) <= set(registered) else {}
        if not requests:
            continue
        try:
            done = roll_back_group(
                registry,
                group,
                shards,
                requests,
                floor_points=floor_points,
                judge_for=judge_for,
                shard_floor_points=SHARD_FLOOR_POINTS,
            )
        except (CorruptObject, ObjectNotFound) as err:
            damaged(group, requests, err)
            continue
        if done is not None:
            out["flush_now"] = out["flush_now"] or done["flush_now"]
            unforgotten.update(done["below_floor"])
            if done["flush_now"]:
                out["refused"][group] = _refusal(done, floor_points=floor_points, requests=done["below_floor"])
            for run_id, result in done.pop("runs").items():
                result.pop("flush_now", None)
                out["runs"][run_id] = result
            out["groups"][group] = done
    for run_id in registered:
        if run_id in members:
            continue
        requests = requests_of(run_id)
        if not requests:
            continue
        try:
            done = roll_back(registry, run_id, requests, floor_points=floor_points, judge_for=judge_for)
        except (CorruptObject, ObjectNotFound) as err:
            damaged(run_id, requests, err)
            continue
        if done is not None:
            out["flush_now"] = out["flush_now"] or done.pop("flush_now")
            unforgotten.update(done.get("below_floor", ()))
            out["runs"][run_id] = done
            if done.get("below_floor"):
                out["refused"][run_id] = _refusal(done, floor_points=floor_points, requests=done["below_floor"])
    forgotten = [e.request_id for e in pending if e.request_id not in unforgotten]
    record_forgotten(store, forgotten, runs=out["runs"])
    if out["failed"]:
        _record_interim_failures(store, pending, out["failed"])
    if out["refused"]:
        _record_refusals(store, pending, out["refused"])
    out["flush_reason"] = flush_reason(out) if out["flush_now"] else None
    return out


#: The batch gate's reasons for flushing at once under ``--rollback`` (the ledger's ``batch``; ``forget --status``).
ROLLBACK_DAMAGED, ROLLBACK_BELOW_FLOOR, ROLLBACK_NO_EARLIER_MODEL = (
    "rollback_damaged",
    "rollback_below_floor",
    "rollback_no_earlier_model",
)


def flush_reason(interim: dict[str, Any]) -> str:
    """Why a batch flushes at once after :func:`publish_interim`: a damaged checkpoint first, then the floor.

    :data:`ROLLBACK_NO_EARLIER_MODEL` only when no affected run was refused by the floor: every one had nothing
    before its earliest affected block but M_0 (a deletion in block 1), so no ``--floor-points`` would have helped.
    """
    if interim.get("failed"):
        return ROLLBACK_DAMAGED
    causes = {refusal.get("cause") for refusal in (interim.get("refused") or {}).values()}
    return ROLLBACK_NO_EARLIER_MODEL if causes == {NO_EARLIER_MODEL} else ROLLBACK_BELOW_FLOOR


def _refusal(done: dict[str, Any], *, floor_points: float, requests: Sequence[str]) -> dict[str, Any]:
    """The figures of an interim that was not published: why, its held-out accuracy, the floor and the margin.

    ``accuracy``, ``floor`` and ``reference_accuracy`` are fractions; ``margin_points`` and ``short_points`` are
    points (``short_points``: how far the candidate fell below the floor plus its margin; ``None`` when not judged).
    """
    accuracy, floor, margin = done.get("accuracy"), done.get("floor"), done.get("margin_points")
    needed = None if floor is None else float(floor) + float(margin or 0.0) / 100
    return {
        "cause": done.get("cause", BELOW_FLOOR),
        "candidate_block": done.get("candidate_block"),
        "first_affected_block": done.get("first_affected_block"),
        "accuracy": accuracy,
        "reference_accuracy": done.get("reference_accuracy"),
        "floor_points": floor_points,
        "floor": floor,
        "margin_points": margin,
        "needed": needed,
        "short_points": None if accuracy is None or needed is None else round(100 * (needed - float(accuracy)), 4),
        "requests": sorted(requests),
    }


def refusal_words(name: str, refusal: dict[str, Any]) -> str:
    """One run's (or sharded run's) refused interim in words, with its figures (serve's log, ``forget --status``)."""
    if refusal.get("cause") == NO_EARLIER_MODEL:
        first = refusal.get("first_affected_block")
        return (
            f"{name}: no checkpoint before the earliest affected block{'' if first is None else f' ({first})'} is "
            "a model (M_0 is no model), so nothing could be rolled back whatever --floor-points allows"
        )

    def pct(value: Any) -> str:
        return "not measured" if value is None else f"{100 * float(value):.1f} %"

    block = refusal.get("candidate_block")
    candidate = "its rolled-back version" if block is None else f"its rolled-back M_{block}"
    margin = refusal.get("margin_points")
    short = refusal.get("short_points")
    return (
        f"{name}: {candidate} has held-out accuracy {pct(refusal.get('accuracy'))}, below the floor "
        f"{pct(refusal.get('floor'))} (pre-deletion {pct(refusal.get('reference_accuracy'))} minus --floor-points "
        f"{float(refusal.get('floor_points') or 0.0):g}) plus the paired margin "
        + ("(not measured: below the bare floor already)" if margin is None else f"{float(margin):.2f} points")
        + f" = {pct(refusal.get('needed'))} needed"
        + ("" if short is None else f", {float(short):.2f} points short")
    )


def _record_refusals(store: ObjectStore, pending: Sequence[Any], refused: dict[str, dict[str, Any]]) -> None:
    """Note on each pending request no interim was published for why, with the figures (``interim_refused``).

    ``forget --status`` shows it while the request waits, and from its history once the retrain settled it (a
    settled status replaces the details; the history keeps this note).
    """
    ledger = DeletionLedger(store)
    for entry in pending:
        named = {name: {k: v for k, v in r.items() if k != "requests"} for name, r in refused.items()}
        named = {name: r for name, r in named.items() if entry.request_id in refused[name]["requests"]}
        if not named or getattr(entry, "status", None) != PENDING:
            continue
        details = dict(getattr(entry, "details", None) or {})
        if details.get("interim_refused") == named:  # already noted by an earlier pass
            continue
        ledger.transition(
            entry.request_id,
            status=PENDING,
            details={**details, "interim_refused": named},
            allowed_from=(PENDING,),
        )


def _record_interim_failures(store: ObjectStore, pending: Sequence[Any], failed: dict[str, dict[str, Any]]) -> None:
    """Note on each pending request whose interim could not be published why, and how to mend it (once per error)."""
    ledger = DeletionLedger(store)
    for entry in pending:
        named = [(name, f) for name, f in failed.items() if entry.request_id in f["requests"]]
        if not named or getattr(entry, "status", None) != PENDING:
            continue
        error = "; ".join(f"{name}: {f['error']}" for name, f in named)[:2000]
        details = dict(getattr(entry, "details", None) or {})
        if details.get("interim_error") == error:  # already noted by an earlier pass
            continue
        note = {**details, "interim_error": error, "interim_mend": named[0][1]["mend"]}
        ledger.transition(entry.request_id, status=PENDING, details=note, allowed_from=(PENDING,))


def release_refused(store: ObjectStore) -> dict[str, list[str]]:
    """Release every hold of a request that was rejected or cancelled before it was applied (run -> released).

    A refused request forgets nothing, so the runs it rolled back serve their full model again, or,
    while other holds remain, the newest block they allow that meets the served floor by the same
    judgement as an interim at acceptance (:func:`judged_block`; a sharded run's vote as a whole);
    when none does, the block served now stays. Run by the batch gate of every pass and by
    ``forget --cancel``.

    A run whose release needs a damaged or missing checkpoint (:class:`CorruptObject`, :class:`ObjectNotFound`)
    is skipped and keeps serving its version (rolled back below every hold, so it saw no open request's ids):
    each refused request it holds records the error and its mend (``release_failed``: run -> error,
    ``release_mend``; shown by ``forget --status``), the other runs are released, and the next call retries it
    (the note is dropped once that run's release goes through, e.g. after ``store check --repair``).
    """
    registry, ledger = RunRegistry(store), DeletionLedger(store)
    floor_points = float(load_rollback(store)["floor_points"])
    group_of = {m: members for members in sharded_runs(store).values() for m in members}
    out: dict[str, list[str]] = {}
    for run_id in registry.run_ids():
        _, target = pointer_target(registry, run_id)
        refused = {request_id for request_id in target.get("holds") or {} if ledger.refused(request_id)}
        if not refused:
            continue
        acceptable = judged_block(registry, run_id, group_of.get(run_id, [run_id]), floor_points=floor_points)
        try:
            released = release(registry, run_id, refused, acceptable=acceptable)
        except (CorruptObject, ObjectNotFound) as err:  # the run keeps serving its version; the next pass retries
            _note_release(ledger, run_id, refused, err)
            continue
        _note_release(ledger, run_id, refused, None)
        if released is not None:
            out[run_id] = sorted(refused)
    return out


_RELEASE_MEND = (
    "`obliviate store check --repair` rebuilds the damaged checkpoint by replay; meanwhile the run keeps serving "
    "the version rolled back for this request (it saw no open request's ids) and the next pass retries the release"
)


def _note_release(ledger: DeletionLedger, run_id: str, request_ids: set[str], err: Exception | None) -> None:
    """Record on each refused request why ``run_id``'s release of its hold failed (once per error), or clear it.

    ``forget --status`` shows it in the request's details: ``release_failed`` (run -> error) and ``release_mend``.
    """
    for request_id in sorted(request_ids):
        entry = ledger.get(request_id)
        details = dict(entry.details or {})
        failed = dict(details.get("release_failed") or {})
        if err is None:
            if run_id not in failed:
                continue
            failed.pop(run_id)
        else:
            error = f"{type(err).__name__}: {str(err).rstrip('.')}"[:2000]
            if failed.get(run_id) == error:  # already noted by an earlier pass
                continue
            failed[run_id] = error
            _rollback_logger().warning(
                "run %s: the rollback held for %s was not released: %s. %s", run_id, request_id, error, _RELEASE_MEND
            )
        details.pop("release_failed", None)
        details.pop("release_mend", None)
        if failed:
            details.update(release_failed=failed, release_mend=_RELEASE_MEND)
        ledger.transition(request_id, status=entry.status, details=details, allowed_from=(entry.status,))


def _rollback_logger() -> logging.Logger:
    return logging.getLogger(__name__)


def judged_block(
    registry: RunRegistry, run_id: str, members: Sequence[str], *, floor_points: float
) -> Callable[[int], bool]:
    """Whether serving block ``b`` of ``run_id`` meets the floor: the interim rule at acceptance.

    ``members``: the run alone, or its sharded run's members in shard order (the others keep what
    they serve now). The candidate must clear the pre-deletion accuracy minus ``floor_points`` plus
    its paired margin, both on the run's held-out set (:func:`heldout_judge`, built on first use).
    """
    position = list(members).index(run_id)

    @functools.cache
    def judged() -> tuple[HeldoutJudge, dict[int, int | None]]:
        states = [run_state(registry, m) for m in members]
        if any(s is None for s in states):
            raise ConfigError(f"a member of {list(members)} has no published version; train it first.")
        ready = [s for s in states if s is not None]
        return heldout_judge(registry, ready), {k: s.served_block for k, s in enumerate(ready)}

    @functools.cache
    def alone() -> RunState | None:
        # a sharded run is judged as one vote: no single interim records that
        return run_state(registry, run_id) if list(members) == [run_id] else None

    @functools.cache
    def recorded() -> dict[int, tuple[float, float, float]]:
        state = alone()
        return {} if state is None else recorded_judgements(registry, state)

    def acceptable(block: int) -> bool:
        # A block an interim of the same chain judged (served, or judged for this release) is decided again by its
        # figures at today's floor without loading a model (forget --cancel stays torch-free); any other is judged now.
        if block in recorded():
            _verify_candidate(registry, alone(), block)
            accuracy, reference, margin = recorded()[block]
            return accuracy >= served_floor(pre_deletion_accuracy=reference, floor_points=floor_points) + margin / 100
        judge, served = judged()
        return judge.meets_floor({**served, position: block}, floor_points=floor_points)

    return acceptable


def _verify_candidate(registry: RunRegistry, state: RunState | None, block: int) -> None:
    """Check the bytes of the checkpoint a release would serve at ``block``, as the judge's load of it did.

    Raises:
        CorruptObject, ObjectNotFound: it is damaged or gone; the release is skipped and noted (release_refused).
    """
    if state is None:
        return
    candidate = state.manifest.members.get(str(block)) or full_chain(registry, state).members.get(str(block))
    if candidate is not None:
        registry.store.get_member(
            Manifest(key=candidate.key, members={"m": candidate}, metadata={}, created_at=0.0), "m"
        )


def recorded_judgements(registry: RunRegistry, state: RunState) -> dict[int, tuple[float, float, float]]:
    """``block -> (held-out accuracy, pre-deletion accuracy, paired margin points)`` as the interims recorded them.

    Only interims that judged the very candidate :func:`heldout_judge` would load for ``state`` now count: published
    by a rollback from the full chain ``state`` derives from (so against the same pre-deletion model), holding the
    same checkpoint at that block, with its margin and accuracy recorded. The figures are those the interim's own
    judgement used (the checkpoint's recorded held-out accuracy, the reference's, the margin of their predictions),
    so :meth:`HeldoutJudge.meets_floor` would compute the same. Blocks above an interim's own come from the
    judgements it made for a later release (:func:`storage.serving.release_judgements`: holds placed in one pass
    left no interim at the block a release serves), each for the checkpoint it judged. A manifest that cannot be
    read is skipped.
    """
    _, full_key = chain_source(state.version, state.manifest)
    full = full_chain(registry, state)

    def candidate(block: int) -> ObjectInfo | None:
        return state.manifest.members.get(str(block)) or full.members.get(str(block))

    out: dict[int, tuple[float, float, float]] = {}
    ahead: dict[int, tuple[float, float, float]] = {}
    for key in registry.store.list(f"runs/{state.run_id}/manifests"):
        if "-interim-" not in key.rsplit("/", 1)[-1]:
            continue
        try:
            manifest = registry.store.read_manifest(key)
        except (CorruptObject, ObjectNotFound):
            continue
        meta = manifest.metadata
        if meta.get("published_for") != "rollback" or (meta.get("chain_of") or {}).get("manifest") != full_key:
            continue
        ahead.update(_judged_ahead(meta.get(RELEASE_JUDGEMENTS), candidate))
        block, margin, reference = (
            meta.get("serve_block"),
            meta.get("interim_margin_points"),
            meta.get("reference_accuracy"),
        )
        if block is None or margin is None or reference is None:
            continue
        if candidate(int(block)) is None or manifest.members.get(str(block)) != candidate(int(block)):
            continue
        accuracies = {int(c["block_index"]): c.get("heldout_accuracy") for c in meta["chain"]["checkpoints"]}
        if accuracies.get(int(block)) is None:
            continue
        out[int(block)] = (float(accuracies[int(block)]), float(reference), float(margin))
    return {**ahead, **out}


def _judged_ahead(records: Any, candidate: Callable[[int], ObjectInfo | None]) -> dict[int, tuple[float, float, float]]:
    """The blocks an interim judged for a later release (:func:`storage.serving.release_judgements`) whose checkpoint
    is still the candidate a judge would load now; a record of another shape is skipped."""
    out: dict[int, tuple[float, float, float]] = {}
    for record in records if isinstance(records, list) else []:
        try:
            block = int(record["block"])
            judged = ObjectInfo(**record["checkpoint"])
            figures = (float(record["accuracy"]), float(record["reference_accuracy"]), float(record["margin_points"]))
        except (KeyError, TypeError, ValueError):
            continue
        if candidate(block) == judged:
            out[block] = figures
    return out
