"""Unlearning policies on a block chain: exact restart, DeepObliviate with a guardrail (SPEC section 5).

Every policy takes the current :class:`~obliviate.blocks.Chain`, a set of training-sample ids to
forget and the chain's :class:`~obliviate.blocks.BlockData`, and returns an
:class:`UnlearningResult`: the new current chain (which a second deletion starts from) and an
:class:`UnlearningRecord` (policy, blocks retrained, Δ series, fit, stop reason, wall time,
guardrail result). New checkpoints reach the caller's sink only once the result is final; a
rejected request (:class:`DeletionError`) changes nothing.

Policies:

* ``exact`` (default): retrain from M_{d-1} to M_B without the ids. Bit-identical to naive
  retraining from scratch without them (blocks before d never saw them and share every random draw).
* ``deepobliviate``: retrain from M_{d-1} while measuring the residual memory
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
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch

from obliviate.blocks import (
    BlockData,
    BlockTrainer,
    BlockTiming,
    Chain,
    ChainMismatchError,
    Checkpoint,
    CheckpointSink,
    heldout_accuracy,
    model_from_state,
    state_difference_l1,
    with_replaced,
)
from obliviate.errors import ConfigError, ObliviateError


class DeletionError(ObliviateError, ValueError):
    """A deletion request breaks a rule (unknown, duplicate or already deleted ids, empty)."""


class Policy(str, Enum):
    EXACT = "exact"
    DEEPOBLIVIATE = "deepobliviate"


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

    epsilon: float = 0.05
    min_points: int = 5
    stop_rule: StopRule = StopRule.RESIDUAL_RATIO
    guardrail_tolerance: float = 0.01
    nonnegative_floor: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_rule", StopRule(self.stop_rule))
        if not self.epsilon > 0:
            raise ConfigError(f"epsilon must be > 0; got {self.epsilon!r}.")
        if not isinstance(self.min_points, int) or self.min_points < 3:
            raise ConfigError(f"min_points must be an integer >= 3 (three parameters are fitted); got {self.min_points!r}.")
        if not 0 <= self.guardrail_tolerance < 1:
            raise ConfigError(f"guardrail_tolerance must be in [0, 1); got {self.guardrail_tolerance!r}.")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop_rule"] = self.stop_rule.value
        return out


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


def validate_deletion(chain: Chain, ids: Iterable[int]) -> np.ndarray:
    """Check a deletion request against the chain; return the ids as a sorted int64 array.

    Raises:
        DeletionError: empty request, non-integer, duplicate, unknown or already deleted ids.
    """
    raw = list(ids)
    if not raw:
        raise DeletionError("rule: a deletion must name at least one sample id; got an empty set. Nothing changed.")
    bad_type = [v for v in raw if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
    if bad_type:
        raise DeletionError(
            f"rule: sample ids must be integers (training-set row indices); got {bad_type[:5]!r}. Nothing changed."
        )
    values = np.asarray([int(v) for v in raw], dtype=np.int64)
    unique, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        raise DeletionError(
            f"rule: each sample id may appear once per request; duplicated: {unique[counts > 1][:10].tolist()}. "
            "Remove the repeats. Nothing changed."
        )
    n = chain.plan.num_samples
    unknown = unique[(unique < 0) | (unique >= n)]
    if unknown.size:
        raise DeletionError(
            f"rule: sample ids must be in 0..{n - 1} (the chain's training set); unknown: {unknown[:10].tolist()}. "
            "Nothing changed."
        )
    already = sorted(set(unique.tolist()) & chain.deleted_ids)
    if already:
        raise DeletionError(
            f"rule: a sample can be deleted once; already deleted: {already[:10]}. Drop them from the request. "
            "Nothing changed."
        )
    return unique


def _check_data(chain: Chain, data: BlockData) -> None:
    if data.fingerprint != chain.data_fingerprint:
        raise ChainMismatchError(
            f"the data passed has fingerprint {data.fingerprint}, but the chain was trained on "
            f"{chain.data_fingerprint}. Pass the chain's own training and held-out data. Nothing changed."
        )


class ChainRetrainer:
    """Retrains a chain from M_{d-1} without the deleted ids, lazily, block by block.

    Keeps every retrained checkpoint and the measured time of every block, so policies that need
    the same retrained prefix (``exact`` and ``deepobliviate`` at several ε in a benchmark) can share
    it: the retraining is deterministic, so sharing changes no result, and each policy is charged the
    measured time of the blocks it used.
    """

    def __init__(self, *, chain: Chain, data: BlockData, ids: Sequence[int]) -> None:
        _check_data(chain, data)
        self.chain, self.data = chain, data
        self.ids = validate_deletion(chain, ids)
        blocks = chain.plan.block_of(self.ids)
        self.first_affected = int(blocks.min())
        self.last_affected = int(blocks.max())
        self.excluded = frozenset(chain.deleted_ids | set(self.ids.tolist()))
        self.trainer = BlockTrainer(config=chain.config, data=data, plan=chain.plan)
        self.checkpoints: dict[int, Checkpoint] = {self.first_affected - 1: chain.checkpoints[self.first_affected - 1]}
        self.seconds: dict[int, float] = {}
        self.cpu_seconds: dict[int, float] = {}
        self._iterator = None

    @property
    def last_trained(self) -> int:
        return max(self.checkpoints)

    def advance_to(self, block: int) -> Checkpoint:
        """Retrain up to ``block`` (if not yet) and return M'_block."""
        if block < self.first_affected - 1 or block > self.chain.config.num_blocks:
            raise ConfigError(f"block must be in {self.first_affected - 1}..{self.chain.config.num_blocks}; got {block}.")
        if self._iterator is None and block > self.last_trained:
            self._timings: list[BlockTiming] = []
            self._iterator = self.trainer.run(
                start=self.checkpoints[self.first_affected - 1],
                last_block=self.chain.config.num_blocks,
                excluded_ids=self.excluded,
                timings=self._timings,
            )
        while self.last_trained < block:
            checkpoint = next(self._iterator)
            self.checkpoints[checkpoint.block_index] = checkpoint
            self.seconds[checkpoint.block_index] = self._timings[-1].seconds
            self.cpu_seconds[checkpoint.block_index] = self._timings[-1].cpu_seconds
        return self.checkpoints[block]

    @property
    def total_seconds(self) -> tuple[float, float]:
        """Measured (wall, CPU) time of every block retrained so far."""
        return float(sum(self.seconds.values())), float(sum(self.cpu_seconds.values()))

    def seconds_through(self, block: int) -> tuple[float, float]:
        """Measured (wall, CPU) retraining time of blocks d..block."""
        wall = sum(s for b, s in self.seconds.items() if b <= block)
        cpu = sum(s for b, s in self.cpu_seconds.items() if b <= block)
        return float(wall), float(cpu)


