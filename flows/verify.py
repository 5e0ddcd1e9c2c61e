"""Proof by replay (SPEC section 6): the ``verify`` flow and the store-reading work behind it.

:func:`verify_run` reads a published version of a run (its manifest, lineage and checkpoints,
each checkpoint hashed as stored), maps the ids of every request the version applied to training
positions, and calls :func:`obliviate.unlearning.lineage.verify_replay`, which checks that stored
M_0 is the recipe's seeded initial model, re-trains the chosen blocks from their stored predecessors
and checks bit-identity of everything training carries (model, optimizer state, schedule position).
The result is written to the store under ``ledger/verifications/`` (next to the deletion ledger;
the audit trail) and, in :func:`verify_flow`, as a Prefect markdown artifact. The shards of a sharded
run are replayed side by side as Ray tasks, one CPU each (:func:`verify_shards`,
:func:`verify_shards_flow`).

A version published before lineage manifests existed is checked against a lineage derived from its
manifest (the checksums the store committed); the report says so.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from obliviate.data import load_dataset
from obliviate.errors import ConfigError, ObliviateError
from obliviate.unlearning.chain import Chain, Checkpoint
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.lineage import (
    FAILED,
    VerifyReport,
    check_blocks_choice,
    choose_blocks,
    lineage_manifest,
    verify_replay,
)
from obliviate.unlearning.plan import BlockPlan
from obliviate.unlearning.service import RunSpec, block_data, check_name
from storage.check import _SEE_STORE_CHECK
from storage.errors import CorruptObject, ObjectNotFound, StorageError, StoreNotShared, WriteFailed
from storage.objects import Manifest, ObjectStore, not_shared_text
from storage.registry import ModelVersion, RunRegistry, legacy_pruned_key, pruned_key
from storage.serving import chain_source, group_members

#: Where verify records its results: next to the deletion ledger (the audit trail).
VERIFICATIONS = "ledger/verifications"


def check_report_writable(store_url: str) -> None:
    """Write and delete a temporary file where verify records its result (``ledger/verifications/``).

    Called before any replay: the store's root can take writes while that folder cannot (a read-only
    ledger mount, a bucket policy on the prefix, a file in its place), and a replay that cannot record
    its result is work lost. On a file store the folder is created, as the first report would create it.

    Raises:
        WriteFailed: nothing can be written there.
        StorageUnavailable: the backend cannot be reached.
    """
    reports = ObjectStore(store_url).child(VERIFICATIONS)
    try:
        if reports.is_local:
            reports.ensure_container()
        reports.check_writable()
    except WriteFailed as err:
        said = str(err).rstrip(".")
        raise WriteFailed(
            f"verify records its result under {reports.url}, and that cannot be written: {said}. Nothing was "
            "replayed; make that folder writable (or free space on its disk), then run verify again."
        ) from err


class NothingRetrained(ConfigError):
    """``--blocks retrained`` of a version with no deletion applied: no block of it was retrained.

    A sharded run's deletions usually touch some of its shards only: a shard without one is verified with
    no block replayed, and the choice is refused only when no shard has a deletion.
    """


@dataclass(frozen=True)
class UnreadableVersion:
    """A version whose records verify cannot find: a record read to find them is damaged or gone.

    The version pointer (which manifest the version serves, which requests and ids it applied) or,
    for a past version, the run's pruned record (whether its checkpoints were deleted on purpose).
    Like a damaged manifest, it is verify's finding (a failed report), not a refusal.
    """

    run_id: str
    version: int
    key: str  # the record that cannot be read
    problem: str  # why, and how to mend it


@dataclass(frozen=True)
class DamagedPrunedRecord:
    """The run's pruned record cannot be read, when verify read it to know whether a past version was pruned.

    Not a verdict on its own: the record only says whether a version's checkpoints were deleted on purpose
    (retention, a purge of superseded versions), so a version whose manifest and checkpoints are all there
    is replayed as usual; the report names the record and its mend, and a checkpoint found missing says that
    whether it was deleted on purpose is unknown.
    """

    run_id: str
    key: str  # the record's version (or legacy file) that cannot be read
    url: str
    error: str  # why it cannot be read, as the store said

    def missing_words(self, version: int) -> str:
        """Appended to the problem of a record of version ``version`` found missing."""
        return (
            f"; it is missing, and whether it was deleted on purpose (retention or a purge pruned version {version}) "
            f"is unknown: the run's pruned record, which says so, cannot be read ({self.url}, note below)"
        )

    def note(self, *, version: int, missing: list[str] | None) -> str:
        """The report's note: the record, why it cannot be read, what it leaves unknown and its mend.

        Args:
            version: the version verified.
            missing: what of it was found gone (its manifest, checkpoints ``M_i``); ``None``: not looked for (a
                record read before them cannot be read).
        """
        said = self.error.replace(_SEE_STORE_CHECK, "").rstrip(".")
        what = (
            f"the pruned record of run {self.run_id} (which of its versions retention or a purge deleted the "
            f"checkpoints of, {self.url}) cannot be read: {said}."
        )
        if missing:
            unknown = (
                f" So whether {', '.join(missing)} of version {version} {'was' if len(missing) == 1 else 'were'} "
                f"deleted on purpose (then version {version} can no longer be replayed) or lost (`obliviate store "
                "check --repair` rebuilds a lost checkpoint by replay) is unknown until the record is restored."
            )
        elif missing is None:
            unknown = f" Whether version {version} was pruned (its checkpoints deleted on purpose) is unknown too."
        else:
            unknown = (
                f" The result above does not rest on it: it only tells whether a version's checkpoints were deleted "
                f"on purpose, and none of version {version}'s was found missing."
            )
        return (
            f"{what}{unknown} It is not rebuildable by store check: restore it from a backup (`obliviate store check` "
            "reports it too)."
        )


def _version(
    registry: RunRegistry, run_id: str, version: int | None
) -> tuple[ModelVersion | UnreadableVersion, DamagedPrunedRecord | None]:
    """The version to verify (default: the current one), or the record that keeps verify from finding it; and the
    run's pruned record when it was read (for a past version) and cannot be.

    A damaged pruned record does not keep verify from a past version: whether that version was pruned is then
    unknown, and its records, read as usual, tell whether it can be replayed.

    Raises:
        ConfigError: the run has no version, or ``version`` is outside 1..current or was pruned.
    """
    pointer_key = registry.pointer_key(run_id)
    try:
        current = registry.current(run_id)
    except (CorruptObject, ObjectNotFound) as err:
        versions = registry.store.pointer_versions(pointer_key)
        if not versions:
            raise
        newest = versions[-1]
        if version is None or version == newest:
            return _unreadable_pointer(registry, run_id, newest, err), None
        check_version_choice(version, current=newest, run_id=run_id)
        current_version = newest
    else:
        if current is None:
            raise ConfigError(f"run {run_id!r} has no published version in {registry.store.uri()}; train it first.")
        if version is None or version == current.version:
            return current, None  # the current version is never pruned: its pruned record is not read
        check_version_choice(version, current=current.version, run_id=run_id)
        current_version = current.version
    damage = None
    try:
        pruned = registry.pruned_versions(run_id)
    except (CorruptObject, ObjectNotFound) as err:
        damage, pruned = _damaged_pruned_record(registry, run_id, err), {}
    if version in pruned:
        kept = [v for v in range(1, current_version + 1) if v not in pruned]
        how = (
            "purged after a later version applied deletions (SPEC 5: no stored checkpoint trained on a deleted id "
            "remains; `obliviate serve --keep-superseded-versions` keeps them)"
            if pruned[version].get("superseded")
            else f"pruned by `obliviate store check --repair --keep-versions {pruned[version].get('keep_versions')}`"
        )
        raise ConfigError(
            f"version {version} of run {run_id!r} was {how}: its checkpoints are deleted, so it can no longer be "
            f"replayed. Verify a kept version ({', '.join(map(str, kept[-5:]))}), e.g. --version {current_version}."
        )
    try:
        pointer = registry.store.read_pointer_version(pointer_key, version)
    except (CorruptObject, ObjectNotFound) as err:
        return _unreadable_pointer(registry, run_id, version, err), damage
    return ModelVersion.from_pointer(run_id, pointer), damage


def _unreadable_pointer(registry: RunRegistry, run_id: str, version: int, err: Exception) -> UnreadableVersion:
    """Version ``version``'s pointer version cannot be read: which record, and how to mend it."""
    key = f"{registry.pointer_key(run_id)}/v{version:09d}.json"
    what = (
        f"the version pointer of version {version} of run {run_id} (which manifest the version serves and which "
        f"requests and ids it applied, {registry.store.uri(key)})"
    )
    return UnreadableVersion(run_id=run_id, version=version, key=key, problem=_unreadable(what, err))


