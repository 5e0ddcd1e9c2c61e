"""Batching rules refuse NaN, infinite and negative times instead of computing with them."""

from __future__ import annotations

import math

import pytest

from obliviate.errors import ConfigError
from obliviate.unlearning.batching import BatchPolicy, expected_retrain_seconds, parse_duration


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "1" + "0" * 400])
def test_parse_duration_refuses_non_finite_and_negative(value: object) -> None:
    with pytest.raises(ConfigError, match=r"a duration must be a finite number of seconds"):
        parse_duration(value)  # type: ignore[arg-type]
    assert parse_duration("1h") == 3600.0


@pytest.mark.parametrize("field", ["window_s", "deadline_s", "margin_s"])
def test_batch_policy_refuses_nan(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"{field} must be a finite number of seconds; got nan"):
        BatchPolicy(**{field: math.nan})


@pytest.mark.parametrize("times", [[-5.0, 1.0], [math.nan, 1.0], [math.inf]])
def test_expected_retrain_seconds_refuses_negative_or_non_finite_times(times: list[float]) -> None:
    with pytest.raises(ConfigError, match=r"recorded block times are finite seconds >= 0"):
        expected_retrain_seconds(times)
    assert expected_retrain_seconds([2.0, None, 4.0]) == 9.0