def unlearn(
    chain: Chain,
    ids: Iterable[int],
    *,
    data: BlockData,
    policy: Policy | str = Policy.EXACT,
    options: DeepObliviateOptions | None = None,
    sink: CheckpointSink | None = None,
) -> UnlearningResult:
    """Forget ``ids`` with the chosen policy (``exact`` by default). See the module docstring."""
    policy = Policy(policy)
    if policy is Policy.EXACT:
        if options is not None:
            raise ConfigError("options apply to the deepobliviate policy only; the exact policy takes none.")
        return unlearn_exact(chain, ids, data=data, sink=sink)
    return unlearn_deepobliviate(chain, ids, data=data, options=options or DeepObliviateOptions(), sink=sink)


def unlearn_exact(
    chain: Chain,
    ids: Iterable[int],
    *,
    data: BlockData,
    sink: CheckpointSink | None = None,
    retrainer: ChainRetrainer | None = None,
) -> UnlearningResult:
    """Retrain from M_{d-1} to M_B without ``ids`` (SPEC section 5); equals naive retraining bit for bit.

    Raises:
        DeletionError: a bad request (nothing changes).
        ChainMismatchError: ``data`` is not the chain's data.
    """
    began = (time.perf_counter(), time.process_time())
    retrainer = _retrainer_for(chain, ids, data=data, retrainer=retrainer)
    trained_before = retrainer.total_seconds
    num_blocks = chain.config.num_blocks
    retrainer.advance_to(num_blocks)
    new = [retrainer.checkpoints[b] for b in range(retrainer.first_affected, num_blocks + 1)]
    new_chain = with_replaced(chain, checkpoints=new, deleted_ids=retrainer.excluded)
    record = UnlearningRecord(
        policy=Policy.EXACT.value,
        deleted_ids=tuple(retrainer.ids.tolist()),
        first_affected_block=retrainer.first_affected,
        last_affected_block=retrainer.last_affected,
        blocks_retrained=tuple(range(retrainer.first_affected, num_blocks + 1)),
        stop_reason="exact: retrained every block from the first affected one",
        guardrail=GuardrailResult(attempts=(), outcome="not_needed"),
        heldout_accuracy=new_chain.final.heldout_accuracy,
        **_times(began, retrainer, trained_before=trained_before, last_used=num_blocks),
    )
    _commit(new, sink)
    return UnlearningResult(chain=new_chain, record=record, new_checkpoints=tuple(new))