def _damaged_pruned_record(registry: RunRegistry, run_id: str, err: Exception) -> DamagedPrunedRecord:
    """The run's pruned record cannot be read: which of its versions (or the legacy file), and why."""
    record = pruned_key(run_id)
    versions = registry.store.pointer_versions(record)
    key = f"{record}/v{versions[-1]:09d}.json" if versions else legacy_pruned_key(run_id)
    return DamagedPrunedRecord(run_id=run_id, key=key, url=registry.store.uri(key), error=str(err))


def check_version_choice(version: int | None, *, current: int | None = None, run_id: str = "") -> None:
    """Refuse a ``--version`` outside 1..``current`` (``current`` unknown, the store not read yet: below 1).

    Raises:
        ConfigError: the rule, with the run's versions where known.
    """
    if version is None or (1 <= version and (current is None or version <= current)):
        return
    rule = f"in 1..{current} for run {run_id!r}" if current is not None else "a version number, 1 or more"
    raise ConfigError(f"--version must be {rule}; got {version}.")


def check_choices(*, version: int | None, blocks: str) -> None:
    """Refuse a ``--version`` or ``--blocks`` that names no version or block of any run, before the store is opened.

    The same rules as once the run is read (:func:`check_version_choice`, :func:`check_blocks_choice`), less
    the run's own bounds: a typo is answered at once, not after the store (and S3) answers.

    Raises:
        ConfigError: the rule and the value seen.
    """
    check_blocks_choice(blocks)
    check_version_choice(version)


