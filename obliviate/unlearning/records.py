"""What an unlearning returns and records (SPEC section 5): the policy, the blocks retrained, the
Δ series and fit, the stop reason, the guardrail's attempts and the measured times.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch

from obliviate.errors import ObliviateError
from obliviate.unlearning.chain import (
    Chain,
    Checkpoint,
)


class DeletionError(ObliviateError, ValueError):
    """A deletion request breaks a rule (unknown, duplicate or already deleted ids, empty)."""


class Policy(str, Enum):
    EXACT = "exact"
    DEEPOBLIVIATE = "deepobliviate"


@dataclass(frozen=True)
class PowerLawFit:
    """Least-squares fit Δ_t ≈ a·t^{-h} + b over t = 1..n (h > 0)."""

    a: float
    h: float
    b: float
    sse: float
    r2: float
    num_points: int

    def predict(self, t: np.ndarray | float) -> np.ndarray:
        return self.a * np.power(np.asarray(t, dtype=np.float64), -self.h) + self.b

    def slope(self, t: float) -> float:
        return float(-self.a * self.h * t ** (-self.h - 1.0))


@dataclass(frozen=True)
class GuardrailAttempt:
    """One check of a stitched model: retrained up to ``block``, stitched, evaluated."""

    block: int
    accuracy: float
    reference: float
    tolerance: float
    passed: bool


@dataclass(frozen=True)
class GuardrailResult:
    """What the guardrail decided: passed on the first try, after retraining further, or fell back."""

    attempts: tuple[GuardrailAttempt, ...]
    outcome: str  # "passed" | "passed_after_extension" | "fallback_exact" | "not_needed"

    @property
    def passed_first(self) -> bool:
        return self.outcome == "passed"


@dataclass(frozen=True)
class UnlearningRecord:
    """What a policy did, for logs, reports and audits."""

    policy: str
    deleted_ids: tuple[int, ...]
    first_affected_block: int
    last_affected_block: int
    blocks_retrained: tuple[int, ...]
    delta_series: tuple[float, ...] = ()
    fit: PowerLawFit | None = None
    stop_block: int | None = None  # last retrained block before stitching (None: no early stop)
    stop_reason: str = ""
    stop_statistic: float | None = None
    guardrail: GuardrailResult | None = None
    retrain_seconds: float = 0.0
    overhead_seconds: float = 0.0
    wall_time_seconds: float = 0.0
    cpu_seconds: float = 0.0
    heldout_accuracy: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["deleted_ids"] = list(self.deleted_ids)
        out["blocks_retrained"] = list(self.blocks_retrained)
        out["delta_series"] = list(self.delta_series)
        return out


@dataclass(frozen=True, eq=False)
class UnlearningResult:
    """The new current chain, its final model's state, and the record of what was done."""

    chain: Chain
    record: UnlearningRecord
    new_checkpoints: tuple[Checkpoint, ...]

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return self.chain.final.model_state
