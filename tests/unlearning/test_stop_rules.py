"""DeepObliviate's fit and stop rules on synthetic residual-memory series (SPEC section 5)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obliviate.errors import ConfigError
from obliviate.unlearning.deepobliviate import StopRule, fit_power_law, stop_rule_statistic

RULES = list(StopRule)


def _first_stop(series, *, rule, epsilon, min_points=5, nonnegative_floor=True):
    for tau in range(min_points, len(series) + 1):
        prefix = series[:tau]
        statistic = stop_rule_statistic(
            prefix, fit=fit_power_law(prefix, nonnegative_floor=nonnegative_floor), rule=rule
        )
        if statistic is not None and statistic < epsilon:
            return tau
    return None


def test_fit_recovers_an_exact_power_law() -> None:
    t = np.arange(1, 31)
    fit = fit_power_law(3.0 * t**-1.5 + 0.2)
    assert fit.a == pytest.approx(3.0, rel=1e-3)
    assert fit.h == pytest.approx(1.5, rel=1e-3)
    assert fit.b == pytest.approx(0.2, abs=1e-3)
    assert fit.r2 > 0.999999


def test_free_floor_can_go_negative_but_default_floor_cannot() -> None:
    linear_decay = [0.112, 0.089, 0.047, 0.025, 0.016, 0.013, 0.009, 0.006]
    assert fit_power_law(linear_decay, nonnegative_floor=False).b < 0
    assert fit_power_law(linear_decay).b == 0.0


def test_fit_needs_three_points() -> None:
    with pytest.raises(ConfigError, match="at least 3 points; got 2"):
        fit_power_law([1.0, 0.5])


@pytest.mark.parametrize("rule, epsilon", [("residual_ratio", 0.05), ("ratio", 0.05), ("slope", 0.05)])
def test_decaying_series_stops(rule: str, epsilon: float) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(1, 61)
    series = 10.0 * t**-1.2 + 0.3 + rng.normal(0, 0.01, t.size)
    tau = _first_stop(series, rule=rule, epsilon=epsilon)
    assert tau is not None and 5 <= tau < 60


def test_residual_ratio_stops_where_the_excess_over_the_floor_is_small() -> None:
    t = np.arange(1, 41)
    series = 10.0 * t**-1.0 + 1.0  # excess over b = 10/t, so (Δ_τ − b)/(Δ_1 − b) = 1/τ
    assert _first_stop(series, rule="residual_ratio", epsilon=0.05) == 21
    assert _first_stop(series, rule="residual_ratio", epsilon=0.1) == 11
    # Δ_τ/Δ_1 never goes below (0+1)/11 here: the plain ratio rule waits for ever.
    assert _first_stop(series, rule="ratio", epsilon=0.05) is None


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "series",
    [
        np.linspace(1.0, 8.0, 40),  # the spec's constant-rate observation: Δ grows 2-8x
        np.exp(np.linspace(0, 3, 40)),
        2.0 - 1.0 / np.arange(1, 41),  # growth that saturates (fits a < 0)
        np.full(40, 3.0),  # flat
    ],
    ids=["linear-growth", "exponential-growth", "saturating-growth", "flat"],
)
def test_non_decaying_series_never_stop(rule: StopRule, series: np.ndarray) -> None:
    for eps in (0.05, 0.5, 1e12):
        assert _first_stop(series, rule=rule, epsilon=eps) is None
        assert _first_stop(series, rule=rule, epsilon=eps, nonnegative_floor=False) is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=50.0, allow_nan=False), min_size=5, max_size=30),
    st.sampled_from(RULES),
)
def test_a_non_decreasing_series_never_stops(increments: list[float], rule: StopRule) -> None:
    series = np.cumsum(np.asarray(increments) + 1e-3)
    assert _first_stop(series, rule=rule, epsilon=1e12) is None