def runs_to_verify(store_url: str, run_id: str, *, version: int | None) -> list[str]:
    """``run_id``, or the shards of the sharded run of that name (``train --shards``), in shard order.

    Raises:
        ConfigError: ``version`` given for a sharded run (each shard has its own versions).
    """
    check_name(run_id, what="run id")
    members = group_members(ObjectStore(store_url), run_id)
    if not members:
        return [run_id]
    if version is not None:
        raise ConfigError(
            f"{run_id!r} is a sharded run ({', '.join(members)}) and each shard has its own versions; verify one "
            f"shard's version with --run {members[0]} --version {version}, or leave out --version."
        )
    return members


def check_request(store_url: str, run_id: str, *, version: int | None, blocks: str) -> None:
    """Refuse what :func:`verify_run` would refuse, from a few registry reads and a write probe, before any work starts.

    Raises:
        ConfigError: a malformed run id, a run with no published version, a version outside
            1..current, or a ``blocks`` choice that names no block of the run.
        NothingRetrained: ``blocks`` is ``retrained`` and the version has no deletion applied.
        WriteFailed: the result could not be recorded (:func:`check_report_writable`).
    """
    check_name(run_id, what="run id")
    registry = RunRegistry(ObjectStore(store_url))
    chosen, _ = _version(registry, run_id, version)  # a damaged pruned record: said in verify_run's report
    if isinstance(chosen, UnreadableVersion):  # verify's finding too: verify_run records it in a report
        check_report_writable(store_url)
        return
    try:
        chain_meta = registry.manifest(chosen).metadata["chain"]
    except (CorruptObject, ObjectNotFound):
        # a damaged manifest is verify's finding, not a refusal: verify_run records it in a report
        check_report_writable(store_url)
        return
    config = BlockTrainingConfig.from_dict(chain_meta["config"])
    choose_blocks(blocks, num_blocks=config.num_blocks, deleted_from=None)
    if blocks == "retrained" and not chain_meta["deleted_ids"]:
        raise NothingRetrained(
            f"--blocks retrained replays the blocks retrained after a deletion, but run {run_id} version "
            f"{chosen.version} has no deletion applied, so no block was retrained. Use --blocks all (or a block "
            "number) to replay its training."
        )
    check_report_writable(store_url)


