"""DRMI's lower-level entry points make the same checks as drmi_reduce (SPEC section 2)."""

from __future__ import annotations

import numpy as np
import pytest

from obliviate.errors import ConfigError, DataError
from obliviate.reduction.drmi import greedy_init, one_hot_replacement, run_restarts, subset_cost


def _symmetric(n: int = 10, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).random((n, n)).astype(np.float32)
    m = (a + a.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def _with_nan() -> np.ndarray:
    m = _symmetric()
    m[3, 7] = m[7, 3] = np.nan
    return m


@pytest.mark.parametrize(
    "call",
    [
        lambda m: run_restarts(m, k=3, starts=[0, 1]),  # returned H = nan
        lambda m: one_hot_replacement(m, subset=[0, 1, 2]),  # returned H = nan
        lambda m: greedy_init(m, start=0, k=3),
    ],
)
def test_a_matrix_with_nan_is_refused_by_every_entry_point(call) -> None:
    with pytest.raises(DataError, match=r"must hold finite numbers; entry \(3, 7\) is nan"):
        call(_with_nan())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: subset_cost(m, subset=[0, 30]), r"subset must hold indices in 0..9 .*got 0..30"),  # IndexError
        (lambda m: one_hot_replacement(m, subset=[0, 40]), r"subset must hold indices in 0..9 .*got 0..40"),
        (lambda m: subset_cost(m, subset=[-1, 2]), r"subset must hold indices in 0..9 .*got -1..2"),  # wrapped to 9
        (lambda m: one_hot_replacement(m, subset=[-1, 2, 3]), r"subset must hold indices in 0..9"),
        (lambda m: subset_cost(m, subset=[1, 1, 2]), "subset must hold distinct indices; got 1 repeats"),
        (lambda m: subset_cost(m, subset=[0.5, 2]), "subset must be integer indices; got an array of dtype float64"),
        (lambda m: subset_cost(m[:, :5], subset=[0, 1]), "must be square"),
        (lambda m: one_hot_replacement(m, subset=[0, 1, 2], max_swaps=-5), "max_swaps must be a whole number >= 0"),
        (lambda m: one_hot_replacement(m, subset=[0, 1, 2], max_swaps=1.5), "max_swaps must be a whole number >= 0"),
    ],
)
def test_subset_indices_and_max_swaps_are_checked(call, message) -> None:
    with pytest.raises(ConfigError, match=message):
        call(_symmetric())


def test_valid_subsets_give_the_same_answers() -> None:
    m = _symmetric()
    assert subset_cost(m, subset=np.array([0, 3, 5], dtype=np.int32)) == subset_cost(m, subset=[0, 3, 5])
    members, h, swaps, _ = one_hot_replacement(m, subset=[0, 1, 2], max_swaps=0)
    assert swaps == 0 and list(members) == [0, 1, 2] and h == pytest.approx(subset_cost(m, subset=[0, 1, 2]))


def test_run_restarts_refuses_infinity_and_keeps_results_of_finite_matrices() -> None:
    m = _symmetric()
    expected = [(r.start, r.h) for r in run_restarts(m, k=3, starts=[0, 4])]
    assert [(r.start, r.h) for r in run_restarts(m.tolist(), k=3, starts=[0, 4])] == expected
    m[2, 5] = m[5, 2] = np.inf
    with pytest.raises(DataError, match=r"entry \(2, 5\) is inf"):
        run_restarts(m, k=3, starts=[0, 4])
