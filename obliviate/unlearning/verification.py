"""Verification that tells forgetting from doing nothing (SPEC section 5, Metrics and backdoor).

With one deleted sample the original model already agrees with the naive retrain on about 99 % of
test inputs, so every figure is reported next to its noise floor: the same figure for the
original (never-unlearned) model against the naive retrain.

Backdoor check: a trigger (a ``size``×``size`` patch of the brightest level in a corner) is
stamped on the samples that will be deleted and their labels set to a target class. The chain
trained on them learns the trigger; a model that really forgot them should have the naive
retrain's attack success rate (ASR), not the original's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from obliviate.checks import is_whole
from obliviate.data import ImageDataset, require_generator
from obliviate.errors import ConfigError
from obliviate.models import images_to_tensor
from obliviate.unlearning.chain import state_l1
from obliviate.unlearning.plan import BlockPlan

Predictor = Callable[[torch.Tensor], torch.Tensor]


def stamp_trigger(images: np.ndarray, *, levels: int, size: int = 3, corner: str = "bottom_right") -> np.ndarray:
    """A copy of ``(n, H, W)`` uint8 images with a white ``size``×``size`` patch in a corner.

    Args:
        images: ``(n, H, W)`` uint8 gray levels.
        levels: gray levels of the data (the patch gets ``levels - 1``).
        size: side of the patch, in ``1 .. min(H, W)``.
        corner: ``bottom_right``, ``top_left``, ``top_right`` or ``bottom_left``.

    Returns:
        the stamped copy.

    Raises:
        ConfigError: an unknown corner, or a size outside ``1 .. min(H, W)``.
    """
    if corner not in ("bottom_right", "top_left", "top_right", "bottom_left"):
        raise ConfigError(f"corner must be bottom_right, top_left, top_right or bottom_left; got {corner!r}.")
    out = np.array(images, dtype=np.uint8, copy=True)
    side = min(out.shape[1:]) if out.ndim == 3 else 0
    if not is_whole(size) or not 1 <= size <= side:
        raise ConfigError(
            f"rule: the trigger size must be a whole number in 1..{side} (the images are "
            f"{'x'.join(map(str, out.shape[1:]))}); got {size!r}. Pass a patch that fits the images."
        )
    rows = slice(-size, None) if corner.startswith("bottom") else slice(0, size)
    cols = slice(-size, None) if corner.endswith("right") else slice(0, size)
    out[:, rows, cols] = levels - 1
    return out


@dataclass(frozen=True)
class BackdoorSet:
    """Poisoned training samples: which ids, where in the chain, and to which class."""

    ids: np.ndarray
    target_class: int
    blocks: np.ndarray  # block of each id
    trigger_size: int
    corner: str

    def placement(self) -> dict[str, object]:
        unique = np.unique(self.blocks)
        return {
            "count": int(self.ids.size),
            "target_class": self.target_class,
            "blocks_touched": int(unique.size),
            "first_block": int(unique.min()),
            "last_block": int(unique.max()),
            "trigger": f"{self.trigger_size}x{self.trigger_size} white patch, {self.corner}",
        }


def choose_backdoor_ids(
    labels: np.ndarray,
    *,
    plan: BlockPlan,
    count: int,
    target_class: int,
    first_block: int,
    last_block: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``count`` ids not of the target class, dealt evenly over blocks first_block..last_block.

    Spreading matters: poison packed into a few contiguous blocks is washed out by the later ones.

    Raises:
        ConfigError: ``rng`` is not a numpy Generator, a target class the labels do not hold, blocks outside ``1 .. B``, or a block with too
            few samples outside the target class.
    """
    rng = require_generator(rng)
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    if not is_whole(target_class):
        raise ConfigError(f"target_class must be a class index (an integer); got {target_class!r}.")
    if not 0 <= target_class < num_classes:
        raise ConfigError(
            f"rule: target_class must be one of the data's classes 0..{num_classes - 1}; got {target_class}. "
            "Pick a class the labels hold."
        )
    blocks = list(range(first_block, last_block + 1))
    if not 1 <= first_block <= last_block <= plan.num_blocks:
        raise ConfigError(f"need 1 <= first_block <= last_block <= {plan.num_blocks}; got {first_block}, {last_block}.")
    per_block = np.full(len(blocks), count // len(blocks))
    per_block[rng.permutation(len(blocks))[: count % len(blocks)]] += 1
    chosen = []
    for block, k in zip(blocks, per_block, strict=True):
        candidates = plan.block_ids(block)
        candidates = candidates[np.asarray(labels)[candidates] != target_class]
        if k > candidates.size:
            raise ConfigError(f"block {block} has only {candidates.size} samples outside the target class; asked {k}.")
        chosen.append(rng.choice(candidates, size=int(k), replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def poison(
    train: ImageDataset,
    *,
    plan: BlockPlan,
    ids: np.ndarray,
    target_class: int,
    size: int = 3,
    corner: str = "bottom_right",
) -> tuple[ImageDataset, BackdoorSet]:
    """The training set with the trigger stamped on ``ids`` and their labels set to ``target_class``."""
    images = train.images.copy()
    labels = train.labels.copy()
    images[ids] = stamp_trigger(images[ids], levels=train.levels, size=size, corner=corner)
    labels[ids] = target_class
    poisoned = ImageDataset(f"{train.name}+backdoor[{ids.size}]", images, labels, train.levels)
    return poisoned, BackdoorSet(ids, target_class, plan.block_of(ids), size, corner)


@torch.no_grad()
def _predict(predict: Predictor, x: torch.Tensor) -> torch.Tensor:
    return predict(x)


def attack_success_rate(
    predict: Predictor, *, test: ImageDataset, target_class: int, size: int = 3, corner: str = "bottom_right"
) -> float:
    """Share of triggered test inputs (true class != target) classified as the target class."""
    mask = test.labels != target_class
    stamped = stamp_trigger(test.images[mask], levels=test.levels, size=size, corner=corner)
    predicted = _predict(predict, images_to_tensor(stamped, levels=test.levels))
    return float((predicted == target_class).double().mean())


def consistency(*, a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of inputs on which two prediction vectors agree.

    Raises:
        ConfigError: vectors of different shapes (they broadcast or failed inside torch) or empty
            ones (their share is undefined: it was nan).
    """
    if a.shape != b.shape or a.ndim != 1 or a.numel() == 0:
        raise ConfigError(
            f"consistency compares two non-empty prediction vectors of one length; got shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)}. Predict both models on the same inputs."
        )
    return float((a == b).double().mean())


def _top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, *, k: int = 5) -> float:
    """Share of inputs whose true class is among the ``k`` highest logits (SPEC section 5: top-1 / top-5).

    With ``k`` at least the number of classes every input counts (the true class is always among them).

    Args:
        logits: ``(n, C)`` scores, one row per input.
        labels: ``(n,)`` true classes in ``0 .. C-1``.
        k: how many of the highest scores count, a whole number >= 1 (1 is plain accuracy).

    Raises:
        ConfigError: ``k`` not a whole number >= 1, logits that are not ``(n, C)`` with n >= 1 rows, or
            labels that are not one per row.
    """
    if not is_whole(k) or k < 1:
        raise ConfigError(f"k must be a whole number >= 1; got {k!r}. Pass an int, e.g. 5 for top-5 accuracy.")
    if logits.ndim != 2 or logits.shape[0] == 0 or labels.shape != logits.shape[:1]:
        raise ConfigError(
            f"top-k accuracy takes (n, C) logits with n >= 1 and n labels; got logits {tuple(logits.shape)} and "
            f"labels {tuple(labels.shape)}. Pass the model's raw outputs on the inputs the labels belong to."
        )
    top = logits.topk(min(int(k), logits.shape[1]), dim=1).indices
    return float((top == labels.reshape(-1, 1)).any(dim=1).double().mean())


@torch.no_grad()
def mean_loss(model: torch.nn.Module, *, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy of ``model`` (eval mode) on (x, y)."""
    was_training = model.training
    model.eval()
    loss = float(F.cross_entropy(model(x), y))
    model.train(was_training)
    return loss


@dataclass(frozen=True)
class VerificationFigures:
    """Figures for one unlearned model next to their noise floor (the original vs naive)."""

    accuracy: float
    naive_accuracy: float
    original_accuracy: float
    consistency_with_naive: float
    original_consistency_with_naive: float
    l1_to_naive: float | None
    original_l1_to_naive: float | None
    deleted_loss: float | None
    naive_deleted_loss: float | None
    original_deleted_loss: float | None
    top5_accuracy: float | None = None  # None where the predictors give classes, not logits (ensembles)
    naive_top5_accuracy: float | None = None
    original_top5_accuracy: float | None = None


def verify(
    *,
    unlearned: Predictor,
    naive: Predictor,
    original: Predictor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    unlearned_state: dict[str, torch.Tensor] | None = None,
    naive_state: dict[str, torch.Tensor] | None = None,
    original_state: dict[str, torch.Tensor] | None = None,
    losses: tuple[float, float, float] | None = None,
) -> VerificationFigures:
    """Top-1 (and top-5) accuracy, consistency with naive, L1 distance to naive and deleted-sample loss, with floors.

    A predictor may give ``(n,)`` predicted classes or ``(n, C)`` logits (its classes are then their
    argmax; a module in eval mode will do); top-5 accuracy is computed where all three give logits, else
    it is ``None``. Predictors run without autograd.

    Args:
        unlearned: ``x -> predicted classes`` (or logits) of the unlearned model.
        naive: ``x -> predicted classes`` (or logits) of the naive retrain without the deleted samples.
        original: ``x -> predicted classes`` (or logits) of the original (never-unlearned) model: the noise floor.
        x_test: the test inputs.
        y_test: the test labels.
        unlearned_state: the unlearned model's state dict, for the parameter distance (omit for ensembles).
        naive_state: the naive retrain's state dict (omit for ensembles).
        original_state: the original model's state dict (omit for ensembles).
        losses: (unlearned, naive, original) mean loss on the deleted samples, if computed.

    Returns:
        every figure next to its floor (SPEC section 5, Metrics); distances ``None`` without all three states,
        top-5 accuracy ``None`` without all three logits.
    """
    outputs = _predict(unlearned, x_test), _predict(naive, x_test), _predict(original, x_test)
    pu, pn, po = (out.argmax(1) if out.ndim == 2 else out for out in outputs)
    top5: list[float | None] = [None, None, None]
    if all(out.ndim == 2 for out in outputs):
        top5 = [_top_k_accuracy(out, y_test, k=5) for out in outputs]
    l1_to_naive = original_l1_to_naive = None
    if unlearned_state is not None and naive_state is not None and original_state is not None:
        l1_to_naive = state_l1(a=unlearned_state, b=naive_state)
        original_l1_to_naive = state_l1(a=original_state, b=naive_state)
    return VerificationFigures(
        accuracy=consistency(a=pu, b=y_test),
        naive_accuracy=consistency(a=pn, b=y_test),
        original_accuracy=consistency(a=po, b=y_test),
        consistency_with_naive=consistency(a=pu, b=pn),
        original_consistency_with_naive=consistency(a=po, b=pn),
        l1_to_naive=l1_to_naive,
        original_l1_to_naive=original_l1_to_naive,
        deleted_loss=losses[0] if losses else None,
        naive_deleted_loss=losses[1] if losses else None,
        original_deleted_loss=losses[2] if losses else None,
        top5_accuracy=top5[0],
        naive_top5_accuracy=top5[1],
        original_top5_accuracy=top5[2],
    )
