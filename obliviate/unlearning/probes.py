"""Trigger and probe helpers for any pattern, and per-sample losses (SPEC section 6, Measuring forgetting).

:func:`stamp_pattern` writes any 2-D pattern (a mask of which pixels it sets, and the gray level
of each) at any position; :func:`obliviate.unlearning.verification.stamp_trigger` is the special
case of a white square in a corner. :func:`pattern_attack_success` measures a backdoor with any
pattern; :func:`per_sample_loss` gives the loss of each sample, the raw material of
membership-style checks (judge them against the spread of naive retrains with other seeds, SPEC 6).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from obliviate.data import ImageDataset
from obliviate.errors import ConfigError
from obliviate.models import images_to_tensor


def square_pattern(*, size: int, level: int) -> np.ndarray:
    """A ``size``×``size`` patch of one gray level (the classic white-square trigger when level is the top)."""
    return np.full((size, size), level, dtype=np.int64)


def checker_pattern(*, size: int, level: int) -> np.ndarray:
    """A ``size``×``size`` checkerboard: ``level`` on even squares, -1 (untouched) on odd ones."""
    grid = np.indices((size, size)).sum(axis=0) % 2 == 0
    return np.where(grid, level, -1).astype(np.int64)


def stamp_pattern(images: np.ndarray, *, pattern: np.ndarray, row: int, col: int, levels: int) -> np.ndarray:
    """A copy of ``(n, H, W)`` uint8 images with ``pattern`` written at (row, col); -1 entries leave pixels alone.

    Negative ``row``/``col`` count from the bottom/right edge (``row=-3`` puts a 3-row pattern on the
    last rows).

    Raises:
        ConfigError: the pattern does not fit, or holds levels outside -1..levels-1.
    """
    pattern = np.asarray(pattern, dtype=np.int64)
    if pattern.ndim != 2 or pattern.size == 0:
        raise ConfigError(f"pattern must be a non-empty 2-D array; got shape {pattern.shape}.")
    if pattern.min() < -1 or pattern.max() >= levels:
        raise ConfigError(
            f"pattern levels must be -1 (untouched) or 0..{levels - 1}; got {pattern.min()}..{pattern.max()}."
        )
    out = np.array(images, dtype=np.uint8, copy=True)
    height, width = out.shape[1:]
    top, left = row % height if row < 0 else row, col % width if col < 0 else col
    if top + pattern.shape[0] > height or left + pattern.shape[1] > width:
        raise ConfigError(
            f"a {pattern.shape} pattern at ({row}, {col}) does not fit {height}x{width} images; move it inside."
        )
    region = out[:, top : top + pattern.shape[0], left : left + pattern.shape[1]]
    mask = pattern >= 0
    region[:, mask] = pattern[mask].astype(np.uint8)
    return out


def poison_with_pattern(
    train: ImageDataset, *, ids: np.ndarray, pattern: np.ndarray, row: int, col: int, target_class: int
) -> ImageDataset:
    """The training set with ``pattern`` stamped on ``ids`` and their labels set to ``target_class``."""
    images, labels = train.images.copy(), train.labels.copy()
    images[ids] = stamp_pattern(images[ids], pattern=pattern, row=row, col=col, levels=train.levels)
    labels[ids] = target_class
    return ImageDataset(f"{train.name}+pattern[{len(ids)}]", images, labels, train.levels)


@torch.no_grad()
def pattern_attack_success(
    predict: Callable[[torch.Tensor], torch.Tensor],
    *,
    test: ImageDataset,
    pattern: np.ndarray,
    row: int,
    col: int,
    target_class: int,
) -> float:
    """Share of stamped test inputs (true class != target) predicted as ``target_class``."""
    mask = test.labels != target_class
    stamped = stamp_pattern(test.images[mask], pattern=pattern, row=row, col=col, levels=test.levels)
    return float((predict(images_to_tensor(stamped, levels=test.levels)) == target_class).double().mean())


@torch.no_grad()
def per_sample_loss(model: nn.Module, *, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Cross-entropy of every sample (eval mode; the module's mode is restored), float64.

    Args:
        model: the classifier.
        x: ``(n, 1, H, W)`` inputs.
        y: ``(n,)`` integer class labels in ``0 .. C-1`` (C: the model's outputs).
        batch_size: samples per forward pass.

    Returns:
        ``(n,)`` float64 losses.

    Raises:
        ConfigError: labels of another count than the inputs, or outside the model's classes.
    """
    if y.shape != (len(x),):
        raise ConfigError(f"y must hold one label per input, shape ({len(x)},); got {tuple(y.shape)}.")
    low, high = (int(y.min()), int(y.max())) if len(y) else (0, 0)
    was_training = model.training
    model.eval()
    losses = []
    try:
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size]).double()
            if low < 0 or high >= logits.shape[1]:
                raise ConfigError(
                    f"rule: labels must be class indices 0..{logits.shape[1] - 1} (the model has {logits.shape[1]} "
                    f"outputs); got labels {low}..{high}. Pass the model's own label range."
                )
            losses.append(F.cross_entropy(logits, y[i : i + batch_size], reduction="none"))
    finally:
        model.train(was_training)
    return torch.cat(losses)