def verify_run(store_url: str, run_id: str, *, version: int | None = None, blocks: str = "all") -> dict[str, Any]:
    """Verify one published version by replay; returns the report (also written to the store).

    Raises:
        ConfigError: unknown run or version, or a bad ``blocks`` choice.
        WriteFailed: the result cannot be recorded: found before the replay, or (a disk filled
            meanwhile) after it, with the replay's verdict in the message.
    """
    began = time.perf_counter()
    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    check_name(run_id, what="run id")
    chosen, damage = _version(registry, run_id, version)
    check_report_writable(store_url)  # before the replay: a result that cannot be recorded is work lost
    if isinstance(chosen, UnreadableVersion):
        result = _unreadable_result(chosen, blocks=blocks, unreadable={chosen.key: chosen.problem}, began=began)
        return _record(store, _with_damage(result, damage, missing=None))
    records = _read_records(registry, chosen, damage)
    if isinstance(records, UnreadRecords):
        result = _unreadable_result(chosen, blocks=blocks, unreadable=records.problems, began=began)
        return _record(store, _with_damage(result, damage, missing=records.missing or None))
    spec, manifest = records
    chain_meta = manifest.metadata["chain"]
    config = BlockTrainingConfig.from_dict(chain_meta["config"])
    plan = BlockPlan.from_dict(chain_meta["plan"])
    deleted = frozenset(int(i) for i in chain_meta["deleted_ids"])
    checkpoints: dict[int, Checkpoint] = {}
    stored_sha256: dict[int, str] = {}
    unreadable: dict[int, str] = {}
    missing: list[str] = []  # checkpoints gone while the pruned record, which may say why, cannot be read
    # a rolled-back (interim or progressive) version keeps only M_0..M_s (issue 11): verify those
    last = max(int(k) for k in manifest.members) if "serve_block" in manifest.metadata else config.num_blocks
    for index in range(last + 1):
        member = manifest.members.get(str(index))
        if member is None:
            unreadable[index] = "the manifest lists no such checkpoint"
            continue
        try:
            raw = store.get_member(manifest, str(index))
        except (CorruptObject, ObjectNotFound) as err:
            if damage is not None and isinstance(err, ObjectNotFound):  # pruned on purpose, or lost: unknown
                missing.append(f"M_{index}")
                unreadable[index] = f"{str(err).rstrip('.')}{damage.missing_words(chosen.version)}."
                continue
            # an exact chain's checkpoint is a pure function of its predecessor: replay can rebuild it
            fix = "" if "--repair" in str(err) else " `obliviate store check --repair` rebuilds it by replay."
            unreadable[index] = f"{err}{fix}"
            continue
        stored_sha256[index] = hashlib.sha256(raw).hexdigest()
        checkpoints[index] = registry.load_checkpoint(member.key, expected=member)
    lineage = manifest.metadata.get("lineage")
    derived = lineage is None
    if lineage is None:
        lineage = lineage_manifest(
            config=config,
            plan=plan,
            deleted_ids=deleted,
            checkpoint_sha256={int(k): v.sha256 for k, v in manifest.members.items()},
        )
    applied_positions, _ = spec.positions(chosen.deleted_ids)
    first_deleted = int(plan.block_of(sorted(deleted)).min()) if deleted else None
    data = block_data(spec, dataset=load_dataset(spec.dataset))
    report = verify_replay(
        config=config,
        plan=plan,
        deleted_ids=deleted,
        data=data,
        lineage=lineage,
        checkpoints=checkpoints,
        stored_sha256=stored_sha256,
        unreadable=unreadable,
        applied_ids=applied_positions.tolist(),
        blocks=[
            b for b in choose_blocks(blocks, num_blocks=config.num_blocks, deleted_from=first_deleted) if b <= last
        ],
    )
    result = {
        "run_id": run_id,
        "version": chosen.version,
        "applied_requests": list(chosen.applied_requests),
        "applied_ids": len(chosen.deleted_ids),
        "blocks": blocks,
        "lineage": "derived from the manifest (version predates lineage manifests)" if derived else "recorded",
        "seconds": time.perf_counter() - began,
        "verified_at": time.time(),
        # where the replay ran: bit-identity is promised on the lineage's CPU capability and torch build, and a
        # sharded run's shards are replayed in Ray tasks, on any node of the cluster
        "replayed_on": {"host": socket.gethostname(), "pid": os.getpid()},
        **report.as_dict(),
    }
    return _record(store, _with_damage(result, damage, missing=missing))


