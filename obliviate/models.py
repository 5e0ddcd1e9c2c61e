"""Classifiers used as targets, substitutes and unlearning subjects.

* ``lenet5``: LeNet-5 (LeCun et al. 1998) for gray images, the seed's MNIST target.
* ``c3f2``: three convolutions and two fully connected layers, the seed's second substitute.
* ``resnet18``: torchvision's ResNet-18 (random init, never downloaded weights), for larger images.

Initialisation is seeded explicitly: :func:`build_model` draws all initial weights inside a
forked RNG scope, so it neither reads nor changes the caller's global torch random state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from obliviate.checks import is_whole
from obliviate.errors import ConfigError


class MaxPool2x2(nn.Module):
    """2x2 max-pooling with stride 2 (``nn.MaxPool2d(2)``), computed faster where no gradient is wanted.

    Without autograd (``predict``, held-out evaluation, the rollback judge) it takes the elementwise
    maximum of the four strided 2x2 offsets, which on one CPU thread is about 6x faster than
    ``max_pool2d`` for LeNet-5's first layer (1.7 vs 9.6 ms for 500 MNIST images) and equal bit for
    bit (a maximum does not round). With autograd it calls ``max_pool2d`` itself: ``torch.maximum``
    splits the gradient between tied inputs (ReLU of a positive bias ties across a blank background),
    which would change training and break bit-identical replay of stored chains.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return nn.functional.max_pool2d(x, 2)
        height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor mode drops an odd last row/column
        x = x[..., :height, :width]
        return torch.maximum(
            torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]), torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2])
        )


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; any square input side >= 8 (28 for MNIST)."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(),
            MaxPool2x2(),
            nn.Conv2d(6, 16, kernel_size=5, padding=2 if image_size < 16 else 0),
            nn.ReLU(),
            MaxPool2x2(),
        )
        side = _conv_side(self.features, in_channels=in_channels, image_size=image_size)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class C3F2(nn.Module):
    """Three 3x3 convolutions (32, 64, 64 channels) and two fully connected layers (200, classes)."""

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            MaxPool2x2(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            MaxPool2x2(),
            nn.Conv2d(64, 64, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        side = _conv_side(self.features, in_channels=in_channels, image_size=image_size)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet18(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3 or image_size < 64:
        # Small gray images: a 3x3 stem without the max-pool keeps spatial resolution (CIFAR-style).
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "c3f2": C3F2,
    "resnet18": _resnet18,
}


def build_model(
    name: str, *, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, seed: int
) -> nn.Module:
    """Build a freshly initialised classifier.

    Args:
        name: one of ``lenet5``, ``c3f2``, ``resnet18``.
        num_classes: output classes.
        in_channels: input channels (1 for gray).
        image_size: side of the square input.
        seed: initialisation seed; equal seeds give bit-identical weights.

    Returns:
        the model, in training mode, with its ``image_size`` as an attribute (a
        :class:`~obliviate.extraction.target.LocalTorchBackend` refuses queries of another size).

    Raises:
        ConfigError: unknown model name, a size or class count that is not a whole number >= 1, or a
            seed that is not a whole number.
    """
    check_arch(name)
    for what, value, example in (
        ("num_classes", num_classes, "10 for digits"),
        ("in_channels", in_channels, "1 for gray images"),
        ("image_size", image_size, "28 for MNIST"),
    ):
        if not is_whole(value) or value < 1:
            raise ConfigError(f"{what} must be a whole number >= 1; got {value!r}. Pass an int, e.g. {example}.")
    check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODEL_BUILDERS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    setattr(model, "image_size", int(image_size))  # noqa: B010 -- nn.Module types __setattr__ for tensors and modules
    return model


def check_arch(name: object) -> None:
    """Refuse a model name :func:`build_model` does not know (``ConfigError`` listing the valid names)."""
    if not isinstance(name, str) or name not in MODEL_BUILDERS:
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(MODEL_BUILDERS)}.")


def check_seed(seed: object, *, what: str = "seed") -> None:
    """Refuse a seed that is not a whole number (``ConfigError``: rule, value, fix).

    ``None`` or a ``numpy.random.Generator`` would otherwise fail deep inside ``torch.manual_seed``.
    """
    if not is_whole(seed):
        raise ConfigError(
            f"{what} must be an int; got {type(seed).__name__} {seed!r}. Pass a whole number such as 0 "
            "(equal seeds give identical runs)."
        )


def images_to_tensor(images: np.ndarray, *, levels: int = 256) -> torch.Tensor:
    """``(n, H, W)`` uint8 gray levels to a ``(n, 1, H, W)`` float32 tensor in ``[0, 1]``.

    Args:
        images: ``(n, H, W)`` gray levels in ``0..levels-1``.
        levels: gray levels of the images (256 for 8-bit images).

    Returns:
        ``(n, 1, H, W)`` float32, each gray level divided by ``levels - 1``.

    Raises:
        ConfigError: ``levels`` is below 2 (one level would divide by zero).
    """
    if not levels >= 2:
        raise ConfigError(f"levels must be >= 2 (gray levels of the images); got {levels!r}. Pass 256.")
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / float(levels - 1)).unsqueeze(1)


def _conv_side(features: nn.Module, *, in_channels: int, image_size: int) -> int:
    with torch.no_grad():
        out = features(torch.zeros(1, in_channels, image_size, image_size))
    if out.shape[-1] < 1:
        raise ConfigError(f"image_size={image_size} is too small for this network; use at least 8.")
    return int(out.shape[-1])
