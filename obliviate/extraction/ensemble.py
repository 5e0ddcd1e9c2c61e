"""An ensemble thief: several independently seeded substitutes on the same bought labels (SPEC 3b).

The ``semi_supervised_ensemble`` attacker trains ``options.members`` ``semi_supervised``
substitutes on the same bought set and unlabeled pool, member ``m`` with seed ``seed + m`` (so
member 0 is the ``semi_supervised`` substitute of the same seed), and answers with the mean of
their softmax probabilities. It spends no query beyond the bought set and costs ``members`` times
one ``semi_supervised`` cell. Averaging independently trained networks is the classic way to cut
their variance (Lakshminarayanan et al., "Simple and scalable predictive uncertainty estimation
using deep ensembles", NeurIPS 2017); a thief who can afford it copies the target more closely
than any one member does (``bench/results/extraction.md``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from obliviate.errors import ConfigError
from obliviate.extraction.attackers import AttackOptions, Substitute, attacker, semi_supervised


class MeanOfSoftmax(nn.Module):
    """Members as one classifier: the log of the mean of their softmax probabilities.

    Its argmax is the ensemble's vote; the log keeps it a drop-in module for anything that treats
    the output as logits (``cross_entropy`` of log-probabilities that sum to one is their negative
    log-likelihood, so FGSM through it attacks the ensemble).
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member; got none.")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(dim=0)
        return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))


@attacker(
    "semi_supervised_ensemble",
    assumes="bought labels; the unlabeled pool (its other images); the task's image geometry",
)
def semi_supervised_ensemble(
    *,
    images: np.ndarray,
    labels: np.ndarray,
    unlabeled: np.ndarray,
    options: AttackOptions,
    seed: int,
    num_classes: int,
    levels: int,
) -> Substitute:
    """``options.members`` ``semi_supervised`` substitutes (seeds ``seed``, ``seed + 1``, ...), mean of softmax."""
    members = [
        semi_supervised(
            images=images,
            labels=labels,
            unlabeled=unlabeled,
            options=options,
            seed=seed + m,
            num_classes=num_classes,
            levels=levels,
        )
        for m in range(options.members)
    ]
    return Substitute(MeanOfSoftmax([s.model for s in members]).eval(), {"members": [s.info for s in members]})
