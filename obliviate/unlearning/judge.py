"""Held-out judgement of an interim version for :func:`obliviate.unlearning.rollback.plan_interim` (SPEC section 6).

The rollback rule judges a candidate interim version (which checkpoint each shard serves, ``None``:
out of the vote) by two figures on the run's held-out set: its accuracy, and the paired margin
(:func:`~obliviate.unlearning.rollback.paired_margin_points`) from its disagreement with the
*pre-deletion* model. :class:`HeldoutJudge` computes both from real models: it evaluates each
checkpoint once (softmax probabilities on the held-out samples, cached), combines the shards in the
vote by the served rule (mean of probabilities, :func:`obliviate.unlearning.shards.combine`), and
compares with the pre-deletion model's predictions (the ensemble of every shard's full model; a
single chain is one shard). Checkpoints are loaded only when a judgement needs them (``load``), so
a plan that is decided by the recorded accuracies alone costs no evaluation. One LeNet-5 evaluation
of 500 samples takes about 25 ms on one CPU thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from obliviate.errors import ConfigError
from obliviate.unlearning.rollback import paired_margin_points, served_floor
from obliviate.unlearning.shards import combine, shard_probabilities

ServedBlocks = Mapping[int, int | None]


class HeldoutJudge:
    """Accuracy and paired margin of served combinations on one held-out set (issue 11, SPEC 6 Rollback).

    Args:
        x: held-out inputs (shared by every shard).
        y: held-out labels.
        reference: every shard's pre-deletion model (shard k at index k): the model served before
            the request(s) being judged.
        load: ``(shard, block) -> model``: checkpoint M_block of a shard's current chain.
        z: standard errors kept back by the paired margin (``None``: the default of
            :func:`~obliviate.unlearning.rollback.paired_margin_points`, as the bench).

    Raises:
        ConfigError: no reference model, empty held-out set, or unequal ``x`` and ``y``.
    """

    def __init__(
        self,
        *,
        x: torch.Tensor,
        y: torch.Tensor,
        reference: Sequence[nn.Module],
        load: Callable[[int, int], nn.Module],
        z: float | None = None,
    ) -> None:
        if not reference or len(x) == 0 or len(x) != len(y):
            raise ConfigError(
                f"need at least one reference model and equally many held-out inputs and labels (> 0); got "
                f"{len(reference)} models, {len(x)} inputs, {len(y)} labels. Judge on the run's held-out set."
            )
        self.x, self.y, self.z, self._load = x, y.long(), z, load
        self._reference = [shard_probabilities(m, x=x) for m in reference]
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        self.reference_predictions = combine(self._reference).numpy()

    @property
    def num_shards(self) -> int:
        return len(self._reference)

    @property
    def reference_accuracy(self) -> float:
        """Held-out accuracy of the pre-deletion model (the ensemble of every shard's reference)."""
        return float(np.mean(self.reference_predictions == self.y.numpy()))

    def reference_shard_accuracy(self, shard: int) -> float:
        """Held-out accuracy of one shard's pre-deletion model alone."""
        return float((self._reference[shard].argmax(1) == self.y).double().mean())

    def probabilities(self, *, shard: int, block: int) -> torch.Tensor:
        """Held-out softmax probabilities (float64) of M_block of ``shard`` (evaluated once)."""
        key = (shard, block)
        if key not in self._cache:
            self._cache[key] = shard_probabilities(self._load(shard, block), x=self.x)
        return self._cache[key]

    def predictions(self, served: ServedBlocks) -> np.ndarray:
        """Predicted classes of the combination ``served`` (shards with ``None`` are out of the vote).

        Raises:
            ConfigError: no shard in the vote.
        """
        voting = [self.probabilities(shard=k, block=b) for k, b in sorted(served.items()) if b is not None]
        return combine(voting).numpy()

    def accuracy(self, served: ServedBlocks) -> float:
        """Held-out accuracy of ``served`` (0.0 when no shard votes: nothing is served)."""
        if all(b is None for b in served.values()):
            return 0.0
        return float(np.mean(self.predictions(served) == self.y.numpy()))

    def meets_floor(self, served: ServedBlocks, *, floor_points: float) -> bool:
        """Whether ``served`` may be served: its held-out accuracy is at least the pre-deletion model's
        minus ``floor_points`` plus its paired margin (the interim rule at acceptance, SPEC 6 Rollback).

        Nothing in the vote (every shard ``None``: a paused run) never meets it.
        """
        if all(b is None for b in served.values()):
            return False
        floor = served_floor(pre_deletion_accuracy=self.reference_accuracy, floor_points=floor_points)
        return self.accuracy(served) >= floor + self.margin(served) / 100

    def margin(self, served: ServedBlocks) -> float:
        """Points ``served`` must clear above the served floor: the paired margin vs the pre-deletion model."""
        if all(b is None for b in served.values()):
            return 0.0
        predicted = self.predictions(served)
        if self.z is None:
            return paired_margin_points(reference=self.reference_predictions, candidate=predicted)
        return paired_margin_points(reference=self.reference_predictions, candidate=predicted, z=self.z)