def _retrainer_for(
    chain: Chain, ids: Iterable[int], *, data: BlockData, retrainer: ChainRetrainer | None
) -> ChainRetrainer:
    if retrainer is None:
        return ChainRetrainer(chain=chain, data=data, ids=list(ids))
    requested = np.unique(np.asarray(list(ids), dtype=np.int64))
    if retrainer.chain is not chain or not np.array_equal(requested, retrainer.ids):
        raise ConfigError("a shared retrainer must have been built for this very chain and these ids.")
    _check_data(chain, data)
    return retrainer


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
    if n < 3:
        raise ConfigError(f"a power-law fit needs at least 3 points; got {n}.")
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
        a=float(a[pick]), h=float(candidates[pick]), b=float(b[pick]), sse=sse_best,
        r2=1.0 - sse_best / total if total > 0 else 1.0, num_points=n,
    )


def stop_rule_statistic(deltas: Sequence[float], fit: PowerLawFit, *, rule: StopRule | str) -> float | None:
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
    retrained: dict[str, torch.Tensor], original_final: dict[str, torch.Tensor], original_at_stop: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """M'_B = M'_j + (M_B − M_j) for every parameter and buffer (SPEC section 5, stitch)."""
    return {k: retrained[k] + (original_final[k] - original_at_stop[k]) for k in retrained}


def unlearn_deepobliviate(
    chain: Chain,
    ids: Iterable[int],
    *,
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
    for block in range(d, num_blocks + 1):
        after = retrainer.advance_to(block)
        before = retrainer.checkpoints[block - 1]
        deltas.append(
            state_difference_l1(
                original[block].model_state, original[block - 1].model_state, after.model_state, before.model_state
            )
        )
        if block < retrainer.last_affected or len(deltas) < options.min_points or block == num_blocks:
            continue
        fit = fit_power_law(deltas, nonnegative_floor=options.nonnegative_floor)
        statistic = stop_rule_statistic(deltas, fit, rule=options.stop_rule)
        if statistic is not None and statistic < options.epsilon:
            stop_block = block
            break

    reference = original[num_blocks].heldout_accuracy
    attempts: list[GuardrailAttempt] = []
    final_state: dict[str, torch.Tensor] | None = None
    last_used = num_blocks
    if stop_block is None:
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
            state = stitch_state(retrained.model_state, original[num_blocks].model_state, original[candidate].model_state)
            accuracy = heldout_accuracy(model_from_state(config, state), data)
            passed = reference is not None and accuracy >= reference - options.guardrail_tolerance - 1e-12
            attempts.append(
                GuardrailAttempt(candidate, accuracy, float(reference or float("nan")), options.guardrail_tolerance, passed)
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
                original[block].model_state,
                original[block - 1].model_state,
                retrainer.checkpoints[block].model_state,
                retrainer.checkpoints[block - 1].model_state,
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
        state = final_state if i == num_blocks else stitch_state(retrained.model_state, original[i].model_state, original[j].model_state)
        out.append(
            Checkpoint(
                block_index=i,
                model_state=state,
                optimizer_state=original[i].optimizer_state,
                schedule_position=i,
                heldout_accuracy=heldout_accuracy(model_from_state(chain.config, state), data) if i == num_blocks else None,
                config_fingerprint=retrained.config_fingerprint,
                data_fingerprint=retrained.data_fingerprint,
                origin="stitched",
                excluded_count=retrained.excluded_count,
            )
        )
    return out


def _times(
    began: tuple[float, float], retrainer: ChainRetrainer, *, trained_before: tuple[float, float], last_used: int
) -> dict[str, float]:
    """Wall time = measured retraining time of the blocks used + this policy's own work.

    The policy's own work (Δ, fits, stitching, guardrail evaluations, validation) is the call's
    elapsed time minus the retraining done during the call. With a private retrainer this is the
    plain wall time of the call; with a shared one, blocks retrained earlier by another policy are
    charged at their measured time.
    """
    elapsed, elapsed_cpu = time.perf_counter() - began[0], time.process_time() - began[1]
    now, now_cpu = retrainer.total_seconds
    overhead = max(elapsed - (now - trained_before[0]), 0.0)
    overhead_cpu = max(elapsed_cpu - (now_cpu - trained_before[1]), 0.0)
    retrain, retrain_cpu = retrainer.seconds_through(last_used)
    return {
        "retrain_seconds": retrain,
        "overhead_seconds": overhead,
        "wall_time_seconds": retrain + overhead,
        "cpu_seconds": retrain_cpu + overhead_cpu,
    }


def _commit(checkpoints: Sequence[Checkpoint], sink: CheckpointSink | None) -> None:
    if sink is not None:
        for checkpoint in checkpoints:
            sink(checkpoint)
