"""S independent block chains on disjoint stratified shards, served as one model (SPEC section 6, Sharding).

SISA (Bourtoule et al. 2021) on top of block chains: the training positions are split into S
class-stratified shards (seeded, fixed); shard k trains its own chain of B blocks on its shard
(its local sample ids are positions inside the shard). A deletion retrains only the shards that
hold a deleted id, and shards retrain in parallel.

Serving rule (stated, deterministic): the prediction is the argmax of the **mean of the softmax
probabilities** of the shards in the vote, computed in float64; ties go to the lowest class
index. The ``vote`` rule (majority of the shards' argmax; ties to the larger summed probability,
then the lowest class) is offered for comparison. A shard out of the vote (rolled back below its
floor, :mod:`obliviate.unlearning.rollback`) simply does not contribute.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from obliviate.data import stratified_split
from obliviate.errors import ConfigError

_SHARD_STREAM = 0x54A2D
MEAN, VOTE = "mean", "vote"


@dataclass(frozen=True, eq=False)
class ShardPlan:
    """Which training positions each shard holds; shard k's local id j is position ``shards[k][j]``."""

    shards: tuple[np.ndarray, ...]
    num_samples: int

    def __post_init__(self) -> None:
        every = np.concatenate(self.shards)
        if every.size != np.unique(every).size:
            raise ConfigError("shards must be disjoint: a training position may belong to one shard only.")
        owner = np.full(self.num_samples, -1, dtype=np.int64)
        local = np.full(self.num_samples, -1, dtype=np.int64)
        for k, ids in enumerate(self.shards):
            owner[ids] = k
            local[ids] = np.arange(ids.size)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_local", local)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def locate(self, positions: Iterable[int]) -> dict[int, np.ndarray]:
        """shard -> sorted local ids of ``positions`` in that shard (shards without any are absent).

        Raises:
            ConfigError: a position outside 0..num_samples-1 or held by no shard.
        """
        values = np.asarray(sorted({int(p) for p in positions}), dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() >= self.num_samples):
            raise ConfigError(f"positions must be in 0..{self.num_samples - 1}; got {values.tolist()[:10]}.")
        owners = self._owner[values]  # type: ignore[attr-defined]
        if (owners < 0).any():
            raise ConfigError(f"positions {values[owners < 0].tolist()[:10]} belong to no shard.")
        out: dict[int, np.ndarray] = {}
        for k in np.unique(owners):
            out[int(k)] = np.sort(self._local[values[owners == k]])  # type: ignore[attr-defined]
        return out

    def to_dict(self) -> dict[str, object]:
        return {"num_samples": self.num_samples, "shards": [s.tolist() for s in self.shards]}

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> ShardPlan:
        shards = values["shards"]
        assert isinstance(shards, list)
        return cls(tuple(np.asarray(s, dtype=np.int64) for s in shards), int(str(values["num_samples"])))


def make_shard_plan(labels: np.ndarray, *, num_shards: int, seed: int) -> ShardPlan:
    """Split positions 0..n-1 into ``num_shards`` disjoint class-stratified shards (sizes differ by <= 1)."""
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    if not 1 <= num_shards <= n:
        raise ConfigError(
            f"num_shards must be in 1..{n} (a shard holds at least one of the {n} samples); got {num_shards}. "
            "Pass a shard count in that range."
        )
    base, extra = divmod(n, num_shards)
    sizes = tuple(base + (1 if k < extra else 0) for k in range(num_shards))
    if num_shards == 1:
        return ShardPlan((np.arange(n, dtype=np.int64),), n)
    parts = stratified_split(labels, sizes=sizes, rng=np.random.default_rng((seed, _SHARD_STREAM)))
    return ShardPlan(tuple(np.sort(p) for p in parts), n)


@torch.no_grad()
def shard_probabilities(model: nn.Module, *, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Softmax probabilities (float64) of one shard model in eval mode (its mode is restored)."""
    was_training = model.training
    model.eval()
    out = torch.cat([torch.softmax(model(x[i : i + batch_size]).double(), dim=1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def combine(probabilities: Sequence[torch.Tensor], *, rule: str = MEAN) -> torch.Tensor:
    """Predicted classes of the shards in the vote (SPEC 6; the rule is stated in the module docstring).

    Args:
        probabilities: one ``(n, classes)`` probability tensor per shard in the vote.
        rule: ``mean`` (argmax of the mean probability, ties to the lowest class) or ``vote``.

    Raises:
        ConfigError: no shard in the vote, or an unknown rule.
    """
    if not probabilities:
        raise ConfigError("no shard is in the vote: there is no model to serve. Flush the batch (retrain) first.")
    stacked = np.stack([p.double().numpy() for p in probabilities])  # (S, n, C)
    mean = stacked.mean(axis=0)
    if rule == MEAN:
        return torch.from_numpy(np.argmax(mean, axis=1).astype(np.int64))  # np.argmax: first maximum wins
    if rule != VOTE:
        raise ConfigError(f"rule must be {MEAN!r} or {VOTE!r}; got {rule!r}.")
    classes = stacked.shape[2]
    votes = np.zeros((stacked.shape[1], classes))
    for p in stacked:
        votes[np.arange(p.shape[0]), np.argmax(p, axis=1)] += 1
    # Lexicographic: most votes, then larger summed probability, then lowest class.
    best = votes.max(axis=1, keepdims=True)
    masked = np.where(votes == best, mean, -np.inf)
    return torch.from_numpy(np.argmax(masked, axis=1).astype(np.int64))


def predict_shards(models: Sequence[nn.Module], *, x: torch.Tensor, rule: str = MEAN) -> torch.Tensor:
    """Predicted classes of the sharded model whose shards in the vote are ``models``."""
    return combine([shard_probabilities(m, x=x) for m in models], rule=rule)