def _with_damage(
    result: dict[str, Any], damage: DamagedPrunedRecord | None, *, missing: list[str] | None
) -> dict[str, Any]:
    """``result`` with ``records_damaged`` (records that cannot be read but are no verdict: the run's pruned record)
    and a ``notes`` line for each, its status (and so verify's exit code) unchanged.

    ``missing``: what of the version was found gone, which the pruned record may say was deleted on purpose
    (``None``: not looked for).
    """
    result["records_damaged"] = [damage.key] if damage is not None else []
    result["notes"] = [damage.note(version=int(result["version"]), missing=missing)] if damage is not None else []
    return result


@dataclass(frozen=True)
class UnreadRecords:
    """Records of a version verify cannot read (:func:`_read_records`)."""

    problems: dict[str, str]  # each record's key -> why it cannot be read and how to mend it
    missing: list[str]  # those found gone while the run's pruned record, which may say why, is damaged


def _read_records(
    registry: RunRegistry, chosen: ModelVersion, damage: DamagedPrunedRecord | None = None
) -> tuple[RunSpec, Manifest] | UnreadRecords:
    """The run's spec and the version's manifest (its lineage, recipe and checkpoints), or why they cannot be read.

    A record that fails its checksum or is gone is a verdict, not a refusal: nothing can be replayed
    without it, and the report says which record and how to mend it (store check cannot rebuild either).
    A manifest gone while the run's pruned record (``damage``) cannot be read may have been pruned on purpose:
    its problem says so.

    Returns:
        Both records, or what cannot be read.
    """
    problems: dict[str, str] = {}
    missing: list[str] = []
    spec: RunSpec | None = None
    manifest: Manifest | None = None
    spec_key = f"runs/{chosen.run_id}/spec.json"
    try:
        spec = registry.spec(chosen.run_id)
    except (CorruptObject, ObjectNotFound) as err:
        problems[spec_key] = _unreadable(f"the run's spec (its data and split, {spec_key})", err)
    try:
        manifest = registry.manifest(chosen)
    except (CorruptObject, ObjectNotFound) as err:
        what = f"the manifest of version {chosen.version} (its lineage, recipe and checkpoints, {chosen.manifest_key})"
        gone = damage is not None and isinstance(err, ObjectNotFound)
        if gone:
            missing.append(f"its manifest ({chosen.manifest_key})")
        problems[chosen.manifest_key] = _unreadable(
            what, err, missing=damage.missing_words(chosen.version) if damage is not None and gone else ""
        )
    if spec is None or manifest is None:
        return UnreadRecords(problems=problems, missing=missing)
    return spec, manifest


def _unreadable(
    what: str, err: Exception, *, checked: str = ", with the versions that need it", missing: str = ""
) -> str:
    """A problem line: ``what`` cannot be read, the error (and ``missing``: why it may be gone), and the mend
    (``store check`` says the same for it)."""
    said = str(err).replace(_SEE_STORE_CHECK, "").rstrip(".")
    return (
        f"{what} cannot be read, so no block was replayed: {said}{missing}. It is not rebuildable by store check: "
        f"restore it from a backup (`obliviate store check` reports it too{checked}), then run verify again."
    )


def _unreadable_result(
    chosen: ModelVersion | UnreadableVersion, *, blocks: str, unreadable: dict[str, str], began: float
) -> dict[str, Any]:
    """The report of a version whose records cannot be read: failed, nothing replayed, each record's problem.

    Of an :class:`UnreadableVersion` what the version applied was not read: ``applied_requests`` and ``applied_ids``
    are ``None`` then.
    """
    known = isinstance(chosen, ModelVersion)
    return {
        "run_id": chosen.run_id,
        "version": chosen.version,
        "applied_requests": list(chosen.applied_requests) if known else None,
        "applied_ids": len(chosen.deleted_ids) if known else None,
        "blocks": blocks,
        "lineage": "unreadable (the manifest that records it cannot be read)"
        if known and chosen.manifest_key in unreadable
        else "not checked (nothing replayed)",
        "seconds": time.perf_counter() - began,
        "verified_at": time.time(),
        "records_unreadable": sorted(unreadable),
        **VerifyReport(status=FAILED, problems=list(unreadable.values())).as_dict(),  # initial_model_seeded: None
    }


