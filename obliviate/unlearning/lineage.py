"""Lineage manifests and proof by replay (SPEC section 6, Proof).

A published version carries a lineage manifest: per block, the sha256 of its stored checkpoint,
the sha256 of the block's sample-id list *after* deletions, and for the whole chain the config
fingerprint, seed, torch version, CPU capability and thread count. :func:`verify_replay` re-trains
chosen blocks from their stored predecessors and checks:

1. every stored checkpoint's bytes hash to the lineage's sha256 (a flipped byte is caught);
2. every block's id list (plan minus deleted ids) hashes to the lineage's entry;
3. no id of an applied request is in any block's id list;
4. stored M_0 is the seeded initial checkpoint of the recipe (:func:`~obliviate.unlearning.trainer.initial_checkpoint`
   of the version's config: its model and its fresh optimizer state, bit for bit), whatever ``blocks`` says (it
   costs one model initialisation): a chain started from a model that saw the deleted ids replays bit for bit;
5. re-training block i from stored M_{i-1} without the deleted ids reproduces all the state block
   training carries in stored M_i bit for bit: the model, the optimizer state (every moment tensor,
   step count and param group) and the schedule position. Moments carried from a model trained on
   the deleted ids reproduce the next block's model; only this check catches them.

A version holding DeepObliviate's stitched checkpoints (SPEC 5) fails: they are estimates, not
retrains, so no replay can reproduce them; :func:`verify_replay` names them and does not replay them.

Exact retraining is bit-identical to naive retraining on the same CPU instruction set, torch build
and thread count (SPEC 4). A replay on another machine type (e.g. AVX2 vs AVX-512 kernels) or
torch version may differ in the last bits: :func:`verify_replay` then reports ``inconclusive`` and
names the difference instead of ``failed``; the same holds for the M_0 check (4), as initialisation can differ
between torch builds; checks 1-3 do not depend on the machine.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from obliviate.errors import ConfigError
from obliviate.unlearning.chain import BlockData, Checkpoint
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.plan import BlockPlan
from obliviate.unlearning.trainer import BlockTrainer, initial_checkpoint

LINEAGE_FORMAT = "obliviate.lineage/1"
PASSED, FAILED, INCONCLUSIVE = "passed", "failed", "inconclusive"


def ids_sha256(ids: Iterable[int]) -> str:
    """SHA-256 of a sorted id list as little-endian int64 bytes."""
    values = np.sort(np.fromiter((int(i) for i in ids), dtype=np.int64))
    return hashlib.sha256(values.astype("<i8").tobytes()).hexdigest()


def effective_block_ids(plan: BlockPlan, *, block: int, deleted: frozenset[int] | set[int]) -> np.ndarray:
    """The ids block ``block`` trains on: its planned ids minus the deleted ones."""
    ids = plan.block_ids(block)
    return ids[~np.isin(ids, np.fromiter(deleted, dtype=np.int64, count=len(deleted)))]


def environment(*, num_threads: int) -> dict[str, Any]:
    """What bit-identity depends on: torch build, CPU kernel capability, architecture, threads."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return {
        "torch_version": torch.__version__,
        "cpu_capability": str(capability),
        "machine": platform.machine(),
        "num_threads": int(num_threads),
    }


