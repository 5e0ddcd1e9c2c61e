"""The block plan: which training samples belong to which block (SPEC section 4).

The training set is split once into B class-stratified blocks in a fixed, seeded order; the plan
resolves a deletion request to the blocks it touches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from obliviate.data import stratified_split
from obliviate.errors import ConfigError

_PLAN_STREAM = 0xB10C  # separates the block-split stream from per-block training streams


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """The fixed assignment of training-sample ids to blocks (block 1 first).

    Sample ids are global indices into the training set. This mapping is what a storage layer
    must keep next to the checkpoints to resolve a deletion request to blocks.
    """

    blocks: tuple[np.ndarray, ...]
    num_samples: int

    def __post_init__(self) -> None:
        every = np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.int64)
        if every.size != np.unique(every).size or (every.size and (every.min() < 0 or every.max() >= self.num_samples)):
            raise ConfigError("a BlockPlan must assign distinct sample ids in 0..num_samples-1 to its blocks.")
        block_of = np.full(self.num_samples, 0, dtype=np.int64)
        for number, ids in enumerate(self.blocks, start=1):
            block_of[ids] = number
        object.__setattr__(self, "_block_of", block_of)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_ids(self, block: int) -> np.ndarray:
        """Sample ids of block ``block`` (1-based), in their stored order."""
        return self.blocks[block - 1]

    def block_of(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The 1-based block of each sample id (0 for ids held in no block)."""
        return self._block_of[np.asarray(ids, dtype=np.int64)]  # type: ignore[attr-defined]

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
    """
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    if not 1 <= num_blocks <= n:
        raise ConfigError(f"num_blocks must be in 1..n={n} (one sample per block at least); got {num_blocks}.")
    base, extra = divmod(n, num_blocks)
    sizes = tuple(base + (1 if i < extra else 0) for i in range(num_blocks))
    parts = stratified_split(labels, sizes=sizes, rng=np.random.default_rng((seed, _PLAN_STREAM)))
    return BlockPlan(blocks=tuple(np.sort(p) for p in parts), num_samples=n)
