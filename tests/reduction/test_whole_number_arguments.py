"""Sizes, counts and levels of the reduction must be whole numbers: a clear ConfigError, not a deep TypeError."""

from __future__ import annotations

import numpy as np
import pytest

from obliviate.errors import ConfigError
from obliviate.reduction.drmi import choose_starts, drmi_reduce, greedy_init
from obliviate.reduction.mi import mutual_information
from obliviate.reduction.partitioned import partitioned_reduce


def _symmetric(n: int = 10, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).random((n, n)).astype(np.float32)
    m = (a + a.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def _pair() -> tuple[np.ndarray, np.ndarray]:
    imgs = np.random.default_rng(0).integers(0, 256, size=(2, 8, 8), dtype=np.uint8)
    return imgs[0], imgs[1]


@pytest.mark.parametrize("k", [2.5, True, "3"])
def test_k_must_be_a_whole_number(k) -> None:
    with pytest.raises(ConfigError, match=r"k must be a whole number with 2 <= k < n=10; got"):
        drmi_reduce(_symmetric(), k=k)  # 2.5 raised a TypeError from np.empty
    images = np.random.default_rng(0).integers(0, 256, size=(12, 4, 4), dtype=np.uint8)
    with pytest.raises(ConfigError, match=r"k must be a whole number with 2 <= k < n=12; got"):
        partitioned_reduce(images, k=k, parts=2, rng=np.random.default_rng(0))


def test_numpy_integer_k_gives_the_same_subset() -> None:
    m = _symmetric()
    assert drmi_reduce(m, k=np.int64(3)).h == drmi_reduce(m, k=3).h


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bins": 2.5}, r"bins must be a whole number in 2..256; got 2.5 \(float\)"),  # numba TypingError before
        ({"bins": True}, r"bins must be a whole number in 2..256; got True \(bool\)"),
        ({"levels": "256"}, r"levels must be a whole number in 2..256 .*got '256' \(str\)"),  # "'<=' not supported"
        ({"levels": 16.0}, r"levels must be a whole number in 2..256 .*got 16.0 \(float\)"),
    ],
)
def test_levels_and_bins_must_be_whole_numbers(kwargs, message) -> None:
    u, v = _pair()
    with pytest.raises(ConfigError, match=message):
        mutual_information(u=u, v=v, **kwargs)


def test_numpy_integer_levels_and_bins_are_accepted() -> None:
    u, v = _pair()
    assert mutual_information(u=u, v=v, levels=np.int64(256), bins=np.uint16(32)) == mutual_information(
        u=u, v=v, bins=32
    )


def test_a_matrix_given_as_nested_lists_is_accepted() -> None:
    m = _symmetric()
    result = drmi_reduce(m.tolist(), k=3)  # raised AttributeError: 'list' object has no attribute 'n'
    assert result.h == drmi_reduce(m, k=3).h


def test_a_matrix_that_is_not_numbers_is_refused() -> None:
    with pytest.raises(ConfigError, match="the MI matrix must be an \\(n, n\\) array of numbers or a RowSource"):
        drmi_reduce([["a", "b"], ["c", "d"]], k=2)


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_choose_starts_refuses_an_empty_or_fractional_pool(n) -> None:
    with pytest.raises(ConfigError, match=r"n \(the pool size\) must be a whole number >= 1"):
        choose_starts(n, num_starts=None, rng=None)  # returned an empty array


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m: choose_starts(10, num_starts=2.5, rng=np.random.default_rng(0)),
            r"num_starts must be in 1..n=10 \(a whole number\); got 2.5",
        ),
        (lambda m: drmi_reduce(m, k=3, starts=np.array([True, False])), "starts must be integer indices"),
        (lambda m: greedy_init(m, start=1.5, k=3), "start vertex must be a whole number in 0..9; got 1.5"),
    ],
)
def test_start_vertices_must_be_whole_numbers(call, message) -> None:
    with pytest.raises(ConfigError, match=message):
        call(_symmetric())
