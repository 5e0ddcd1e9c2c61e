"""The block plan: which training samples belong to which block (SPEC section 4).

The training set is split once into B class-stratified blocks in a fixed, seeded order; the plan
resolves a deletion request to the blocks it touches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from obliviate.checks import is_whole
from obliviate.data import stratified_split
from obliviate.errors import ConfigError

_PLAN_STREAM = 0xB10C  # separates the block-split stream from per-block training streams


def check_sample_ids(
    ids: Iterable[int] | np.ndarray,
    *,
    num_samples: int,
    error: type[Exception] = ConfigError,
    tail: str = "",
) -> np.ndarray:
    """Check training-sample ids: integers in ``0 .. num_samples-1``; return them as int64, in the given order.

    The one rule for sample ids, shared by deletion requests (:func:`~obliviate.unlearning.exact.validate_deletion`),
    training exclusions (:func:`~obliviate.unlearning.trainer.keep_mask`) and the plan's look-ups: a negative id
    would silently wrap to the last rows of the training set, a too-large one fail deep inside torch.

    Args:
        ids: sample ids (any iterable of integers, or an integer numpy array of any shape).
        num_samples: n, the size of the training set.
        error: the exception type to raise (``DeletionError`` for requests).
        tail: text appended to the message (e.g. "Nothing changed.").

    Returns:
        the ids as an int64 array of the input's shape (1-D for an iterable); repeats are kept.

    Raises:
        ConfigError: (or ``error``) a non-integer id, or one outside ``0 .. num_samples-1``.
    """
    end = f" {tail}" if tail else ""
    if is_whole(ids):
        ids = np.asarray(ids)
    if isinstance(ids, np.ndarray) and np.issubdtype(ids.dtype, np.integer):
        outside = ids[ids >= num_samples] if ids.dtype.kind == "u" else ids[(ids < 0) | (ids >= num_samples)]
        unknown = np.unique(outside).tolist()
    else:
        flat = np.asarray(ids, dtype=object).ravel().tolist() if isinstance(ids, np.ndarray) else list(ids)
        bad_type = [v for v in flat if not is_whole(v)]
        if bad_type:
            raise error(f"rule: sample ids must be integers (training-set row indices); got {bad_type[:5]!r}.{end}")
        unknown = sorted({int(v) for v in flat if not 0 <= int(v) < num_samples})
        ids = np.asarray([int(v) for v in flat], dtype=np.int64) if not unknown else ids
    if unknown:
        raise error(
            f"rule: sample ids must be in 0..{num_samples - 1} (training-set row indices); unknown: {unknown[:10]}.{end}"
        )
    return np.asarray(ids).astype(np.int64, copy=False)


def check_numpy_seed(seed: object, *, what: str = "seed") -> int:
    """``seed`` as an int if it is a whole number >= 0 (numpy's generators refuse others).

    Raises:
        ConfigError: a negative, boolean or non-integer seed.
    """
    if not is_whole(seed) or seed < 0:
        raise ConfigError(f"{what} must be an integer >= 0 (numpy's generators refuse others); got {seed!r}.")
    return int(seed)


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """The fixed assignment of training-sample ids to blocks (block 1 first).

    Every sample id ``0 .. num_samples-1`` is in exactly one block (a plan that leaves ids out is
    refused: a deletion of such an id could not be resolved to a block). Sample ids are global
    indices into the training set. This mapping is what a storage layer
    must keep next to the checkpoints to resolve a deletion request to blocks.
    """

    blocks: tuple[np.ndarray, ...]
    num_samples: int

    def __post_init__(self) -> None:
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, (int, np.integer)):
            raise ConfigError(f"num_samples must be a whole number >= 0; got {self.num_samples!r}.")
        object.__setattr__(self, "num_samples", int(self.num_samples))
        every = np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.int64)
        if every.size != np.unique(every).size or (every.size and (every.min() < 0 or every.max() >= self.num_samples)):
            raise ConfigError("a BlockPlan must assign distinct sample ids in 0..num_samples-1 to its blocks.")
        if every.size != self.num_samples:
            held = np.zeros(self.num_samples, dtype=bool)
            held[every] = True
            missing = np.flatnonzero(~held)
            raise ConfigError(
                f"rule: a BlockPlan must put every sample id 0..{self.num_samples - 1} in exactly one block (a deletion "
                f"of an id held in no block could not be resolved); {missing.size} ids are in no block, e.g. "
                f"{missing[:10].tolist()}. Add them to blocks, or lower num_samples to the ids the blocks hold."
            )
        block_of = np.full(self.num_samples, 0, dtype=np.int64)
        for number, ids in enumerate(self.blocks, start=1):
            block_of[ids] = number
        object.__setattr__(self, "_block_of", block_of)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_ids(self, block: int) -> np.ndarray:
        """Sample ids of block ``block`` (1-based), in their stored order.

        Raises:
            ConfigError: ``block`` is not an integer in ``1 .. num_blocks`` (block 0 is M_0, which holds no data).
        """
        if not is_whole(block) or not 1 <= block <= self.num_blocks:
            raise ConfigError(
                f"rule: blocks are numbered 1..{self.num_blocks} (block 1 first); got {block!r}. "
                "Pass a block number in that range."
            )
        return self.blocks[block - 1]

    def block_of(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The 1-based block of each sample id.

        Raises:
            ConfigError: an id that is not an integer in ``0 .. num_samples-1``.
        """
        values = check_sample_ids(ids, num_samples=self.num_samples)
        return self._block_of[values]  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able mapping block -> sample ids."""
        return {"num_samples": self.num_samples, "blocks": [b.tolist() for b in self.blocks]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BlockPlan:
        return cls(
            blocks=tuple(np.asarray(b, dtype=np.int64) for b in values["blocks"]),
            num_samples=int(values["num_samples"]),
        )

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(str(self.num_samples).encode())
        for ids in self.blocks:
            digest.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()[:16]


def make_block_plan(labels: np.ndarray, *, num_blocks: int, seed: int) -> BlockPlan:
    """Split sample ids 0..n-1 into ``num_blocks`` class-stratified blocks (SPEC section 4).

    Block sizes differ by at most one; the split depends only on ``labels`` and ``seed``.

    Args:
        labels: ``(n,)`` integer labels of the training set.
        num_blocks: B, in ``1 .. n``.
        seed: the chain's seed, an integer >= 0.

    Returns:
        the plan; every block's ids sorted.

    Raises:
        ConfigError: ``num_blocks`` outside ``1 .. n``, or a seed that is not an integer >= 0.
    """
    check_numpy_seed(seed)
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    if not is_whole(num_blocks):
        raise ConfigError(f"num_blocks must be a whole number; got {num_blocks!r}.")
    if not 1 <= num_blocks <= n:
        raise ConfigError(f"num_blocks must be in 1..n={n} (one sample per block at least); got {num_blocks}.")
    base, extra = divmod(n, num_blocks)
    sizes = tuple(base + (1 if i < extra else 0) for i in range(num_blocks))
    parts = stratified_split(labels, sizes=sizes, rng=np.random.default_rng((seed, _PLAN_STREAM)))
    return BlockPlan(blocks=tuple(np.sort(p) for p in parts), num_samples=n)
