"""Consistency training on the unlabeled pool: the ``semi_supervised`` attacker's second phase (SPEC 3b).

FixMatch (Sohn et al., "FixMatch: Simplifying semi-supervised learning with consistency and
confidence", NeurIPS 2020): every step draws a batch of bought images (weakly augmented, the
target's labels as targets) and ``unlabeled_ratio`` times as many unlabeled pool images. The
current model labels a *weak* view of each pool image; where its softmax confidence reaches
``consistency_threshold``, that label is the target for a second, independently drawn view of
the same image (FixMatch's *strong* view: ``options.strong`` ranges plus ``options.cutout``; on
MNIST the measured best second view uses the weak ranges again, without cutout; see
:class:`~obliviate.extraction.attackers.AttackOptions`). One loss per step: cross-entropy on the bought batch plus
``consistency_weight`` times the masked cross-entropy on the pool batch (averaged over the
whole pool batch, so the unlabeled term grows as the model grows confident).

Model extraction with the attacker's unlabeled pool is Jagielski et al., "High accuracy and
high fidelity extraction of neural networks", USENIX Security 2020 (they used MixMatch,
Berthelot et al., NeurIPS 2019; FixMatch is its simpler successor). The target's labels on
bought images are the ground truth of *agreement*, so they stay in every step's loss.

When the target answers class probabilities (SPEC section 3's switch), ``y`` holds them and the
bought term is the cross-entropy to those soft targets (``F.cross_entropy`` takes either form);
the pool term keeps FixMatch's hard, thresholded guesses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from obliviate.extraction.augment import cutout, random_affine

if TYPE_CHECKING:  # pragma: no cover - typing only (attackers imports this module)
    from obliviate.extraction.attackers import AttackOptions


def fixmatch(
    model: nn.Module,
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    pool: torch.Tensor,
    options: AttackOptions,
    generator: torch.Generator,
) -> dict:
    """Train ``model`` in place for ``options.consistency_steps`` FixMatch steps.

    Args:
        model: the substitute (warm-started by the supervised phase).
        x: ``(n, 1, H, W)`` bought images in ``[0, 1]``.
        y: the target's answers for them: ``(n,)`` int64 labels, or ``(n, C)`` float class probabilities
            (:func:`obliviate.extraction.substitute.targets_tensor`).
        pool: ``(m, 1, H, W)`` unlabeled pool images in ``[0, 1]`` (never queried).
        options: batch size, learning rate, ratio, threshold, weight, augmentation ranges.
        generator: the only source of randomness.

    Returns:
        steps run and the mean share of pool images above the threshold (first and last tenth).
    """
    o = options
    steps = o.consistency_steps
    if steps < 1 or len(pool) == 0 or len(x) == 0:
        return {"steps_run": 0}
    opt = torch.optim.Adam(model.parameters(), lr=o.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    batch = min(o.batch_size, len(x))
    n_pool = o.unlabeled_ratio * o.batch_size
    masked: list[float] = []
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=generator)
        xb = random_affine(x[idx], options=o.augment, generator=generator)
        ub = pool[torch.randint(len(pool), (n_pool,), generator=generator)]
        model.eval()
        with torch.no_grad():
            confidence, guess = torch.softmax(model(random_affine(ub, options=o.augment, generator=generator)), 1).max(
                1
            )
            mask = (confidence >= o.consistency_threshold).to(xb.dtype)
        strong = cutout(random_affine(ub, options=o.strong, generator=generator), size=o.cutout, generator=generator)
        model.train()
        logits = model(torch.cat([xb, strong]))
        unlabeled = (F.cross_entropy(logits[batch:], guess, reduction="none") * mask).mean()
        loss = F.cross_entropy(logits[:batch], y[idx]) + o.consistency_weight * unlabeled
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        masked.append(float(mask.mean()))
    model.eval()
    tenth = max(1, steps // 10)
    return {
        "steps_run": steps,
        "confident_share_first": float(np.mean(masked[:tenth])),
        "confident_share_last": float(np.mean(masked[-tenth:])),
    }
