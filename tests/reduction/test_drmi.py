"""DRMI reduction invariants (issue 2, SPEC section 2)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obliviate.data import load_dataset
from obliviate.errors import ConfigError, DataError
from obliviate.reduction.drmi import (
    DenseRows,
    drmi_reduce,
    greedy_init,
    one_hot_replacement,
    restart_from_rows,
    run_restarts,
    subset_cost,
)
from obliviate.reduction.mi import mi_matrix


class StreamedRows:
    """A row source that is not a DenseRows, so the row-by-row path runs."""

    def __init__(self, matrix: np.ndarray) -> None:
        self._matrix = matrix
        self.rows_read = 0

    @property
    def n(self) -> int:
        return self._matrix.shape[0]

    def row(self, index: int) -> np.ndarray:
        self.rows_read += 1
        return self._matrix[index].copy()

    def diagonal(self) -> np.ndarray:
        return np.diagonal(self._matrix).copy()


def random_symmetric(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.random((n, n)).astype(np.float32), k=1)
    matrix = upper + upper.T
    np.fill_diagonal(matrix, rng.random(n).astype(np.float32) + 1.0)
    return matrix


@pytest.fixture(scope="module")
def mnist_matrix() -> np.ndarray:
    data = load_dataset("mnist5k")
    pick = np.random.default_rng(1).choice(len(data), size=300, replace=False)
    return mi_matrix(data.images[pick])


def test_reported_h_equals_recomputed_h(mnist_matrix) -> None:
    result = drmi_reduce(mnist_matrix, k=30)
    assert len(result.restarts) == 300
    assert result.h == pytest.approx(subset_cost(mnist_matrix, subset=result.subset), rel=1e-9)
    for record in result.restarts[::37]:
        assert record.h == pytest.approx(subset_cost(mnist_matrix, subset=record.subset), rel=1e-9)
    assert result.h == min(r.h for r in result.restarts)


def test_in_out_match_recomputation_after_every_swap() -> None:
    matrix = random_symmetric(60, seed=2)
    start = np.arange(0, 60, 6)  # a deliberately poor subset, so many swaps happen
    _, _, total_swaps, _ = one_hot_replacement(matrix, subset=start)
    assert total_swaps >= 3
    previous_h = subset_cost(matrix, subset=start)
    for swaps in range(1, total_swaps + 1):
        members, h, done, sums = one_hot_replacement(matrix, subset=start, max_swaps=swaps)
        assert done == swaps
        recomputed = matrix[:, members].astype(np.float64).sum(axis=1)
        np.testing.assert_allclose(sums, recomputed, rtol=1e-10, atol=1e-9)
        assert h == pytest.approx(subset_cost(matrix, subset=members), rel=1e-10)
        assert h < previous_h  # every swap strictly lowers H
        previous_h = h


def test_replacement_never_worse_than_greedy(mnist_matrix) -> None:
    for record in run_restarts(mnist_matrix, k=40, starts=np.arange(0, 300, 10)):
        assert record.h <= record.h_greedy + 1e-9
        greedy = greedy_init(mnist_matrix, start=record.start, k=40)
        assert record.h_greedy == pytest.approx(subset_cost(mnist_matrix, subset=greedy), rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_never_below_brute_force_optimum(seed) -> None:
    n, k = 11, 4
    matrix = random_symmetric(n, seed=seed)
    optimum = min(subset_cost(matrix, subset=combo) for combo in itertools.combinations(range(n), k))
    result = drmi_reduce(matrix, k=k)
    assert result.h >= optimum - 1e-9
    assert result.h == pytest.approx(subset_cost(matrix, subset=result.subset), rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=5, max_value=25), seed=st.integers(0, 10_000), data=st.data())
def test_properties_on_random_symmetric_matrices(n, seed, data) -> None:
    k = data.draw(st.integers(min_value=2, max_value=n - 1))
    matrix = random_symmetric(n, seed)
    result = drmi_reduce(matrix, k=k, aggregate=data.draw(st.sampled_from(["sum", "max"])))
    assert result.subset.shape == (k,)
    assert np.unique(result.subset).shape == (k,)
    assert result.h == pytest.approx(subset_cost(matrix, subset=result.subset), rel=1e-9, abs=1e-9)
    for record in result.restarts:
        assert record.h <= record.h_greedy + 1e-9


def test_dense_and_streamed_paths_agree_bit_for_bit(mnist_matrix) -> None:
    starts = [3, 77, 150]
    for aggregate in ("sum", "max"):
        dense = run_restarts(mnist_matrix, k=25, starts=starts, aggregate=aggregate)
        streamed = StreamedRows(mnist_matrix)
        for record in dense:
            other = restart_from_rows(streamed, start=record.start, k=25, aggregate=aggregate)
            assert np.array_equal(other.subset, record.subset)
            assert other.h == record.h
            assert other.h_greedy == record.h_greedy
    assert streamed.rows_read > 0


def test_seeded_starts_are_reproducible(mnist_matrix) -> None:
    a = drmi_reduce(mnist_matrix, k=20, num_starts=15, rng=np.random.default_rng(9))
    b = drmi_reduce(mnist_matrix, k=20, num_starts=15, rng=np.random.default_rng(9))
    assert [r.start for r in a.restarts] == [r.start for r in b.restarts]
    assert len(a.restarts) == 15 and np.array_equal(a.subset, b.subset)
    full = drmi_reduce(mnist_matrix, k=20)
    assert full.h <= a.h


def test_greedy_sum_scores_are_h_growth() -> None:
    matrix = random_symmetric(30, seed=4)
    members = greedy_init(matrix, start=5, k=8)
    assert members[0] == 5
    for step in range(1, 8):
        chosen, candidate = members[:step], members[step]
        growth = matrix[candidate, chosen].astype(np.float64).sum()
        outside = [x for x in range(30) if x not in chosen]
        best = min(matrix[x, chosen].astype(np.float64).sum() for x in outside)
        assert growth == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m: drmi_reduce(m, k=1),
            "k must satisfy 2 <= k < n=10; got k=1. A subset has at least 2 images: raise k",
        ),
        (lambda m: drmi_reduce(m, k=10), "got k=10. Choose a smaller subset or a larger pool"),
        (lambda m: drmi_reduce(m[:, :5], k=3), "must be square"),
        (lambda m: drmi_reduce(m, k=3, num_starts=11, rng=np.random.default_rng(0)), "num_starts must be in 1..n=10"),
        (lambda m: drmi_reduce(m, k=3, num_starts=2), "explicit rng"),
        (lambda m: drmi_reduce(m, k=3, starts=[12]), "start vertices must be in 0..9"),
        (lambda m: one_hot_replacement(m, subset=[1, 1, 2]), "distinct"),
    ],
)
def test_misuse_errors_state_the_rule(call, message) -> None:
    with pytest.raises(ConfigError, match=message):
        call(random_symmetric(10, seed=0))


def test_dense_rows_source_is_accepted_directly() -> None:
    matrix = random_symmetric(12, seed=3)
    assert drmi_reduce(DenseRows(matrix), k=4).h == drmi_reduce(matrix, k=4).h


def test_a_matrix_with_nan_or_asymmetry_is_refused_with_the_entry() -> None:
    matrix = random_symmetric(10, seed=1)
    with_nan = matrix.copy()
    with_nan[3, 7] = with_nan[7, 3] = np.nan  # gave a subset with index -1 before
    with pytest.raises(DataError, match=r"must hold finite numbers; entry \(3, 7\) is nan"):
        drmi_reduce(with_nan, k=3)
    lopsided = matrix.copy()
    lopsided[2, 5] += 0.5  # gave an H that depends on which triangle a pair is read from
    with pytest.raises(DataError, match=r"must be symmetric .*entry \(2, 5\)"):
        drmi_reduce(lopsided, k=3)
    tiny = matrix.copy()
    tiny[2, 5] += 1e-7  # rounding of a matrix built elsewhere is accepted
    assert drmi_reduce(tiny, k=3).subset.min() >= 0


@pytest.mark.parametrize("streamed", [False, True])
def test_restart_progress_is_reported_without_changing_the_result(streamed) -> None:
    """drmi_reduce ran thousands of restarts with no way to show how far it was."""
    matrix = random_symmetric(120, seed=3)
    source = StreamedRows(matrix) if streamed else matrix
    seen: list[tuple[int, int]] = []
    result = drmi_reduce(source, k=10, on_restarts=lambda done, total: seen.append((done, total)))
    plain = drmi_reduce(matrix, k=10)
    assert result.h == plain.h and np.array_equal(result.subset, plain.subset)
    assert [r.h for r in result.restarts] == [r.h for r in plain.restarts]
    assert seen[-1] == (120, 120) and len(seen) > 1
    assert all(total == 120 for _, total in seen) and [d for d, _ in seen] == sorted({d for d, _ in seen})