def _record(store: ObjectStore, result: dict[str, Any]) -> dict[str, Any]:
    """Write ``result`` under ``ledger/verifications/`` (the audit trail); returns it with its ``report`` URL.

    Raises:
        StorageError: the store took writes before the replay and not now (a disk filled): the verdict is in the
            message.
    """
    key = f"{VERIFICATIONS}/{result['run_id']}-v{result['version']:06d}-{int(result['verified_at'])}.json"
    result["report"] = store.uri(key)
    try:
        store.put_json(key, result)
    except StorageError as err:  # writable before the replay, not now (a disk filled): say the verdict, not lose it
        raise type(err)(
            f"{str(err).rstrip('.')}. The replay's result was not recorded: {_verdict(result)}. Run verify again once the "
            "store takes writes, to record it."
        ) from err
    return result


def _verdict(result: dict[str, Any]) -> str:
    """One line: the status, the blocks bit-identical and the problems (for a result that could not be recorded)."""
    identical = sum(result["bit_identical"].values())
    problems = "".join(f"; {problem}" for problem in [*result["problems"], *result.get("notes", [])])
    return (
        f"verify {result['run_id']} v{result['version']}: {result['status']}; {identical}/"
        f"{len(result['bit_identical'])} replayed blocks bit-identical{initial_model_words(result)}{problems}"
    )


def initial_model_words(result: dict[str, Any]) -> str:
    """``; M_0 is the seeded initial model`` (or is NOT), empty where M_0 could not be read (its problem says so)."""
    seeded = result.get("initial_model_seeded")
    if seeded is None:
        return ""
    return "; M_0 is the seeded initial model" if seeded else "; M_0 is NOT the seeded initial model (below)"


def _markdown(result: dict[str, Any]) -> str:
    identical = f"{sum(result['bit_identical'].values())}/{len(result['bit_identical'])}"
    ids = result["applied_ids"]
    seeded = result.get("initial_model_seeded")
    initial = "not readable" if seeded is None else f"{'' if seeded else 'NOT '}the seeded initial model of this recipe"
    applied = (
        f"{len(result['applied_requests'])} ({ids} {'id' if ids == 1 else 'ids'})"
        if result["applied_requests"] is not None
        else "unknown (not read: a record verify reads first cannot be read, below)"
    )
    lines = [
        f"# verify {result['run_id']} v{result['version']}: **{result['status']}**",
        "",
        f"- requests applied: {applied}",
        f"- blocks replayed: {result['blocks_replayed']}",
        f"- bit-identical (model, optimizer state, schedule position): {identical}",
        f"- M_0: {initial}",
        f"- lineage: {result['lineage']}",
    ]
    if "replayed_on" in result:
        lines.append(f"- replayed on: {result['replayed_on']['host']} (process {result['replayed_on']['pid']})")
    lines += [f"- problem: {p}" for p in result["problems"]]
    lines += [f"- note: {n}" for n in result.get("notes", [])]
    lines += [f"- environment: {d}" for d in result["environment_differences"]]
    return "\n".join(lines)


#: How long the fan-out waits on Ray at a time: a Ctrl-C or SIGTERM is acted on between waits.
_WAIT_S = 1.0


