"""Substitute models trained on queried labels, and the audit's metrics (SPEC section 3).

* :func:`train_classifier`: a seeded, fixed-number-of-steps trainer (Adam, minibatches drawn
  with a seeded generator), used for substitutes and for targets.
* :func:`check_targets` / :func:`targets_tensor` / :func:`hard_labels`: the one form of what a
  substitute learns from, the target's answers: ``(n,)`` class labels (label-only, the default) or
  ``(n, C)`` class probabilities (SPEC section 3's probabilities switch). ``F.cross_entropy`` takes
  either as its target, so every training loop serves both without a second code path.
* :func:`accuracy` / :func:`agreement`: against true labels / against the target's labels.
* :func:`fgsm`: FGSM (Goodfellow et al. 2015) or I-FGSM (Kurakin et al. 2017) on ``[0, 1]`` inputs.
* :func:`transferability`: the share of adversarial examples crafted on the substitute, from
  test inputs the target classifies correctly, that the target then misclassifies.
* :func:`jacobian_augment`: Papernot et al. 2017's dataset augmentation step
  ``x + lambda * sign(dF_sub[label(x)] / dx)``.

Training uses a fixed number of gradient steps, not epochs, so a budget of 50 and a budget
of 600 get the same optimisation effort and the comparison is about the data only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from obliviate.checks import is_whole
from obliviate.errors import ConfigError, DataError
from obliviate.extraction.target import PROBABILITY_SUM_TOLERANCE, rows_not_probabilities
from obliviate.models import build_model, check_arch, check_seed, images_to_tensor


@dataclass(frozen=True)
class TrainConfig:
    """How a classifier is trained.

    Attributes:
        arch: ``lenet5`` or ``c3f2`` (any name :func:`obliviate.models.build_model` knows).
        steps: gradient steps (fixed, independent of the data size).
        batch_size: images per step (capped at the data size).
        lr: Adam learning rate.
        weight_decay: Adam L2 penalty.
    """

    arch: str = "lenet5"
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_arch(self.arch)
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(
                f"need steps >= 1, batch_size >= 1, lr > 0; got {self.steps}, {self.batch_size}, {self.lr}."
            )


def train_classifier(
    *,
    images: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    seed: int,
    num_classes: int = 10,
    levels: int = 256,
) -> nn.Module:
    """Train a fresh classifier on ``(images, labels)`` for ``config.steps`` Adam steps.

    Weights and the minibatch order depend only on ``seed``; the global torch RNG is untouched.

    Args:
        images: ``(n, H, W)`` uint8 gray levels.
        labels: the target's answers for them (:func:`check_targets`): ``(n,)`` class labels, or ``(n, num_classes)``
            class probabilities (trained on as soft targets).
        config: architecture and optimiser settings.
        seed: seed of initial weights and minibatch order.
        num_classes: output classes.
        levels: gray levels of the images.

    Returns:
        the trained model in evaluation mode.

    Raises:
        ConfigError: no images, a label count that differs from the image count, ``num_classes`` below 1,
            or a seed that is not a whole number >= 0.
        DataError: images that are not ``(n, H, W)`` uint8, or answers that are neither whole class numbers in
            ``0..num_classes-1`` nor rows of ``num_classes`` probabilities.
    """
    images = check_images(images, allow_empty=True)
    if len(images) == 0 or len(images) != len(labels):
        raise ConfigError(f"need as many labels as images, at least one; got {len(images)} and {len(labels)}.")
    targets = check_targets(labels, num_classes=num_classes)
    check_training_seed(seed)
    model = build_model(config.arch, num_classes=num_classes, in_channels=1, image_size=images.shape[1], seed=seed)
    x = images_to_tensor(images, levels=levels)
    y = targets_tensor(targets)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    order = np.random.default_rng(seed)
    batch = min(config.batch_size, len(x))
    model.train()
    for _ in range(config.steps):
        idx = torch.from_numpy(order.choice(len(x), size=batch, replace=False))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def check_images(images: np.ndarray, *, what: str = "images", allow_empty: bool = False) -> np.ndarray:
    """``images`` when they are a ``(n, H, W)`` uint8 array of gray levels (``n >= 1`` unless ``allow_empty``).

    Raises:
        DataError: another type, dtype or number of axes, a zero side, or no image when one is needed.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{what} must be a uint8 numpy array of gray levels with shape (n, H, W); got {type(images).__name__} "
            f"dtype {getattr(images, 'dtype', None)} shape {getattr(images, 'shape', None)}. Reshape flat rows to "
            "(n, H, W) and convert with .astype(np.uint8)."
        )
    if min(images.shape[1:]) < 1 or (not allow_empty and len(images) == 0):
        raise DataError(f"{what} must hold at least one image of at least 1x1 pixels; got shape {images.shape}.")
    return images


