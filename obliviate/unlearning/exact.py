"""Exact unlearning: retrain from M_{d-1} to M_B without the deleted ids (SPEC section 5, default policy).

Bit-identical to naive retraining from scratch without the ids: blocks before the earliest
affected block d never saw them and share every random draw. :class:`ChainRetrainer` replays blocks
d.. once and is shared with :mod:`obliviate.unlearning.deepobliviate`, which stops it early.
New checkpoints reach the caller's sink only once the result is final; a rejected request
(:class:`~obliviate.unlearning.records.DeletionError`) changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TypedDict

import numpy as np

from obliviate.errors import ConfigError
from obliviate.unlearning.chain import (
    BlockData,
    Chain,
    ChainMismatchError,
    Checkpoint,
    CheckpointSink,
    with_replaced,
)
from obliviate.unlearning.plan import check_sample_ids
from obliviate.unlearning.records import DeletionError, GuardrailResult, Policy, UnlearningRecord, UnlearningResult
from obliviate.unlearning.trainer import BlockTiming, BlockTrainer


def validate_deletion(chain: Chain, *, ids: Iterable[int]) -> np.ndarray:
    """Check a deletion request against the chain; return the ids as a sorted int64 array (SPEC section 5).

    Args:
        chain: the current chain.
        ids: the requested training-sample ids.

    Returns:
        the distinct ids, sorted, int64.

    Raises:
        DeletionError: empty request, non-integer, duplicate, unknown or already deleted ids.
    """
    raw = list(ids)
    if not raw:
        raise DeletionError("rule: a deletion must name at least one sample id; got an empty set. Nothing changed.")
    values = check_sample_ids(raw, num_samples=chain.plan.num_samples, error=DeletionError, tail="Nothing changed.")
    unique, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        raise DeletionError(
            f"rule: each sample id may appear once per request; duplicated: {unique[counts > 1][:10].tolist()}. "
            "Remove the repeats. Nothing changed."
        )
    already = sorted(set(unique.tolist()) & chain.deleted_ids)
    if already:
        raise DeletionError(
            f"rule: a sample can be deleted once; already deleted: {already[:10]}. Drop them from the request. "
            "Nothing changed."
        )
    return unique


def _check_data(chain: Chain, data: BlockData) -> None:
    if data.fingerprint != chain.data_fingerprint:
        raise ChainMismatchError(
            f"the data passed has fingerprint {data.fingerprint}, but the chain was trained on "
            f"{chain.data_fingerprint}. Pass the chain's own training and held-out data. Nothing changed."
        )


class ChainRetrainer:
    """Retrains a chain from M_{d-1} without the deleted ids, lazily, block by block.

    Keeps every retrained checkpoint and the measured time of every block, so policies that need
    the same retrained prefix (``exact`` and ``deepobliviate`` at several ε in a benchmark) can share
    it: the retraining is deterministic, so sharing changes no result, and each policy is charged the
    measured time of the blocks it used.
    """

    def __init__(self, *, chain: Chain, data: BlockData, ids: Sequence[int]) -> None:
        _check_data(chain, data)
        self.chain, self.data = chain, data
        self.ids = validate_deletion(chain, ids=ids)
        blocks = chain.plan.block_of(self.ids)
        self.first_affected = int(blocks.min())
        self.last_affected = int(blocks.max())
        self.excluded = frozenset(chain.deleted_ids | set(self.ids.tolist()))
        self.trainer = BlockTrainer(config=chain.config, data=data, plan=chain.plan)
        self.checkpoints: dict[int, Checkpoint] = {self.first_affected - 1: chain.checkpoints[self.first_affected - 1]}
        self.seconds: dict[int, float] = {}
        self.cpu_seconds: dict[int, float] = {}
        self._iterator: Iterator[Checkpoint] | None = None

    @property
    def last_trained(self) -> int:
        return max(self.checkpoints)

    def advance_to(self, block: int) -> Checkpoint:
        """Retrain up to ``block`` (if not yet) and return M'_block."""
        if block < self.first_affected - 1 or block > self.chain.config.num_blocks:
            raise ConfigError(
                f"block must be in {self.first_affected - 1}..{self.chain.config.num_blocks}; got {block}."
            )
        if self._iterator is None and block > self.last_trained:
            self._timings: list[BlockTiming] = []
            self._iterator = self.trainer.run(
                start=self.checkpoints[self.first_affected - 1],
                last_block=self.chain.config.num_blocks,
                excluded_ids=self.excluded,
                timings=self._timings,
            )
        while self.last_trained < block:
            assert self._iterator is not None  # created above whenever a block is still to train
            checkpoint = next(self._iterator)
            self.checkpoints[checkpoint.block_index] = checkpoint
            self.seconds[checkpoint.block_index] = self._timings[-1].seconds
            self.cpu_seconds[checkpoint.block_index] = self._timings[-1].cpu_seconds
        return self.checkpoints[block]

    @property
    def total_seconds(self) -> tuple[float, float]:
        """Measured (wall, CPU) time of every block retrained so far."""
        return float(sum(self.seconds.values())), float(sum(self.cpu_seconds.values()))

    def seconds_through(self, block: int) -> tuple[float, float]:
        """Measured (wall, CPU) retraining time of blocks d..block."""
        wall = sum(s for b, s in self.seconds.items() if b <= block)
        cpu = sum(s for b, s in self.cpu_seconds.items() if b <= block)
        return float(wall), float(cpu)


