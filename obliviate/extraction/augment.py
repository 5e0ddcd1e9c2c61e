"""Label-preserving augmentation of bought images (SPEC section 3b).

Small random rotations, scalings and shifts, one independent draw per image, from an explicit
``torch.Generator``. The parameterisation is torchvision's ``transforms.v2.RandomAffine``
(``degrees``, ``translate`` as a fraction of the side, ``scale`` range; bilinear, zero fill),
applied in one batched ``affine_grid`` / ``grid_sample`` call. ``v2.RandomAffine`` itself is not
called because it draws one parameter set per call from the global torch RNG: a batch would get
one shared transform, and runs would depend on global random state (the house rule is explicit
generators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from obliviate.errors import ConfigError


@dataclass(frozen=True)
class AugmentOptions:
    """Random affine augmentation, as ``torchvision.transforms.v2.RandomAffine`` names it.

    Attributes:
        degrees: rotation drawn uniformly in ``[-degrees, degrees]``.
        translate: shift drawn uniformly in ``[-translate, translate]`` times the image side, per axis.
        scale: zoom factor drawn uniformly in ``[scale[0], scale[1]]``.
    """

    degrees: float = 12.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)

    def __post_init__(self) -> None:
        if self.degrees < 0 or not 0 <= self.translate < 0.5 or not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError(
                "augmentation needs degrees >= 0, 0 <= translate < 0.5 and 0 < scale[0] <= scale[1]; got "
                f"{self.degrees}, {self.translate}, {self.scale}."
            )


def random_affine(x: torch.Tensor, *, options: AugmentOptions, generator: torch.Generator) -> torch.Tensor:
    """Apply an independent random affine transform to each image of ``x``.

    Args:
        x: ``(n, C, H, W)`` floats in ``[0, 1]``.
        options: transform ranges.
        generator: the only source of randomness.

    Returns:
        a new ``(n, C, H, W)`` tensor; pixels moved in from outside the image are 0 (background).
    """
    n = x.shape[0]
    if n == 0:
        return x.clone()
    u = torch.rand(n, 4, generator=generator)
    angle = (2 * u[:, 0] - 1) * math.radians(options.degrees)
    zoom = options.scale[0] + (options.scale[1] - options.scale[0]) * u[:, 1]
    # affine_grid maps output coordinates in [-1, 1] to input coordinates: the inverse transform.
    # A shift of t (fraction of the side) is 2 t in normalised coordinates.
    shift = (2 * u[:, 2:] - 1) * options.translate * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin, -shift[:, 0]], dim=1),
            torch.stack([sin, cos, -shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, *, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image at a random centre (may overlap the border).

    Cutout (DeVries and Taylor 2017), the erasing part of FixMatch's strong augmentation
    (Sohn et al., NeurIPS 2020). ``size <= 0`` returns a copy.
    """
    n, _, h, w = x.shape
    if size <= 0 or n == 0:
        return x.clone()
    centre = torch.stack(
        [torch.randint(0, h, (n,), generator=generator), torch.randint(0, w, (n,), generator=generator)], 1
    )
    rows = (torch.arange(h).view(1, h, 1) - centre[:, 0].view(n, 1, 1)).abs() <= size // 2
    cols = (torch.arange(w).view(1, 1, w) - centre[:, 1].view(n, 1, 1)).abs() <= size // 2
    return x * (~(rows & cols)).unsqueeze(1).to(x.dtype)