def check_labels(labels: np.ndarray, *, num_classes: int) -> np.ndarray:
    """``labels`` as int64 when they are ``(n,)`` whole class numbers in ``0..num_classes-1``.

    Whole numbers stored as floats (``3.0``) are accepted; ``3.7`` is refused rather than truncated.

    Raises:
        ConfigError: ``num_classes`` is not a whole number >= 1.
        DataError: labels of another shape, not numbers, with a fraction, or outside the classes.
    """
    if not is_whole(num_classes) or num_classes < 1:
        raise ConfigError(f"num_classes must be a whole number >= 1; got {num_classes!r}. Pass e.g. 10 for digits.")
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataError(f"labels must be a 1-D array, one class number per image; got shape {y.shape}. Flatten it.")
    if y.dtype.kind not in "iuf":
        raise DataError(
            f"labels must be whole class numbers 0..{num_classes - 1}; got dtype {y.dtype}. Pass an int array."
        )
    if not len(y):
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        fractional = y[~np.isfinite(y) | (y != np.floor(y))]
        if fractional.size:
            raise DataError(
                f"labels must be whole class numbers 0..{num_classes - 1}; got {fractional[:3].tolist()} "
                "(it would be truncated). Pass the class of each image as an int."
            )
    low, high = y.min(), y.max()
    if low < 0 or high >= num_classes:
        bad = y[(y < 0) | (y >= num_classes)]
        raise DataError(
            f"labels must be class numbers 0..{num_classes - 1} (num_classes={num_classes}); got "
            f"{', '.join(str(v) for v in bad[:5].tolist())}. Map the labels to 0..{num_classes - 1} or pass the "
            "task's num_classes."
        )
    return y.astype(np.int64, copy=False)


def check_targets(answers: np.ndarray, *, num_classes: int) -> np.ndarray:
    """The target's answers as a substitute trains on them (SPEC section 3: labels by default, probabilities switch).

    Args:
        answers: ``(n,)`` whole class numbers (:func:`check_labels`), or ``(n, num_classes)`` class probabilities:
            finite, ``>= 0``, each row summing to 1 within :data:`PROBABILITY_SUM_TOLERANCE`.
        num_classes: classes of the task.

    Returns:
        ``(n,)`` int64 labels, or ``(n, num_classes)`` float32 probabilities with each row rescaled to sum to 1.

    Raises:
        ConfigError: ``num_classes`` is not a whole number >= 1.
        DataError: labels :func:`check_labels` refuses, rows of another width than ``num_classes``, or rows that
            are not probabilities (negative, not finite, or not summing to 1: logits, say).
    """
    y = np.asarray(answers)
    if y.ndim != 2:
        return check_labels(y, num_classes=num_classes)
    if not is_whole(num_classes) or num_classes < 1:
        raise ConfigError(f"num_classes must be a whole number >= 1; got {num_classes!r}. Pass e.g. 10 for digits.")
    if y.shape[1] != num_classes or y.dtype.kind not in "iuf":
        raise DataError(
            f"class probabilities must be a numeric (n, num_classes) array, one row of {num_classes} per image "
            f"(num_classes={num_classes}); got dtype {y.dtype}, shape {y.shape}. Pass the target's softmax rows, or "
            "the task's num_classes."
        )
    p = y.astype(np.float64)
    off, sums = rows_not_probabilities(p)
    bad = ~np.isfinite(p).all(axis=1) | off
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"class probabilities must be finite, >= 0 and sum to 1 in each row (within {PROBABILITY_SUM_TOLERANCE:g}); "
            f"{int(bad.sum())} of {len(p)} rows are not, e.g. row {row}: {np.round(p[row][:5], 4).tolist()} "
            f"(sum {sums[row]:.4g}). Pass the target's softmax probabilities, not its logits or scores."
        )
    return (p / sums[:, None]).astype(np.float32) if len(p) else p.astype(np.float32)


