"""Partitioned reduction (SPEC section 2 switch; issue 7)."""

from __future__ import annotations

import numpy as np
import pytest

from obliviate.data import load_dataset
from obliviate.errors import ConfigError
from obliviate.reduction.drmi import drmi_reduce, subset_cost
from obliviate.reduction.mi import mi_matrix
from obliviate.reduction.partitioned import partition_budgets, partitioned_reduce


@pytest.fixture(scope="module")
def pool() -> np.ndarray:
    data = load_dataset("mnist5k")
    return data.images[np.random.default_rng(2).choice(len(data), size=400, replace=False)]


def test_partitioned_returns_k_distinct_indices_and_exact_h(pool) -> None:
    result = partitioned_reduce(pool, k=40, parts=4, rng=np.random.default_rng(0))
    assert result.subset.shape == (40,) and np.unique(result.subset).shape == (40,)
    assert set(result.subset) <= set(result.union)
    matrix = mi_matrix(pool)
    assert result.h == pytest.approx(subset_cost(matrix, subset=result.subset), rel=1e-6)
    exact = drmi_reduce(matrix, k=40)
    gap = result.h / exact.h
    assert gap >= 1.0 - 1e-9  # exact reduction over all starts is the reference
    assert result.pairs_computed < 400 * 399 // 2


def test_one_part_is_exact_reduction_on_one_matrix(pool) -> None:
    result = partitioned_reduce(pool[:120], k=10, parts=1, rng=np.random.default_rng(0), oversample=3.0)
    assert len(result.parts) == 1


def test_budgets_are_proportional_and_bounded() -> None:
    assert partition_budgets([100, 100, 200], k=40, oversample=2.0) == [20, 20, 40]
    assert partition_budgets([3, 97], k=50, oversample=2.0) == [2, 97 - 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"parts": 0}, "parts must be >= 1"),
        ({"parts": 200}, "more than 2 images per part"),
        ({"parts": 2, "oversample": 1.0}, "oversample must be > 1"),
        ({"parts": 2, "k": 400}, "k must satisfy"),
    ],
)
def test_bad_partition_arguments(pool, kwargs, message) -> None:
    args = {"k": 10, "rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(ConfigError, match=message):
        partitioned_reduce(pool, **args)
