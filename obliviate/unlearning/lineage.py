"""Lineage manifests and proof by replay (SPEC section 6, Proof).

A published version carries a lineage manifest: per block, the sha256 of its stored checkpoint,
the sha256 of the block's sample-id list *after* deletions, and for the whole chain the config
fingerprint, seed, torch version, CPU capability and thread count. :func:`verify_replay` re-trains
chosen blocks from their stored predecessors and checks:

1. every stored checkpoint's bytes hash to the lineage's sha256 (a flipped byte is caught);
2. every block's id list (plan minus deleted ids) hashes to the lineage's entry;
3. no id of an applied request is in any block's id list;
4. re-training block i from stored M_{i-1} without the deleted ids reproduces stored M_i bit for bit.

A version holding DeepObliviate's stitched checkpoints (SPEC 5) fails: they are estimates, not
retrains, so no replay can reproduce them; :func:`verify_replay` names them and does not replay them.

Exact retraining is bit-identical to naive retraining on the same CPU instruction set, torch build
and thread count (SPEC 4). A replay on another machine type (e.g. AVX2 vs AVX-512 kernels) or
torch version may differ in the last bits: :func:`verify_replay` then reports ``inconclusive`` and
names the difference instead of ``failed``; checks 1-3 do not depend on the machine.
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
from obliviate.unlearning.trainer import BlockTrainer

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
        }


def choose_blocks(spec: str | int, *, num_blocks: int, deleted_from: int | None) -> list[int]:
    """Blocks to replay: ``all``, one block number, or ``retrained`` (blocks from the earliest deletion on)."""
    if spec == "all":
        return list(range(1, num_blocks + 1))
    if spec == "retrained":
        return list(range(deleted_from or num_blocks + 1, num_blocks + 1))
    try:
        block = int(spec)
    except ValueError:
        raise ConfigError(f"--blocks must be all, retrained or a block number 1..{num_blocks}; got {spec!r}.") from None
    if not 1 <= block <= num_blocks:
        raise ConfigError(f"--blocks must be all, retrained or a block number 1..{num_blocks}; got {spec!r}.")
    return [block]


def _same_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))
    return [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


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
        blocks: the blocks to re-train (1-based).

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
        differing = _same_state(replayed.model_state, checkpoints[block].model_state)
        report.blocks_replayed.append(block)
        report.bit_identical[block] = not differing
        if differing:
            mismatched.append(f"block {block} ({len(differing)} tensors differ, e.g. {differing[0]})")
    if mismatched:
        message = "re-training did not reproduce the stored checkpoints: " + "; ".join(mismatched[:5])
        if report.environment_differences and report.status == PASSED:
            report.status = INCONCLUSIVE
            report.problems.append(
                message + ". Bit-identity is promised only on the same CPU capability, torch build and thread count; "
                "this machine differs (" + "; ".join(report.environment_differences) + "). Re-run verify on a "
                "machine matching the lineage's environment."
            )
        else:
            report.fail(message + " on a matching environment: the stored model was not produced by this chain.")
    return report