def targets_tensor(targets: np.ndarray) -> torch.Tensor:
    """Checked answers (:func:`check_targets`) as ``F.cross_entropy``'s target: class indices (int64) for labels,
    class probabilities (float32) for probability rows; the loss is the same function of either."""
    if targets.ndim == 2:
        return torch.as_tensor(targets, dtype=torch.float32)
    return torch.as_tensor(targets, dtype=torch.long)


def hard_labels(answers: np.ndarray) -> np.ndarray:
    """``(n,)`` int64 classes of the target's answers: the labels themselves, or each probability row's argmax.

    What is measured and counted (agreement, class histograms, the class a Jacobian step follows) is a class,
    whatever the target answered.
    """
    y = np.asarray(answers)
    return (y.argmax(axis=1) if y.ndim == 2 else y).astype(np.int64, copy=False)


def answer_classes(answers: np.ndarray, *, default: int) -> int:
    """The classes a substitute needs for the target's answers: the width of probability rows, else ``default``."""
    y = np.asarray(answers)
    return int(y.shape[1]) if y.ndim == 2 else default


def check_training_seed(seed: object) -> None:
    """Refuse a training seed that is not a whole number >= 0 (numpy's generators take no negative seed)."""
    check_seed(seed)
    if seed < 0:  # type: ignore[operator]
        raise ConfigError(f"seed must be a whole number >= 0; got {seed}. Pass e.g. 0.")


def predict_labels(model: nn.Module, *, images: np.ndarray, levels: int = 256, batch_size: int = 1000) -> np.ndarray:
    """``(n,)`` int64 argmax predictions of ``model`` on uint8 images."""
    return predict_tensor(model, x=images_to_tensor(images, levels=levels), batch_size=batch_size)


