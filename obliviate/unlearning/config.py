"""How a block chain is trained: the config and the learning-rate schedules across blocks (SPEC section 4).

:class:`BlockTrainingConfig` is a run's whole training recipe (model, B, E, optimizer, schedule, seed,
thread count); its :attr:`~BlockTrainingConfig.fingerprint` is stored with every checkpoint so that a
checkpoint is never used with another recipe.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from obliviate.checks import is_whole
from obliviate.defaults import DEFAULT_RECIPE  # noqa: F401 (re-exported from its old home)
from obliviate.errors import ConfigError, named_choice

if TYPE_CHECKING:  # torch is imported where a model is built: a run's spec and its config are read without it
    import torch
    from torch import nn

# The recipe ``obliviate train`` uses unless told otherwise; held in obliviate.defaults so that building the
# command line imports no torch.


class OptimizerName(str, Enum):
    """Optimizer carried across the whole chain."""

    SGD = "sgd"
    ADAM = "adam"


class ScheduleName(str, Enum):
    """Learning-rate schedule across blocks (the rate is constant inside a block)."""

    CONSTANT = "constant"
    STEP = "step"
    COSINE = "cosine"
    EXPONENTIAL = "exponential"


@dataclass(frozen=True)
class BlockTrainingConfig:
    """Everything that determines a chain of block checkpoints (SPEC section 4).

    Attributes:
        model: ``lenet5``, ``c3f2`` or ``resnet18`` (see :func:`obliviate.models.build_model`).
        num_classes: output classes.
        in_channels: input channels (1 for gray images).
        image_size: side of the square input images.
        levels: gray levels of the data (256 for 8-bit, 17 for scikit-learn digits).
        num_blocks: B, the number of blocks.
        local_epochs: E, epochs over each block before moving to the next.
        batch_size: mini-batch size inside a block.
        optimizer: ``sgd`` or ``adam``.
        learning_rate: base learning rate (block 1's rate).
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty.
        schedule: ``constant``, ``step``, ``cosine`` or ``exponential`` across blocks.
        step_every_blocks: for ``step``: the rate is multiplied by ``gamma`` every this many blocks.
        gamma: factor of ``step`` and per-block factor of ``exponential``.
        min_lr_fraction: for ``cosine``: the floor, as a fraction of ``learning_rate``.
        seed: initialisation seed, block-split seed and per-block randomness seed.
        num_threads: torch intra-op threads while training (bit-identity needs equal counts).
        accuracy_every: record held-out accuracy every this many blocks (and always at the last
            block); other checkpoints carry ``None``. Evaluating is not free on CPU, and only the
            last block's accuracy is used by the guardrail.
    """

    model: str = "lenet5"
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    levels: int = 256
    num_blocks: int = 50
    local_epochs: int = 2
    batch_size: int = 32
    optimizer: OptimizerName = OptimizerName.SGD
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: ScheduleName = ScheduleName.CONSTANT
    step_every_blocks: int = 10
    gamma: float = 0.5
    min_lr_fraction: float = 0.0
    seed: int = 0
    num_threads: int = 1
    accuracy_every: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", named_choice(OptimizerName, value=self.optimizer, what="optimizer"))
        object.__setattr__(self, "schedule", named_choice(ScheduleName, value=self.schedule, what="schedule"))
        positive_ints = {
            "num_blocks": self.num_blocks,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "step_every_blocks": self.step_every_blocks,
            "num_threads": self.num_threads,
            "accuracy_every": self.accuracy_every,
            "num_classes": self.num_classes,
        }
        for name, value in positive_ints.items():
            if not is_whole(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}.")
            object.__setattr__(self, name, int(value))  # numpy integers become plain ints (JSON, fingerprint)
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0 (numpy's generators refuse others); got {self.seed!r}.")
        object.__setattr__(self, "seed", int(self.seed))
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0; got {self.learning_rate!r}.")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1] (a decay factor); got {self.gamma!r}.")
        if not 0 <= self.min_lr_fraction <= 1:
            raise ConfigError(f"min_lr_fraction must be in [0, 1]; got {self.min_lr_fraction!r}.")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1); got {self.momentum!r}.")

    def learning_rate_at(self, block: int) -> float:
        """Learning rate used for block ``block`` (1-based): a pure function of config and block."""
        if not 1 <= block <= self.num_blocks:
            raise ConfigError(f"block must be in 1..{self.num_blocks}; got {block}.")
        return schedule_rate(
            schedule=self.schedule,
            base=self.learning_rate,
            position=block - 1,
            total=self.num_blocks,
            gamma=self.gamma,
            step_every=self.step_every_blocks,
            min_fraction=self.min_lr_fraction,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (enums as their values)."""
        out = asdict(self)
        out["optimizer"] = self.optimizer.value
        out["schedule"] = self.schedule.value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BlockTrainingConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown BlockTrainingConfig fields {sorted(unknown)}.")
        return cls(**values)

    @property
    def fingerprint(self) -> str:
        """SHA-256 (16 hex chars) of the canonical JSON of every field: the config's identity."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def schedule_rate(
    *,
    schedule: ScheduleName | str,
    base: float,
    position: int,
    total: int,
    gamma: float,
    step_every: int,
    min_fraction: float,
) -> float:
    """Learning rate at 0-based ``position`` of ``total`` steps of a schedule.

    ``constant``: base. ``step``: base * gamma ** (position // step_every). ``exponential``:
    base * gamma ** position. ``cosine``: from base down to base * min_fraction along half a cosine.

    Raises:
        ConfigError: an unknown schedule name, or ``step_every`` < 1 for ``step``.
    """
    schedule = named_choice(ScheduleName, value=schedule, what="schedule")
    if schedule is ScheduleName.CONSTANT:
        return float(base)
    if schedule is ScheduleName.STEP:
        if not is_whole(step_every) or step_every < 1:
            raise ConfigError(
                f"step_every must be a whole number of steps >= 1 for the step schedule; got {step_every!r}."
            )
        return float(base * gamma ** (position // step_every))
    if schedule is ScheduleName.EXPONENTIAL:
        return float(base * gamma**position)
    floor = base * min_fraction
    progress = position / max(total - 1, 1)
    return float(floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def new_model(config: BlockTrainingConfig) -> nn.Module:
    """M_0: the config's architecture, initialised from ``config.seed`` (SPEC section 4).

    Args:
        config: the chain's options (model, num_classes, in_channels, image_size, seed).

    Returns:
        a fresh module; equal configs give bit-identical initial weights.

    Raises:
        ConfigError: an unknown model name, or an image size too small for the network.
    """
    from obliviate.models import build_model

    return build_model(
        config.model,
        num_classes=config.num_classes,
        in_channels=config.in_channels,
        image_size=config.image_size,
        seed=config.seed,
    )


def model_from_state(*, config: BlockTrainingConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A module of the config's architecture holding ``state`` (copied in)."""
    model = new_model(config)
    model.load_state_dict(state)
    return model