def unlearn_exact(
    chain: Chain,
    *,
    ids: Iterable[int],
    data: BlockData,
    sink: CheckpointSink | None = None,
    retrainer: ChainRetrainer | None = None,
) -> UnlearningResult:
    """Retrain from M_{d-1} to M_B without ``ids`` (SPEC section 5); equals naive retraining bit for bit.

    Args:
        chain: the current chain.
        ids: training-sample ids to forget.
        data: the chain's training and held-out data.
        sink: receives the new checkpoints M'_d..M'_B once the result is final.
        retrainer: a :class:`ChainRetrainer` built for this chain and these ids, to share its retrained
            blocks with another policy (default: a private one).

    Returns:
        the new current chain (M_0..M_{d-1} shared, M'_d..M'_B new) and the record of what was done.

    Raises:
        DeletionError: a bad request (nothing changes).
        ChainMismatchError: ``data`` is not the chain's data.
        ConfigError: a shared ``retrainer`` built for another chain or other ids.
    """
    began = (time.perf_counter(), time.process_time())
    retrainer = _retrainer_for(chain, ids, data=data, retrainer=retrainer)
    trained_before = retrainer.total_seconds
    num_blocks = chain.config.num_blocks
    retrainer.advance_to(num_blocks)
    new = [retrainer.checkpoints[b] for b in range(retrainer.first_affected, num_blocks + 1)]
    new_chain = with_replaced(chain, checkpoints=new, deleted_ids=retrainer.excluded)
    record = UnlearningRecord(
        policy=Policy.EXACT.value,
        deleted_ids=tuple(retrainer.ids.tolist()),
        first_affected_block=retrainer.first_affected,
        last_affected_block=retrainer.last_affected,
        blocks_retrained=tuple(range(retrainer.first_affected, num_blocks + 1)),
        stop_reason="exact: retrained every block from the first affected one",
        guardrail=GuardrailResult(attempts=(), outcome="not_needed"),
        heldout_accuracy=new_chain.final.heldout_accuracy,
        **_times(began, retrainer, trained_before=trained_before, last_used=num_blocks),
    )
    _commit(new, sink)
    return UnlearningResult(chain=new_chain, record=record, new_checkpoints=tuple(new))


def _retrainer_for(
    chain: Chain, ids: Iterable[int], *, data: BlockData, retrainer: ChainRetrainer | None
) -> ChainRetrainer:
    if retrainer is None:
        return ChainRetrainer(chain=chain, data=data, ids=list(ids))
    requested = np.unique(np.asarray(list(ids), dtype=np.int64))
    if retrainer.chain is not chain or not np.array_equal(requested, retrainer.ids):
        raise ConfigError("a shared retrainer must have been built for this very chain and these ids.")
    _check_data(chain, data)
    return retrainer


class _Times(TypedDict):
    retrain_seconds: float
    overhead_seconds: float
    wall_time_seconds: float
    cpu_seconds: float


def _times(
    began: tuple[float, float], retrainer: ChainRetrainer, *, trained_before: tuple[float, float], last_used: int
) -> _Times:
    """Wall time = measured retraining time of the blocks used + this policy's own work.

    The policy's own work (Δ, fits, stitching, guardrail evaluations, validation) is the call's
    elapsed time minus the retraining done during the call. With a private retrainer this is the
    plain wall time of the call; with a shared one, blocks retrained earlier by another policy are
    charged at their measured time.
    """
    elapsed, elapsed_cpu = time.perf_counter() - began[0], time.process_time() - began[1]
    now, now_cpu = retrainer.total_seconds
    overhead = max(elapsed - (now - trained_before[0]), 0.0)
    overhead_cpu = max(elapsed_cpu - (now_cpu - trained_before[1]), 0.0)
    retrain, retrain_cpu = retrainer.seconds_through(last_used)
    return {
        "retrain_seconds": retrain,
        "overhead_seconds": overhead,
        "wall_time_seconds": retrain + overhead,
        "cpu_seconds": retrain_cpu + overhead_cpu,
    }


def _commit(checkpoints: Sequence[Checkpoint], sink: CheckpointSink | None) -> None:
    if sink is not None:
        for checkpoint in checkpoints:
            sink(checkpoint)