def lineage_manifest(
    *,
    config: BlockTrainingConfig,
    plan: BlockPlan,
    deleted_ids: frozenset[int],
    checkpoint_sha256: Mapping[int, str],
    through_block: int | None = None,
) -> dict[str, Any]:
    """The lineage of a chain version (JSON-able); ``checkpoint_sha256``: block index -> stored sha256.

    ``through_block`` s: the lineage of a version that keeps only M_0..M_s (a rolled-back or
    progressive version, issue 11); it is recorded in the manifest. Default: the whole chain.

    Raises:
        ConfigError: a checkpoint M_0..M_s (M_0..M_B) without a sha256.
    """
    last = config.num_blocks if through_block is None else through_block
    missing = [i for i in range(last + 1) if i not in checkpoint_sha256]
    if missing:
        raise ConfigError(f"lineage needs the stored sha256 of every checkpoint M_0..M_{last}; missing {missing[:10]}.")
    return {
        "format": LINEAGE_FORMAT,
        "config_fingerprint": config.fingerprint,
        "seed": config.seed,
        "plan_fingerprint": plan.fingerprint,
        "deleted_count": len(deleted_ids),
        "deleted_sha256": ids_sha256(deleted_ids),
        "environment": environment(num_threads=config.num_threads),
        **({} if through_block is None else {"through_block": through_block}),
        "blocks": [
            {
                "block": i,
                "checkpoint_sha256": checkpoint_sha256[i],
                "ids_sha256": ids_sha256(effective_block_ids(plan, block=i, deleted=deleted_ids))
                if i
                else ids_sha256([]),
                "count": int(effective_block_ids(plan, block=i, deleted=deleted_ids).size) if i else 0,
            }
            for i in range(last + 1)
        ],
    }


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_replay` (``status``: passed, failed or inconclusive) and every finding."""

    status: str = PASSED
    blocks_replayed: list[int] = field(default_factory=list)
    blocks_not_replayed: list[int] = field(default_factory=list)
    bit_identical: dict[int, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    environment_differences: list[str] = field(default_factory=list)
    initial_model_seeded: bool | None = None  # stored M_0 is the recipe's seeded M_0 (None: M_0 unreadable)

    def fail(self, message: str) -> None:
        self.status = FAILED
        self.problems.append(message)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "blocks_replayed": self.blocks_replayed,
            "blocks_not_replayed": self.blocks_not_replayed,
            "bit_identical": {str(k): v for k, v in self.bit_identical.items()},
            "problems": self.problems,
            "environment_differences": self.environment_differences,
            "initial_model_seeded": self.initial_model_seeded,
        }


def check_blocks_choice(spec: str | int, *, num_blocks: int | None = None) -> int | None:
    """The block number ``spec`` names (``None`` for ``all`` or ``retrained``), refusing any other choice.

    With ``num_blocks`` unknown (the run not read yet: ``verify`` checks the syntax before it opens the
    store) a number is only checked to be 1 or more; :func:`choose_blocks` checks it against the run.

    Raises:
        ConfigError: not ``all``, ``retrained`` nor a block number (1..``num_blocks``).
    """
    if spec in ("all", "retrained"):
        return None
    upto = f"1..{num_blocks}" if num_blocks is not None else "(1..the run's number of blocks)"
    rule = f"--blocks must be all, retrained or a block number {upto}; got {spec!r}."
    try:
        block = int(spec)
    except ValueError:
        raise ConfigError(rule) from None
    if block < 1 or (num_blocks is not None and block > num_blocks):
        raise ConfigError(rule)
    return block


def choose_blocks(spec: str | int, *, num_blocks: int, deleted_from: int | None) -> list[int]:
    """Blocks to replay: ``all``, one block number, or ``retrained`` (blocks from the earliest deletion on).

    Raises:
        ConfigError: another choice, or a block number outside 1..``num_blocks`` (:func:`check_blocks_choice`).
    """
    block = check_blocks_choice(spec, num_blocks=num_blocks)
    if block is not None:
        return [block]
    if spec == "all":
        return list(range(1, num_blocks + 1))
    return list(range(deleted_from or num_blocks + 1, num_blocks + 1))


def _same_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))
    return [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


def _plain(value: Any) -> Any:
    """``value`` as stored checkpoints hold it after JSON (tuples as lists, keys as strings)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    return bool(_plain(a) == _plain(b))


def _optimizer_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The optimizer-state entries that differ, named as stored (``optimizer/<param id>/<key>``, ``param_groups``)."""

    def entries(state: Mapping[str, Any]) -> dict[str, Any]:
        return {
            f"optimizer/{param}/{key}": value
            for param, values in state.get("state", {}).items()
            for key, value in values.items()
        }

    ea, eb = entries(a), entries(b)
    differing = [
        name for name in {**ea, **eb} if name not in ea or name not in eb or not _same_value(ea[name], eb[name])
    ]
    if _plain(a.get("param_groups", [])) != _plain(b.get("param_groups", [])):
        differing.append("optimizer/param_groups")
    return differing


def _checkpoint_differences(replayed: Checkpoint, stored: Checkpoint) -> list[tuple[str, str]]:
    """(part, how) for each part of the state training carries from block to block that differs (empty: none).

    The parts: the model, the optimizer state (moments, step counts, param groups), the schedule position.
    """
    found = []
    model = _same_state(replayed.model_state, stored.model_state)
    if model:
        found.append(("model", f"{len(model)} tensors differ, e.g. {model[0]}"))
    optimizer = _optimizer_differences(replayed.optimizer_state, stored.optimizer_state)
    if optimizer:
        found.append(("optimizer state", f"{len(optimizer)} entries differ, e.g. {optimizer[0]}"))
    if replayed.schedule_position != stored.schedule_position:
        found.append(("schedule position", f"stored {stored.schedule_position}, replayed {replayed.schedule_position}"))
    return found


def verify_replay(
    *,
    config: BlockTrainingConfig,
    plan: BlockPlan,
    deleted_ids: frozenset[int],
    data: BlockData,
    lineage: Mapping[str, Any],
    checkpoints: Mapping[int, Checkpoint],
    stored_sha256: Mapping[int, str],
    unreadable: Mapping[int, str],
    applied_ids: Sequence[int],
    blocks: Sequence[int],
) -> VerifyReport:
    """Check a stored chain version against its lineage and by re-training ``blocks`` (SPEC 6, Proof).

    Args:
        config: the version's chain config (from its manifest).
        plan: the version's block plan (from its manifest).
        deleted_ids: the training positions the version has deleted (from its manifest).
        data: the run's training and held-out data.
        lineage: the version's lineage manifest.
        checkpoints: the readable stored checkpoints by block index.
        stored_sha256: sha256 of the stored bytes by block index (as read now).
        unreadable: block index -> why its checkpoint could not be read (corrupt, missing).
        applied_ids: training positions of every id of every applied request.
        blocks: the blocks to re-train (1-based); a subset (``verify --blocks N``) replays only those, while
            stored M_0 is checked against the recipe's seeded initial checkpoint whatever the subset (it costs
            one model initialisation, and a chain that did not start there proves nothing).

    Returns:
        the report of every check: ``passed``, ``failed`` (with what failed) or ``inconclusive`` (a replay on
        another machine type or torch build).
    """
    report = VerifyReport()
    if lineage.get("format") != LINEAGE_FORMAT:
        report.fail(f"lineage format must be {LINEAGE_FORMAT!r}; got {lineage.get('format')!r}.")
        return report
    if lineage["config_fingerprint"] != config.fingerprint:
        report.fail(
            f"config fingerprint {config.fingerprint} differs from the lineage's {lineage['config_fingerprint']}."
        )
    by_block = {int(b["block"]): b for b in lineage["blocks"]}
    for index, why in sorted(unreadable.items()):
        report.fail(f"checkpoint M_{index} cannot be read: {why}")
    for index, digest in sorted(stored_sha256.items()):
        expected = by_block.get(index, {}).get("checkpoint_sha256")
        if digest != expected:
            report.fail(
                f"checkpoint M_{index}: stored bytes hash to {digest[:16]}…, lineage says {str(expected)[:16]}…."
            )
    # A rolled-back version keeps (and its lineage lists) only M_0..M_s: ``through_block`` = s.
    for block in range(1, int(lineage.get("through_block", config.num_blocks)) + 1):
        ids = effective_block_ids(plan, block=block, deleted=deleted_ids)
        if ids_sha256(ids) != by_block.get(block, {}).get("ids_sha256"):
            report.fail(f"block {block}: its id list after deletions does not hash to the lineage's entry.")
        left = sorted({int(i) for i in applied_ids} & set(ids.tolist()))
        if left:
            report.fail(f"block {block} still lists ids of applied requests: {left[:10]} (they were not deleted).")
    here = environment(num_threads=config.num_threads)
    recorded = dict(lineage.get("environment", {}))
    report.environment_differences = [
        f"{key}: recorded {recorded.get(key)!r}, here {value!r}"
        for key, value in here.items()
        if recorded.get(key) != value
    ]
    # DeepObliviate's stitched checkpoints are estimates by design: a replay would retrain the exact
    # block and "find" a mismatch, which reads as tampering. Say what they are instead.
    stitched = sorted(i for i, checkpoint in checkpoints.items() if checkpoint.origin == "stitched")
    if stitched:
        report.fail(
            f"M_{stitched[0]}..M_{stitched[-1]} are DeepObliviate estimates (stitched onto the retrained "
            f"M_{stitched[0] - 1}), not retrains: replay proves exact retraining only, so nothing proves this "
            "version forgot its deleted ids. For a version verify can prove, forget with the exact policy "
            "(`obliviate serve --policy exact`, the default)."
        )
    if 0 in checkpoints:  # whatever ``blocks`` says: one model initialisation
        initial = _checkpoint_differences(initial_checkpoint(config, data=data), checkpoints[0])
        report.initial_model_seeded = not initial
        if initial:
            _unreproduced(
                report,
                f"M_0 is not the seeded initial model of this recipe ({config.model}, seed {config.seed}): its "
                + "; ".join(f"{part} differs from a fresh initialisation ({how})" for part, how in initial),
                consequence="the chain did not start from the recipe's M_0 (one that saw deleted ids replays bit "
                "for bit), so replaying its blocks proves nothing",
            )
    trainer = BlockTrainer(config=config, data=data, plan=plan)
    mismatched = []
    for block in blocks:
        if block in stitched:
            report.blocks_not_replayed.append(block)
            continue
        if block - 1 not in checkpoints or block not in checkpoints:
            missing = " and ".join(f"M_{i}" for i in (block - 1, block) if i not in checkpoints)  # only those unread
            report.fail(f"block {block}: cannot replay without readable stored {missing}.")
            report.blocks_not_replayed.append(block)
            continue
        replayed = next(iter(trainer.run(start=checkpoints[block - 1], last_block=block, excluded_ids=deleted_ids)))
        differing = _checkpoint_differences(replayed, checkpoints[block])
        report.blocks_replayed.append(block)
        report.bit_identical[block] = not differing
        mismatched += [f"{part} of block {block} differs from replay ({how})" for part, how in differing]
    if mismatched:
        _unreproduced(
            report,
            "re-training did not reproduce the stored checkpoints: " + "; ".join(mismatched[:5]),
            consequence="the stored model was not produced by this chain",
        )
    return report


def _unreproduced(report: VerifyReport, message: str, *, consequence: str) -> None:
    """A state that should be bit-identical is not: failed on the lineage's environment, else inconclusive."""
    if not report.environment_differences:
        report.fail(f"{message} on a matching environment: {consequence}.")
        return
    if report.status == PASSED:
        report.status = INCONCLUSIVE
    report.problems.append(
        message + ". Bit-identity is promised only on the same CPU capability, torch build and thread count; "
        "this machine differs (" + "; ".join(report.environment_differences) + "). Re-run verify on a "
        "machine matching the lineage's environment."
    )