def verify_shards(
    store_url: str,
    run_ids: list[str],
    *,
    in_process: bool = False,
    version: int | None = None,
    blocks: str = "all",
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Verify the shards of a sharded run: side by side on Ray, one CPU each (SPEC 6: each shard is its own chain),
    or with ``in_process`` one after another in this process, without Ray.

    Each shard's replay is :func:`verify_run`, in a Ray task or here: bit-identity does not depend on the process,
    since the replay fixes torch's thread count from the recipe. For a small run on a small machine the replay takes
    less than starting Ray does. On Ray, Ray must be started (:func:`flows.runtime.ensure_ray`).

    Args:
        in_process: replay here, one shard after another, instead of as Ray tasks.
        on_result: called with each shard's report as it ends (in the order they end).

    Returns:
        the reports, in the order of ``run_ids``.

    Raises:
        ObliviateError: a shard's own error (the store stopped taking writes, a run gone since it was checked),
            once every other shard's replay has ended and recorded its report.
    """
    finished = (
        _replays_in_process(store_url, run_ids, version=version, blocks=blocks)
        if in_process
        else _replays_on_ray(store_url, run_ids, version=version, blocks=blocks)
    )
    results: dict[str, dict[str, Any]] = {}
    errors: list[ObliviateError] = []
    with contextlib.closing(finished):  # interrupted, or an error not ours: no replay goes on unseen
        for run_id, report in finished:
            try:
                results[run_id] = report()
            except ObliviateError as err:  # the others go on: their reports are each a verdict of its own
                errors.append(err)
                continue
            if on_result is not None:
                on_result(results[run_id])
    if errors:
        raise errors[0]
    return [results[run_id] for run_id in run_ids]


# Each shard as its replay ends: its id and the call that returns its report or raises its own error.
_FinishedReplays = Generator[tuple[str, Callable[[], dict[str, Any]]], None, None]


def _replays_in_process(store_url: str, run_ids: list[str], *, version: int | None, blocks: str) -> _FinishedReplays:
    for run_id in run_ids:
        yield run_id, functools.partial(verify_run, store_url, run_id, version=version, blocks=blocks)


def _replays_on_ray(store_url: str, run_ids: list[str], *, version: int | None, blocks: str) -> _FinishedReplays:
    import ray

    from flows.train import worker_errors_as_their_own

    def report_of(ref: ray.ObjectRef) -> dict[str, Any]:
        with worker_errors_as_their_own():
            return ray.get(ref)

    replay = ray.remote(num_cpus=1)(replay_shard)
    pending = {
        replay.remote(store_url, run_id, published=run_ids, version=version, blocks=blocks): run_id
        for run_id in run_ids
    }
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=_WAIT_S)
            if done:
                yield pending.pop(done[0]), functools.partial(report_of, done[0])
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def replay_shard(
    store_url: str, run_id: str, *, published: Sequence[str], version: int | None = None, blocks: str = "all"
) -> dict[str, Any]:
    """:func:`verify_run` of a shard in a Ray task that may run on another node than the command's.

    Args:
        published: the shards the command found published (``run_id`` among them).

    Raises:
        StoreNotShared: none of ``published`` has a version in the store as this task reads it, so its node does
            not see the command's store (a run's versions are never deleted: pruning and purging keep its pointer's
            history). Verify's own line, "has no published version; train it first", sent the user to train it.
    """
    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    if not any(store.pointer_versions(registry.pointer_key(shard)) for shard in dict.fromkeys([run_id, *published])):
        pointer_key = registry.pointer_key(run_id)
        raise StoreNotShared(
            not_shared_text(
                store,
                missing=f"the version pointer {store.uri(pointer_key)} of shard {run_id}",
                written_in="the verify command found it published in",
                what=f"the replay of {run_id}",
            )
        )
    return verify_run(store_url, run_id, version=version, blocks=blocks)


def _artifact_and_log(result: dict[str, Any]) -> None:
    """A verified version's Prefect artifact (its markdown report) and log line."""
    key = f"verify-{result['run_id'].lower().replace('_', '-').replace('.', '-')}"
    create_markdown_artifact(key=key, markdown=_markdown(result))
    get_run_logger().info("verify %s v%s: %s", result["run_id"], result["version"], result["status"])


@flow(name="verify", log_prints=False)
def verify_flow(store: str, run_id: str, version: int | None = None, blocks: str = "all") -> dict[str, Any]:
    """Check M_0 is the seeded initial model, re-train blocks from stored predecessors, check bit-identity (SPEC 6)."""
    result = verify_run(store, run_id, version=version, blocks=blocks)
    _artifact_and_log(result)
    return result


@flow(name="verify-shards", log_prints=False)
def verify_shards_flow(
    store: str,
    run_id: str,
    shards: list[str],
    version: int | None = None,
    blocks: str = "all",
    in_process: bool = False,
) -> list[dict[str, Any]]:
    """:func:`verify_flow` of each shard of sharded run ``run_id``, side by side on Ray (``in_process``: one after
    another in the flow's process); one artifact per shard."""
    return verify_shards(
        store, shards, in_process=in_process, version=version, blocks=blocks, on_result=_artifact_and_log
    )


def chain_of(store_url: str, run_id: str) -> Chain:
    """The current chain of a run (for tests and notebooks)."""
    registry = RunRegistry(ObjectStore(store_url))
    current = registry.current(run_id)
    if current is None:
        raise ConfigError(f"run {run_id!r} is not trained.")
    version, key = chain_source(current, registry.manifest(current))  # a rolled-back version: its full chain
    return registry.load_chain(replace(current, version=version, manifest_key=key))[0]
