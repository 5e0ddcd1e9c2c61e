"""DeepObliviate: retrain from M_{d-1}, stop early on decaying residual memory, stitch (SPEC section 5).

Retrain from M_{d-1} while measuring the residual memory
Δ_t = ‖Inf(B_{d+t-1} | M_{d+t-2}) − Inf(B_{d+t-1} | M'_{d+t-2})‖_1 (t = 1 is block d), fit
Δ_t ≈ a·t^{-h} + b, stop at τ by the rule, and stitch M'_B = M'_{j} + (M_B − M_j) with
j = d + τ − 1. A guardrail checks the stitched model's held-out accuracy against the chain's
recorded accuracy; on failure retraining continues past τ (doubling the extra blocks each retry)
down to the exact result, and the record says so.

Indexing: the spec counts t from d with M'_{d+τ} the last retrained state; here t = 1 is the first
retrained block d so that the fit's t^{-h} is finite, and the last retrained block is d + τ − 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch

from obliviate.defaults import DEFAULT_MIN_POINTS
from obliviate.errors import ConfigError, named_choice
from obliviate.unlearning.chain import (
    BlockData,
    Chain,
    Checkpoint,
    CheckpointSink,
    state_difference_l1,
    with_replaced,
)
from obliviate.unlearning.config import model_from_state
from obliviate.unlearning.exact import ChainRetrainer, _commit, _retrainer_for, _times
from obliviate.unlearning.records import (
    GuardrailAttempt,
    GuardrailResult,
    Policy,
    PowerLawFit,
    UnlearningRecord,
    UnlearningResult,
)
from obliviate.unlearning.trainer import heldout_accuracy

#: ε of the stop rule when none is given (SPEC section 5).
DEFAULT_EPSILON = 0.05


class StopRule(str, Enum):
    """DeepObliviate termination rules (SPEC section 5)."""

    RESIDUAL_RATIO = "residual_ratio"  # (Δ_τ − b̂)/(Δ_1 − b̂) < ε   (default)
    RATIO = "ratio"  # Δ_τ/Δ_1 < ε
    SLOPE = "slope"  # |a·h·τ^{−h−1}| < ε   (absolute, in Δ's L1 units)


@dataclass(frozen=True)
class DeepObliviateOptions:
    """Switches of the DeepObliviate policy (defaults from SPEC section 5).

    Attributes:
        epsilon: ε of the stop rule.
        min_points: m, the fewest Δ points before the fit and the rule are tried.
        stop_rule: ``residual_ratio`` (default), ``ratio`` or ``slope``.
        guardrail_tolerance: largest allowed drop of held-out accuracy (a fraction; 0.01 = 1 point)
            of the stitched model below the chain's recorded accuracy.
        nonnegative_floor: fit b >= 0 (default; Δ is a norm), or an unconstrained b (switch). See
            :func:`fit_power_law`.
    """

    epsilon: float = DEFAULT_EPSILON
    min_points: int = DEFAULT_MIN_POINTS
    stop_rule: StopRule = StopRule.RESIDUAL_RATIO  # DEFAULT_STOP_RULE (tests hold them equal)
    guardrail_tolerance: float = 0.01
    nonnegative_floor: bool = True

    def __post_init__(self) -> None:
        rule = named_choice(StopRule, value=self.stop_rule, what="stop_rule", means="DeepObliviate's stop rule")
        object.__setattr__(self, "stop_rule", rule)
        if not self.epsilon > 0:
            raise ConfigError(f"epsilon must be > 0; got {self.epsilon!r}.")
        if not isinstance(self.min_points, int) or self.min_points < 3:
            raise ConfigError(
                f"min_points must be an integer >= 3 (three parameters are fitted); got {self.min_points!r}. "
                f"Pass 3 or more (default {DEFAULT_MIN_POINTS})."
            )
        if not 0 <= self.guardrail_tolerance < 1:
            raise ConfigError(f"guardrail_tolerance must be in [0, 1); got {self.guardrail_tolerance!r}.")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop_rule"] = self.stop_rule.value
        return out


def fit_power_law(deltas: Sequence[float], *, nonnegative_floor: bool = True) -> PowerLawFit:
    """Least squares Δ_t ≈ a·t^{-h} + b for t = 1..n with h > 0 (and b >= 0 by default), scipy-free.

    For a fixed h the model is linear in (a, b) and solved in closed form (with b clamped to 0
    when ``nonnegative_floor`` and the free optimum is negative), so h is searched on a log grid
    over [1e-3, 20] and refined by golden-section search around the best grid point.

    Why b >= 0 by default: Δ_t is an L1 norm, so its floor cannot be negative. Unconstrained, a
    near-linear decay is fitted best by a tiny h and a large negative b, and the residual-ratio rule
    (Δ_τ − b̂)/(Δ_1 − b̂) then never falls below ε however small Δ_τ gets. ``nonnegative_floor=False``
    gives the unconstrained fit.
    """
    y = np.asarray(deltas, dtype=np.float64)
    n = y.size
    if y.ndim != 1:
        raise ConfigError(f"a power-law fit needs a flat sequence of Δ values; got shape {y.shape}.")
    if n < 3:
        raise ConfigError(f"a power-law fit needs at least 3 points; got {n}.")
    if not np.isfinite(y).all():
        bad = int(np.flatnonzero(~np.isfinite(y))[0])
        # NaN made every candidate fit equally bad, so it reported a=b=nan with r2 = 1.0 (a "perfect" fit).
        raise ConfigError(
            f"a power-law fit needs finite Δ values; Δ_{bad + 1} is {y[bad]}. Drop or recompute that block's Δ."
        )
    log_t = np.log(np.arange(1, n + 1, dtype=np.float64))

    def solve(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.exp(-np.outer(h, log_t))  # (len(h), n): t^{-h}
        x_mean, y_mean = x.mean(axis=1), y.mean()
        xc = x - x_mean[:, None]
        sxx = (xc * xc).sum(axis=1)
        a = np.where(sxx > 0, (xc * (y - y_mean)).sum(axis=1) / np.where(sxx > 0, sxx, 1.0), 0.0)
        b = y_mean - a * x_mean
        if nonnegative_floor:
            clamp = b < 0
            xx = (x * x).sum(axis=1)
            a = np.where(clamp, (x * y).sum(axis=1) / xx, a)
            b = np.where(clamp, 0.0, b)
        residual = y[None, :] - (a[:, None] * x + b[:, None])
        return a, b, (residual * residual).sum(axis=1)

    grid = np.geomspace(1e-3, 20.0, 121)
    sse = solve(grid)[2]
    best = int(np.argmin(sse))
    lo, hi = math.log(grid[max(best - 1, 0)]), math.log(grid[min(best + 1, grid.size - 1)])
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        m1, m2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        f1, f2 = solve(np.exp([m1, m2]))[2]
        if f1 <= f2:
            hi = m2
        else:
            lo = m1
    candidates = np.array([math.exp((lo + hi) / 2), grid[best]])
    a, b, err = solve(candidates)
    pick = int(np.argmin(err))
    total = float(((y - y.mean()) ** 2).sum())
    sse_best = float(err[pick])
    return PowerLawFit(
        a=float(a[pick]),
        h=float(candidates[pick]),
        b=float(b[pick]),
        sse=sse_best,
        r2=1.0 - sse_best / total if total > 0 else 1.0,
        num_points=n,
    )


def stop_rule_statistic(deltas: Sequence[float], *, fit: PowerLawFit, rule: StopRule | str) -> float | None:
    """The value the rule compares with ε at τ = len(deltas), or ``None`` where the rule cannot fire.

    A rule only fires on a decaying series: the fit must have a > 0 and the observed Δ_τ must be
    below Δ_1; otherwise (flat or growing residual memory) there is nothing to wait out and the
    statistic is ``None``. So a growing series never stops early.
    """
    rule = StopRule(rule)
    first, last, tau = float(deltas[0]), float(deltas[-1]), len(deltas)
    if not (fit.a > 0 and last < first):
        return None
    if rule is StopRule.RATIO:
        return last / first if first > 0 else None
    if rule is StopRule.SLOPE:
        return abs(fit.slope(tau))
    span = first - fit.b
    if span <= 0:
        return None
    return (last - fit.b) / span


def stitch_state(
    *,
    retrained: dict[str, torch.Tensor],
    original_final: dict[str, torch.Tensor],
    original_at_stop: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """M'_B = M'_j + (M_B − M_j) for every parameter and buffer (SPEC section 5, stitch)."""
    return {k: retrained[k] + (original_final[k] - original_at_stop[k]) for k in retrained}


def unlearn_deepobliviate(
    chain: Chain,
    *,
    ids: Iterable[int],
    data: BlockData,
    options: DeepObliviateOptions = DeepObliviateOptions(),
    sink: CheckpointSink | None = None,
    retrainer: ChainRetrainer | None = None,
) -> UnlearningResult:
    """DeepObliviate with a guardrail (SPEC section 5). See the module docstring.

    Args:
        chain: the current chain.
        ids: training-sample ids to forget.
        data: the chain's data (its held-out set drives the guardrail).
        options: ε, m, stop rule and guardrail tolerance.
        sink: receives the new checkpoints once the result is final.
        retrainer: a shared :class:`ChainRetrainer` for these ids (benchmarks), or ``None``.

    Raises:
        DeletionError: a bad request (nothing changes).
        ChainMismatchError: ``data`` is not the chain's data.
    """
    began = (time.perf_counter(), time.process_time())
    retrainer = _retrainer_for(chain, ids, data=data, retrainer=retrainer)
    trained_before = retrainer.total_seconds
    config, original = chain.config, chain.checkpoints
    num_blocks = config.num_blocks
    d = retrainer.first_affected
    deltas: list[float] = []
    fit: PowerLawFit | None = None
    stop_block: int | None = None
    statistic: float | None = None
    tested = applied = False  # whether the rule was evaluated at some block / could fire there (a decaying series)
    for block in range(d, num_blocks + 1):
        after = retrainer.advance_to(block)
        before = retrainer.checkpoints[block - 1]
        deltas.append(
            state_difference_l1(
                a_after=original[block].model_state,
                a_before=original[block - 1].model_state,
                b_after=after.model_state,
                b_before=before.model_state,
            )
        )
        if block < retrainer.last_affected or len(deltas) < options.min_points or block == num_blocks:
            continue
        fit = fit_power_law(deltas, nonnegative_floor=options.nonnegative_floor)
        statistic = stop_rule_statistic(deltas, fit=fit, rule=options.stop_rule)
        tested, applied = True, applied or statistic is not None
        if statistic is not None and statistic < options.epsilon:
            stop_block = block
            break

    reference = original[num_blocks].heldout_accuracy
    attempts: list[GuardrailAttempt] = []
    final_state: dict[str, torch.Tensor] | None = None
    last_used = num_blocks
    if stop_block is None and not tested:
        stop_reason = (
            f"too few blocks follow the last affected block {retrainer.last_affected} to apply stop rule "
            f"{options.stop_rule.value} (it needs {options.min_points} Δ points before the last block): retrained "
            "to the last block (the exact result)"
        )
        outcome = "not_needed"
    elif stop_block is None and not applied:
        # "never fell below eps=1e9" read as a broken rule: the series itself never decayed.
        stop_reason = (
            f"the residual Δ never decayed after the last affected block {retrainer.last_affected} (it grew or "
            f"stayed flat, so stop rule {options.stop_rule.value} cannot fire at any eps): retrained to the last "
            "block (the exact result)"
        )
        outcome = "not_needed"
    elif stop_block is None:
        stop_reason = (
            f"stop rule {options.stop_rule.value} never fell below eps={options.epsilon} after the last affected "
            f"block {retrainer.last_affected}: retrained to the last block (the exact result)"
        )
        outcome = "not_needed"
    else:
        stop_reason = (
            f"stop rule {options.stop_rule.value} = {statistic:.4g} < eps={options.epsilon} at tau={stop_block - d + 1} "
            f"(block {stop_block})"
        )
        candidate, extension = stop_block, 0
        outcome = "fallback_exact"
        while candidate < num_blocks:
            retrained = retrainer.advance_to(candidate)
            state = stitch_state(
                retrained=retrained.model_state,
                original_final=original[num_blocks].model_state,
                original_at_stop=original[candidate].model_state,
            )
            accuracy = heldout_accuracy(model_from_state(config=config, state=state), data=data)
            passed = reference is not None and accuracy >= reference - options.guardrail_tolerance - 1e-12
            attempts.append(
                GuardrailAttempt(
                    candidate, accuracy, float(reference or float("nan")), options.guardrail_tolerance, passed
                )
            )
            if passed:
                final_state, last_used = state, candidate
                outcome = "passed" if candidate == stop_block else "passed_after_extension"
                break
            # Retrain further past τ: the extra blocks double on every retry, so at most log2(B) checks.
            extension = max(options.min_points, 2 * extension)
            candidate = min(candidate + extension, num_blocks)
        if final_state is None:
            retrainer.advance_to(num_blocks)
    # Extend the logged Δ series over every block that was retrained beyond the stop point.
    for block in range(d + len(deltas), last_used + 1):
        deltas.append(
            state_difference_l1(
                a_after=original[block].model_state,
                a_before=original[block - 1].model_state,
                b_after=retrainer.checkpoints[block].model_state,
                b_before=retrainer.checkpoints[block - 1].model_state,
            )
        )

    new = [retrainer.checkpoints[b] for b in range(d, last_used + 1)]
    if final_state is not None:
        new += _stitched_checkpoints(chain, retrainer.checkpoints[last_used], final_state, data)
    new_chain = with_replaced(chain, checkpoints=new, deleted_ids=retrainer.excluded)
    record = UnlearningRecord(
        policy=Policy.DEEPOBLIVIATE.value,
        deleted_ids=tuple(retrainer.ids.tolist()),
        first_affected_block=d,
        last_affected_block=retrainer.last_affected,
        blocks_retrained=tuple(range(d, last_used + 1)),
        delta_series=tuple(deltas),
        fit=fit,
        stop_block=stop_block,
        stop_reason=stop_reason,
        stop_statistic=statistic,
        guardrail=GuardrailResult(attempts=tuple(attempts), outcome=outcome),
        heldout_accuracy=new_chain.final.heldout_accuracy,
        options=options.to_dict(),
        **_times(began, retrainer, trained_before=trained_before, last_used=last_used),
    )
    _commit(new, sink)
    return UnlearningResult(chain=new_chain, record=record, new_checkpoints=tuple(new))


def _stitched_checkpoints(
    chain: Chain, retrained: Checkpoint, final_state: dict[str, torch.Tensor], data: BlockData
) -> list[Checkpoint]:
    """M'_i = M'_j + (M_i − M_j) for i > j; the final one is the guarded model M'_B.

    Stitched checkpoints keep the original chain's optimizer state (the method has no better
    estimate); only M'_B is evaluated, the others carry ``None`` accuracy.
    """
    original, num_blocks, j = chain.checkpoints, chain.config.num_blocks, retrained.block_index
    out = []
    for i in range(j + 1, num_blocks + 1):
        state = (
            final_state
            if i == num_blocks
            else stitch_state(
                retrained=retrained.model_state,
                original_final=original[i].model_state,
                original_at_stop=original[j].model_state,
            )
        )
        out.append(
            Checkpoint(
                block_index=i,
                model_state=state,
                optimizer_state=original[i].optimizer_state,
                schedule_position=i,
                heldout_accuracy=heldout_accuracy(model_from_state(config=chain.config, state=state), data=data)
                if i == num_blocks
                else None,
                config_fingerprint=retrained.config_fingerprint,
                data_fingerprint=retrained.data_fingerprint,
                origin="stitched",
                excluded_count=retrained.excluded_count,
            )
        )
    return out