def predict_tensor(model: nn.Module, *, x: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """``(n,)`` int64 argmax predictions of ``model`` on ``(n, 1, H, W)`` floats in ``[0, 1]``."""
    model.eval()
    with torch.no_grad():
        out = [model(x[s : s + batch_size]).argmax(1) for s in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def accuracy(*, predicted: np.ndarray, truth: np.ndarray) -> float:
    """Share of positions where ``predicted`` equals ``truth`` (SPEC section 3: accuracy).

    Args:
        predicted: ``(n,)`` predicted classes.
        truth: ``(n,)`` true classes.

    Returns:
        the share in ``[0, 1]``.

    Raises:
        DataError: the two are not 1-D arrays of the same length, or are empty.
    """
    return _matching_share(predicted, truth, names=("predicted", "truth"))


def agreement(*, substitute_labels: np.ndarray, target_labels: np.ndarray) -> float:
    """Share of inputs on which substitute and target predict the same class (SPEC section 3: agreement).

    Args:
        substitute_labels: ``(n,)`` the substitute's classes.
        target_labels: ``(n,)`` the target's classes on the same inputs.

    Returns:
        the share in ``[0, 1]``.

    Raises:
        DataError: the two are not 1-D arrays of the same length, or are empty.
    """
    return _matching_share(substitute_labels, target_labels, names=("substitute_labels", "target_labels"))


def _matching_share(a: np.ndarray, b: np.ndarray, *, names: tuple[str, str]) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or b.ndim != 1 or len(a) != len(b):
        raise DataError(
            f"{names[0]} and {names[1]} must be 1-D arrays of the same length, one class per input; got shapes "
            f"{a.shape} and {b.shape}. Pass the (n,) label arrays (e.g. predict_labels(...) and the true labels)."
        )
    if not len(a):
        raise DataError(
            f"{names[0]} and {names[1]} are empty: a share needs at least one input. Pass non-empty labels."
        )
    return float(np.mean(a == b))


def fgsm(
    model: nn.Module,
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    iterative: bool = False,
    iterations: int = 10,
    step: float | None = None,
) -> torch.Tensor:
    """FGSM (one signed-gradient step of size ``eps``) or I-FGSM, on inputs in ``[0, 1]``.

    Args:
        model: the model whose loss is increased (the substitute).
        x: ``(n, 1, H, W)`` inputs in ``[0, 1]``.
        y: ``(n,)`` labels whose loss is increased.
        eps: L-infinity radius.
        iterative: I-FGSM: ``iterations`` steps of size ``step`` (default ``eps / iterations * 2.5``,
            capped at ``eps``), each projected back into the eps-ball and ``[0, 1]``.
        iterations: I-FGSM steps.
        step: I-FGSM step size.

    Returns:
        adversarial inputs, same shape as ``x``, in ``[0, 1]``.
    """
    if eps < 0:
        raise ConfigError(f"eps must be >= 0; got {eps}.")
    model.eval()
    n_steps = iterations if iterative else 1
    alpha = (min(eps, step if step is not None else 2.5 * eps / iterations)) if iterative else eps
    adv = x.clone()
    for _ in range(n_steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            adv = adv + alpha * grad.sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0)
    return adv.detach()


def transferability(
    substitute: nn.Module,
    *,
    target_predict: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    eps: float,
    iterative: bool = False,
    levels: int = 256,
) -> float:
    """Share of substitute-crafted adversarial examples that the target misclassifies.

    Only inputs the target classifies correctly are attacked (SPEC section 3). The adversarial
    images are quantised back to uint8 before being shown to the target, as a real attacker
    sending images to an endpoint would.

    Args:
        substitute: where the attack is crafted (white box to the attacker).
        target_predict: the target's label function on uint8 ``(n, H, W)`` images.
        images: ``(n, H, W)`` uint8 test images.
        labels: their true labels.
        eps: L-infinity radius on ``[0, 1]`` inputs.
        iterative: I-FGSM instead of FGSM.
        levels: gray levels of the images.

    Returns:
        the transfer rate in ``[0, 1]`` (NaN if the target gets no input right).
    """
    correct = target_predict(images) == labels
    if not correct.any():
        return float("nan")
    x = images_to_tensor(images[correct], levels=levels)
    y = torch.as_tensor(labels[correct], dtype=torch.long)
    adv = fgsm(substitute, x=x, y=y, eps=eps, iterative=iterative)
    adv_images = tensor_to_images(adv, levels=levels)
    return float(np.mean(target_predict(adv_images) != labels[correct]))


def jacobian_augment(
    substitute: nn.Module, *, images: np.ndarray, labels: np.ndarray, lam: float = 0.1, levels: int = 256
) -> np.ndarray:
    """Papernot et al. 2017's augmentation: ``x + lam * sign(d F_sub(x)[label(x)] / dx)``.

    Args:
        substitute: the current substitute F_sub.
        images: ``(n, H, W)`` uint8 images already queried.
        labels: the target's answers for them: labels, or probability rows (their argmax class is followed).
        lam: step size on ``[0, 1]`` inputs (0.1 in the paper).
        levels: gray levels.

    Returns:
        ``(n, H, W)`` uint8 new images (clipped to the valid range, rounded to gray levels).
    """
    substitute.eval()
    x = images_to_tensor(images, levels=levels).requires_grad_(True)
    # F is the substitute's softmax output, as in the paper. grad log F_y = grad F_y / F_y has the
    # same sign per pixel and does not underflow to 0 when the substitute is saturated (F_y = 1.0).
    log_probs = torch.log_softmax(substitute(x), dim=1)
    picked = log_probs.gather(1, torch.as_tensor(hard_labels(labels), dtype=torch.long)[:, None]).sum()
    (grad,) = torch.autograd.grad(picked, x)
    return tensor_to_images((x + lam * grad.sign()).clamp(0.0, 1.0).detach(), levels=levels)


def tensor_to_images(x: torch.Tensor, *, levels: int = 256) -> np.ndarray:
    """``(n, 1, H, W)`` floats in ``[0, 1]`` to ``(n, H, W)`` uint8 gray levels (rounded)."""
    return np.clip(np.rint(x[:, 0].numpy() * (levels - 1)), 0, levels - 1).astype(np.uint8)
