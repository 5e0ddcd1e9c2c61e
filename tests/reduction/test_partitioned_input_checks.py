"""Partition budgets, partitioned reduction and plan reports refuse arguments that break their rules."""

from __future__ import annotations

import numpy as np
import pytest

from obliviate.errors import ConfigError, DataError
from obliviate.reduction.partitioned import partition_budgets, partitioned_reduce
from obliviate.reduction.tiling import plan_report


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"part_sizes": [0, 10], "k": 4, "oversample": 2.0}, "every part must hold a whole number >= 3"),  # [-1, 4]
        ({"part_sizes": [10, 10], "k": 30, "oversample": 2.0}, "k must satisfy 2 <= k < n=20; got k=30"),
        ({"part_sizes": [10, 10], "k": 4, "oversample": -1.0}, "oversample must be > 1 and finite"),
        ({"part_sizes": [10, 10], "k": 4, "oversample": 1.0}, "oversample must be > 1 and finite"),
        ({"part_sizes": [10, 10], "k": 4, "oversample": float("nan")}, "oversample must be > 1 and finite"),
    ],
)
def test_partition_budgets_refuses_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        partition_budgets(**kwargs)


@pytest.mark.parametrize("oversample", [float("nan"), float("inf"), "2"])
def test_partitioned_reduce_refuses_an_oversample_that_is_not_a_finite_number(oversample) -> None:
    images = np.zeros((12, 4, 4), np.uint8)  # NaN raised 'cannot convert float NaN to integer' from ceil
    with pytest.raises(ConfigError, match="oversample must be > 1 and finite"):
        partitioned_reduce(images, k=3, parts=2, rng=np.random.default_rng(0), oversample=oversample)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 200}, "k must satisfy 2 <= k < n=100; got k=200"),
        ({"workers": -1}, "workers must be a whole number >= 1; got -1"),
        ({"workers": 0}, "workers must be a whole number >= 1; got 0"),
        ({"tile_size": 32.5}, "tile_size must be a whole number >= 1; got 32.5"),
        ({"n": 100.0}, "a tile plan needs a whole number of images; got n=100.0"),
        ({"nonzero_share": 1.5}, "nonzero_share must be a share in 0..1"),
        ({"pairs_per_second": -3.0}, "pairs_per_second must be a positive finite throughput"),
    ],
)
def test_plan_report_refuses_bad_sizes(kwargs, message) -> None:
    args = {"n": 100, "tile_size": 32, "k": 10, "workers": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        plan_report(**args)


def test_plan_report_of_valid_sizes_is_unchanged() -> None:
    report = plan_report(n=np.int64(100), tile_size=32, k=10, workers=2, pairs_per_second=1e6)
    assert report["tiles"] == 10 and report["tiles_per_worker"] == 5


def test_partitioned_reduce_checks_the_pool_levels_once_at_its_entrance() -> None:
    images = np.zeros((12, 4, 4), np.uint8)
    images[-1, 0, 0] = 200
    with pytest.raises(DataError, match="gray levels must be below levels=16; found 200"):
        partitioned_reduce(images, k=3, parts=2, rng=np.random.default_rng(0), levels=16)
