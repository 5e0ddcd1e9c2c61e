"""Partitioned DRMI reduction: the path past one exact MI matrix (SPEC section 2, switch).

Split the pool into ``m`` seeded random parts, reduce each part to its proportional share of an
oversampled budget (``ceil(oversample * k * n_i / n)``), then reduce the union of the part
subsets to ``k``. Only ``m`` matrices of about ``(n/m)^2`` entries and one of about
``(oversample * k)^2`` entries are ever built, so the cost falls from ``n^2 / 2`` pairs to about
``n^2 / (2m)`` and every part fits a worker. The returned H is exact: it is computed on the
union's matrix, which holds every pair of the final subset.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass

import numpy as np

from obliviate.checks import is_whole
from obliviate.errors import ConfigError
from obliviate.reduction.drmi import ReductionResult, check_subset_size, drmi_reduce
from obliviate.reduction.mi import check_bins, check_images, mi_matrix


@dataclass(frozen=True)
class PartitionedResult:
    """Outcome of a partitioned reduction.

    Attributes:
        subset: the k chosen pool indices, ascending.
        h: exact ``H(subset)`` on the pool's MI.
        parts: pool indices of each part.
        part_subsets: pool indices each part contributed to the union.
        union: the union the final reduction ran on.
        pairs_computed: MI pairs evaluated in all (parts and union).
        seconds: wall time.
    """

    subset: np.ndarray
    h: float
    parts: list[np.ndarray]
    part_subsets: list[np.ndarray]
    union: np.ndarray
    pairs_computed: int
    seconds: float


def partition_budgets(part_sizes: list[int], *, k: int, oversample: float) -> list[int]:
    """Each part's share of ``oversample * k``, in proportion to its size, at least 2 and below its size.

    Part ``i`` of ``n_i`` images gets ``min(n_i - 1, max(2, ceil(oversample * k * n_i / n)))`` (SPEC section 2,
    partitioned reduction).

    Args:
        part_sizes: images in each part, each a whole number >= 3 (a budget of 2 below its size).
        k: the final subset size, ``2 <= k < sum(part_sizes)``.
        oversample: how many times ``k`` the union should hold, a finite number > 1.

    Returns:
        one budget per part, in the order of ``part_sizes``.

    Raises:
        ConfigError: a part size, ``k`` or ``oversample`` breaks its rule.
    """
    for size in part_sizes:
        if not is_whole(size) or size < 3:
            raise ConfigError(
                f"every part must hold a whole number >= 3 of images (a budget of at least 2 below its size); "
                f"got part sizes {list(part_sizes)}. Use fewer parts."
            )
    n = sum(part_sizes)
    check_subset_size(k, n=n)
    _check_oversample(oversample)
    return [min(size - 1, max(2, math.ceil(oversample * k * size / n))) for size in part_sizes]


def partitioned_reduce(
    images: np.ndarray,
    *,
    k: int,
    parts: int,
    rng: np.random.Generator,
    oversample: float = 2.0,
    levels: int = 256,
    bins: int = 256,
    normalize: bool = False,
    num_starts: int | None = None,
) -> PartitionedResult:
    """Reduce ``images`` to ``k`` by reducing ``parts`` random parts, then their union.

    Args:
        images: ``(n, H, W)`` uint8 pool.
        k: final subset size.
        parts: number of parts ``m >= 1`` (1 is exact reduction on one matrix).
        rng: draws the partition and, with ``num_starts``, the start vertices.
        oversample: the union holds about ``oversample * k`` candidates; must be > 1.
        levels: gray levels of the source.
        bins: code levels for MI.
        normalize: normalised MI.
        num_starts: seeded starts per reduction (``None``: every vertex, SPEC default).

    Raises:
        ConfigError: ``parts``, ``oversample``, ``k``, ``levels`` or ``bins`` breaks its rule, or the
            union of the part subsets is not larger than ``k``.
        DataError: the images are not uint8, are empty, or hold a gray level ``>= levels``.
    """
    check_bins(levels=levels, bins=bins)
    check_images(images, levels=levels)
    n = images.shape[0]
    if not is_whole(parts) or parts < 1 or n // parts <= 2:
        raise ConfigError(f"parts must be >= 1 and leave more than 2 images per part; got parts={parts} for n={n}.")
    _check_oversample(oversample)
    check_subset_size(k, n=n)
    t0 = time.perf_counter()
    split = np.array_split(rng.permutation(n), parts)
    budgets = partition_budgets([len(p) for p in split], k=k, oversample=oversample)
    pairs = 0
    part_subsets = []
    for part, budget in zip(split, budgets):
        matrix = mi_matrix(images[part], levels=levels, bins=bins, normalize=normalize)
        pairs += len(part) * (len(part) - 1) // 2
        part_subsets.append(np.sort(part[_reduce(matrix, budget, num_starts, rng).subset]))
    union = np.sort(np.concatenate(part_subsets))
    if len(union) <= k:
        raise ConfigError(f"the union of part subsets has {len(union)} images, not more than k={k}; raise oversample.")
    union_matrix = mi_matrix(images[union], levels=levels, bins=bins, normalize=normalize)
    pairs += len(union) * (len(union) - 1) // 2
    final = _reduce(union_matrix, k, num_starts, rng)
    return PartitionedResult(
        subset=np.sort(union[final.subset]),
        h=final.h,
        parts=split,
        part_subsets=part_subsets,
        union=union,
        pairs_computed=pairs,
        seconds=time.perf_counter() - t0,
    )


def _check_oversample(oversample: float) -> None:
    """Raise :class:`ConfigError` unless ``oversample`` is a finite number > 1 (NaN failed late, in ``ceil``)."""
    if isinstance(oversample, bool) or not isinstance(oversample, numbers.Real) or not 1.0 < oversample < math.inf:
        raise ConfigError(
            f"oversample must be > 1 and finite so the union has something to reduce; got {oversample!r}. "
            "The default is 2.0."
        )


def _reduce(matrix: np.ndarray, k: int, num_starts: int | None, rng: np.random.Generator) -> ReductionResult:
    starts = None if num_starts is None else min(num_starts, matrix.shape[0])
    return drmi_reduce(matrix, k=k, num_starts=starts, rng=rng)
