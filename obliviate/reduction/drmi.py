"""DRMI dataset reduction (SPEC section 2).

Choose ``S``, ``|S| = k``, minimising ``H(S) = sum over unordered pairs {u, v} in S of I[u][v]``:

* greedy initialisation from a start vertex (seed Algorithm 2),
* one-hot replacement with incremental In/Out (seed Algorithm 3),
* restarts over every start vertex or ``T`` seeded ones, keeping the lowest H (seed Algorithm 1).

Two equivalent back-ends share one arithmetic: a dense path that runs whole restarts inside
numba on an in-memory matrix (parallel over start vertices), and a row-source path that asks a
:class:`RowSource` for one matrix row at a time, for matrices streamed from storage. Both
accumulate float32 rows into float64 sums in the same order and break ties by the lowest
index, so they return the same subset and the same H bit for bit.

In/Out are kept as one float64 array ``A[x] = sum_{j in S} I[x][j]``: ``Out[x] = A[x]`` for
non-members and ``In[x] = A[x] - I[x][x]`` for members. A swap of member ``p`` for
``q`` adds ``I[q] - I[p]`` to ``A`` (seed lines 13-16), an O(n) update, never a recomputation.

Why one module past 400 lines: the dense and row-source back-ends must stay bit-identical
(tested), so their shared arithmetic and tie-break are kept side by side where a change to one
is seen next to the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numba
import numpy as np

from obliviate.checks import index_array, is_whole, whole_number
from obliviate.errors import ConfigError, DataError


class Aggregate(str, Enum):
    """How greedy initialisation folds a new member's row into the score ``f`` (SPEC section 2)."""

    SUM = "sum"
    MAX = "max"


class RowSource(Protocol):
    """Anything that can hand out rows of a symmetric MI matrix."""

    @property
    def n(self) -> int: ...

    def row(self, index: int) -> np.ndarray:
        """Row ``index`` as a float32 array of length n."""
        ...

    def diagonal(self) -> np.ndarray:
        """``I[x][x]`` for every x, float32 of length n."""
        ...


@dataclass(frozen=True)
class DenseRows:
    """A :class:`RowSource` over an in-memory ``(n, n)`` float32 matrix."""

    matrix: np.ndarray

    @property
    def n(self) -> int:
        return int(self.matrix.shape[0])

    def row(self, index: int) -> np.ndarray:
        return self.matrix[index]

    def diagonal(self) -> np.ndarray:
        return np.ascontiguousarray(np.diagonal(self.matrix))


@dataclass(frozen=True)
class RestartRecord:
    """One restart: where it started and what greedy and replacement achieved."""

    start: int
    h_greedy: float
    h: float
    swaps: int
    subset: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class ReductionResult:
    """The best subset over all restarts.

    Attributes:
        subset: the k chosen indices, ascending.
        h: ``H(subset)``.
        restarts: one record per restart, in the order of ``starts``.
        seconds: wall time of all restarts.
    """

    subset: np.ndarray
    h: float
    restarts: list[RestartRecord]
    seconds: float

    @property
    def best_start(self) -> int:
        return min(self.restarts, key=lambda r: (r.h, r.start)).start


def subset_cost(matrix: np.ndarray, *, subset: Sequence[int] | np.ndarray) -> float:
    """``H(S)``, recomputed from scratch: the sum of ``I[u][v]`` over unordered pairs of S (SPEC section 2).

    The reference the incremental H of :func:`one_hot_replacement` and :func:`drmi_reduce` is tested against.

    Args:
        matrix: a square ``(n, n)`` MI matrix.
        subset: distinct indices in ``0..n-1``.

    Returns:
        ``H(S)`` as a float (0.0 for fewer than two members).

    Raises:
        ConfigError: ``matrix`` is not square, or ``subset`` holds non-integers, repeats or indices
            outside ``0..n-1``.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ConfigError(f"the MI matrix must be square (n, n); got shape {matrix.shape}.")
    idx = _check_members(subset, matrix.shape[0])
    block = np.asarray(matrix, dtype=np.float64)[np.ix_(idx, idx)]
    return float((block.sum() - np.trace(block)) / 2.0)


def choose_starts(n: int, *, num_starts: int | None, rng: np.random.Generator | None) -> np.ndarray:
    """Start vertices of the restarts (seed Algorithm 1, SPEC section 2).

    Args:
        n: pool size, a whole number >= 1.
        num_starts: ``None`` for every vertex ``0..n-1`` (SPEC default), else this many distinct
            ones, a whole number in ``1..n``.
        rng: draws the ``num_starts`` vertices; required with ``num_starts``.

    Returns:
        the start vertices as an ascending int64 array.

    Raises:
        ConfigError: ``n`` or ``num_starts`` is not a whole number in its range, or ``num_starts``
            comes without an ``rng``.
    """
    whole_number(n, name="n (the pool size)", minimum=1)
    if num_starts is None:
        return np.arange(n, dtype=np.int64)
    if not is_whole(num_starts) or not 1 <= num_starts <= n:
        raise ConfigError(
            f"num_starts must be in 1..n={n} (a whole number); got {num_starts!r}. Leave it unset for all n."
        )
    if rng is None:
        raise ConfigError("num_starts needs an explicit rng (np.random.default_rng(seed)) to draw starts.")
    return np.sort(rng.choice(n, size=num_starts, replace=False)).astype(np.int64)


def drmi_reduce(
    matrix: np.ndarray | RowSource,
    *,
    k: int,
    starts: Sequence[int] | np.ndarray | None = None,
    num_starts: int | None = None,
    rng: np.random.Generator | None = None,
    aggregate: Aggregate | str = Aggregate.SUM,
    on_restarts: Callable[[int, int], None] | None = None,
) -> ReductionResult:
    """Reduce a pool to the k least mutually informative items (seed Algorithms 1-3).

    Args:
        matrix: a symmetric ``(n, n)`` float32 MI matrix (nested lists are converted), or a
            :class:`RowSource`.
        k: subset size, a whole number with ``2 <= k < n``.
        starts: explicit start vertices; overrides ``num_starts``.
        num_starts: ``None`` for one restart per vertex (SPEC default), else this many seeded starts.
        rng: draws the starts when ``num_starts`` is given.
        aggregate: greedy's ``g``: ``"sum"`` (default) or ``"max"``.
        on_restarts: called as ``on_restarts(done, total)`` as restarts finish, for progress
            display; the result is the same with or without it.

    Returns:
        the subset with the lowest H over all restarts (ties: the lowest start vertex).

    Raises:
        ConfigError: ``k``, ``starts`` or ``num_starts`` breaks its rule, or the matrix is not square.
        DataError: a dense matrix holds a non-finite entry or is not symmetric.
    """
    source = _checked_source(matrix)
    check_subset_size(k, n=source.n)
    start_vertices = (
        _check_starts(starts, source.n)
        if starts is not None
        else choose_starts(source.n, num_starts=num_starts, rng=rng)
    )
    t0 = time.perf_counter()
    records = _run_restarts(source, k=k, starts=start_vertices, aggregate=aggregate, on_restarts=on_restarts)
    best = min(records, key=lambda r: (r.h, r.start))
    return ReductionResult(subset=np.sort(best.subset), h=best.h, restarts=records, seconds=time.perf_counter() - t0)


def run_restarts(
    matrix: np.ndarray | RowSource,
    *,
    k: int,
    starts: Sequence[int] | np.ndarray,
    aggregate: Aggregate | str = Aggregate.SUM,
    on_restarts: Callable[[int, int], None] | None = None,
) -> list[RestartRecord]:
    """Greedy + replacement from each start vertex (seed Algorithms 1-3, SPEC section 2).

    Dense matrices run in parallel threads; a row source runs one restart after another.

    Args:
        matrix: a symmetric ``(n, n)`` MI matrix with finite entries (nested lists are converted),
            or a :class:`RowSource`.
        k: subset size, ``2 <= k < n``.
        starts: the start vertices, one restart each, in ``0..n-1``.
        aggregate: greedy's ``g``: ``"sum"`` (default) or ``"max"``.
        on_restarts: called as ``on_restarts(done, total)`` as restarts finish: after each restart
            on the row-source path, after each chunk of about 1 % of them on the dense one.

    Returns:
        one :class:`RestartRecord` per start vertex, in the order of ``starts``.

    Raises:
        ConfigError: ``k`` or a start vertex breaks its rule, or the matrix is not square.
        DataError: a dense matrix holds a non-finite entry (symmetry is checked by
            :func:`drmi_reduce`, not per call here).
    """
    source = _checked_source(matrix, symmetry=False)
    check_subset_size(k, n=source.n)
    return _run_restarts(
        source, k=k, starts=_check_starts(starts, source.n), aggregate=aggregate, on_restarts=on_restarts
    )


def _run_restarts(
    source: RowSource,
    *,
    k: int,
    starts: np.ndarray,
    aggregate: Aggregate | str,
    on_restarts: Callable[[int, int], None] | None,
) -> list[RestartRecord]:
    """:func:`run_restarts` on a source and starts already checked."""
    aggregate = Aggregate(aggregate)
    start_vertices = starts
    if isinstance(source, DenseRows):
        dense = np.ascontiguousarray(source.matrix, dtype=np.float32)
        subsets = np.empty((start_vertices.shape[0], k), dtype=np.int64)
        h_greedy = np.empty(start_vertices.shape[0], dtype=np.float64)
        h = np.empty(start_vertices.shape[0], dtype=np.float64)
        swaps = np.empty(start_vertices.shape[0], dtype=np.int64)
        total = int(start_vertices.shape[0])
        # One parallel call cannot report from inside; with a listener, run chunks of about 1 % of the
        # restarts, each still wide enough (4 per thread) to keep every thread busy.
        chunk = total if on_restarts is None else max(4 * numba.get_num_threads(), -(-total // 100))
        for lo in range(0, total, chunk):
            hi = min(lo + chunk, total)
            _dense_restarts(
                dense,
                start_vertices[lo:hi],
                k,
                aggregate is Aggregate.MAX,
                subsets[lo:hi],
                h_greedy[lo:hi],
                h[lo:hi],
                swaps[lo:hi],
            )
            if on_restarts is not None:
                on_restarts(hi, total)
        return [
            RestartRecord(int(s), float(hg), float(hh), int(sw), sub)
            for s, hg, hh, sw, sub in zip(start_vertices, h_greedy, h, swaps, subsets)
        ]
    records = []
    for done, s in enumerate(start_vertices, start=1):
        records.append(restart_from_rows(source, start=int(s), k=k, aggregate=aggregate))
        if on_restarts is not None:
            on_restarts(done, len(start_vertices))
    return records


def greedy_init(
    matrix: np.ndarray | RowSource, *, start: int, k: int, aggregate: Aggregate | str = Aggregate.SUM
) -> np.ndarray:
    """Greedy initialisation from ``start`` (seed Algorithm 2, SPEC section 2).

    Args:
        matrix: a symmetric ``(n, n)`` MI matrix with finite entries, or a :class:`RowSource`.
        start: the start vertex, in ``0..n-1``.
        k: subset size, ``2 <= k < n``.
        aggregate: how a new member's row folds into the score: ``"sum"`` (default) or ``"max"``.

    Returns:
        the k members in order of joining, ``start`` first.

    Raises:
        ConfigError: ``k`` or ``start`` breaks its rule, or the matrix is not square.
        DataError: a dense matrix holds a non-finite entry or is not symmetric.
    """
    source = _checked_source(matrix)
    check_subset_size(k, n=source.n)
    members, _, _ = _greedy(source.row, source.n, start=start, k=k, use_max=Aggregate(aggregate) is Aggregate.MAX)
    return members


def one_hot_replacement(
    matrix: np.ndarray | RowSource, *, subset: Sequence[int] | np.ndarray, max_swaps: int | None = None
) -> tuple[np.ndarray, float, int, np.ndarray]:
    """One-hot replacement from ``subset`` (seed Algorithm 3, SPEC section 2).

    Args:
        matrix: the MI matrix (symmetric, finite) or a row source.
        subset: the starting members: distinct indices in ``0..n-1``, ``2 <= len(subset) < n``.
        max_swaps: stop after this many swaps, a whole number >= 0 (for inspecting intermediate
            states); ``None`` runs until no swap lowers H.

    Returns:
        ``(members, h, swaps, sums)``: the final members, their H, the number of swaps, and the
        incrementally maintained ``A[x] = sum_{j in S} I[x][j]`` (Out for non-members, In plus
        the diagonal for members).

    Raises:
        ConfigError: ``subset`` holds non-integers, repeats or indices outside ``0..n-1``, has a size
            outside ``2..n-1``, or ``max_swaps`` is not ``None`` or a whole number >= 0.
        DataError: a dense matrix holds a non-finite entry or is not symmetric.
    """
    if max_swaps is not None:
        whole_number(max_swaps, name="max_swaps", minimum=0)
    source = _checked_source(matrix)
    members = _check_members(subset, source.n)
    check_subset_size(members.shape[0], n=source.n)
    sums = np.zeros(source.n, dtype=np.float64)
    for m in members:
        _accumulate(sums, source.row(int(m)))
    return _replacement(source.row, source.diagonal(), members, sums, max_swaps=-1 if max_swaps is None else max_swaps)


def restart_from_rows(
    source: RowSource, *, start: int, k: int, aggregate: Aggregate | str = Aggregate.SUM
) -> RestartRecord:
    """One restart through a row source; same arithmetic as the dense path."""
    use_max = Aggregate(aggregate) is Aggregate.MAX
    members, sums, h_greedy = _greedy(source.row, source.n, start=start, k=k, use_max=use_max)
    if use_max:
        sums = np.zeros(source.n, dtype=np.float64)
        for m in members:
            _accumulate(sums, source.row(int(m)))
        h_greedy = _half_in_sum(sums, source.diagonal(), members)
    members, h, swaps, _ = _replacement(source.row, source.diagonal(), members, sums, max_swaps=-1)
    return RestartRecord(start, h_greedy, h, swaps, members)


# ----- shared arithmetic -------------------------------------------------------------------


def _greedy(
    row: Callable[[int], np.ndarray], n: int, *, start: int, k: int, use_max: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    if not is_whole(start) or not 0 <= start < n:
        raise ConfigError(f"start vertex must be a whole number in 0..{n - 1}; got {start!r}.")
    in_set = np.zeros(n, dtype=np.bool_)
    members = np.empty(k, dtype=np.int64)
    score = np.zeros(n, dtype=np.float64)
    members[0] = start
    in_set[start] = True
    _accumulate(score, row(start))
    h_greedy = 0.0
    for step in range(1, k):
        pick = _argmin_outside(score, in_set)
        h_greedy += score[pick]
        members[step] = pick
        in_set[pick] = True
        if use_max:
            _fold_max(score, row(pick))
        else:
            _accumulate(score, row(pick))
    return members, score, h_greedy


def _replacement(
    row: Callable[[int], np.ndarray],
    diagonal: np.ndarray,
    members: np.ndarray,
    sums: np.ndarray,
    *,
    max_swaps: int,
) -> tuple[np.ndarray, float, int, np.ndarray]:
    members = members.copy()
    in_set = np.zeros(sums.shape[0], dtype=np.bool_)
    in_set[members] = True
    position = {int(m): i for i, m in enumerate(members)}
    h = _half_in_sum(sums, diagonal, members)
    swaps = 0
    while swaps != max_swaps:
        p = _argmax_in(sums, diagonal, members)
        in_p = sums[p] - diagonal[p]
        row_p = row(p)
        q, gain = _best_entrant(sums, row_p, in_set)
        if q < 0 or gain >= in_p:
            break
        h += gain - in_p
        row_q = row(q)
        _swap_update(sums, row_p, row_q)
        in_set[p] = False
        in_set[q] = True
        slot = position.pop(int(p))
        members[slot] = q
        position[int(q)] = slot
        swaps += 1
    return members, float(h), swaps, sums


@numba.njit(cache=True)
def _accumulate(total: np.ndarray, row: np.ndarray) -> None:
    for x in range(total.shape[0]):
        total[x] += row[x]


@numba.njit(cache=True)
def _fold_max(total: np.ndarray, row: np.ndarray) -> None:
    for x in range(total.shape[0]):
        total[x] = max(total[x], row[x])


@numba.njit(cache=True)
def _argmin_outside(score: np.ndarray, in_set: np.ndarray) -> int:
    best = -1
    best_value = np.inf
    for x in range(score.shape[0]):
        if not in_set[x] and score[x] < best_value:
            best_value = score[x]
            best = x
    return best


@numba.njit(cache=True)
def _argmax_in(sums: np.ndarray, diagonal: np.ndarray, members: np.ndarray) -> int:
    # Ties go to the lowest index, whatever the order members are stored in.
    best = -1
    best_value = -np.inf
    for i in range(members.shape[0]):
        m = members[i]
        value = sums[m] - diagonal[m]
        if value > best_value or (value == best_value and m < best):
            best_value = value
            best = m
    return best


@numba.njit(cache=True)
def _best_entrant(sums: np.ndarray, row_p: np.ndarray, in_set: np.ndarray) -> tuple[int, float]:
    best = -1
    best_value = np.inf
    for j in range(sums.shape[0]):
        if not in_set[j]:
            value = sums[j] - row_p[j]
            if value < best_value:
                best_value = value
                best = j
    return best, best_value


@numba.njit(cache=True)
def _swap_update(sums: np.ndarray, row_p: np.ndarray, row_q: np.ndarray) -> None:
    for x in range(sums.shape[0]):
        sums[x] += np.float64(row_q[x]) - np.float64(row_p[x])


@numba.njit(cache=True)
def _half_in_sum(sums: np.ndarray, diagonal: np.ndarray, members: np.ndarray) -> float:
    total = 0.0
    for i in range(members.shape[0]):
        total += sums[members[i]] - diagonal[members[i]]
    return total / 2.0


@numba.njit(cache=True)
def _dense_restart(
    matrix: np.ndarray, diagonal: np.ndarray, start: int, k: int, use_max: bool, members: np.ndarray
) -> tuple[float, float, int]:
    n = matrix.shape[0]
    in_set = np.zeros(n, dtype=np.bool_)
    score = np.zeros(n, dtype=np.float64)
    members[0] = start
    in_set[start] = True
    _accumulate(score, matrix[start])
    h_greedy = 0.0
    for step in range(1, k):
        pick = _argmin_outside(score, in_set)
        h_greedy += score[pick]
        members[step] = pick
        in_set[pick] = True
        if use_max:
            _fold_max(score, matrix[pick])
        else:
            _accumulate(score, matrix[pick])
    if use_max:
        score[:] = 0.0
        for i in range(k):
            _accumulate(score, matrix[members[i]])
        h_greedy = _half_in_sum(score, diagonal, members)
    sums = score
    h = _half_in_sum(sums, diagonal, members)
    swaps = 0
    while True:
        p = _argmax_in(sums, diagonal, members)
        in_p = sums[p] - diagonal[p]
        q, gain = _best_entrant(sums, matrix[p], in_set)
        if q < 0 or gain >= in_p:
            break
        h += gain - in_p
        _swap_update(sums, matrix[p], matrix[q])
        in_set[p] = False
        in_set[q] = True
        for i in range(k):
            if members[i] == p:
                members[i] = q
                break
        swaps += 1
    return h_greedy, h, swaps


@numba.njit(cache=True, parallel=True)
def _dense_restarts(
    matrix: np.ndarray,
    starts: np.ndarray,
    k: int,
    use_max: bool,
    subsets: np.ndarray,
    h_greedy: np.ndarray,
    h: np.ndarray,
    swaps: np.ndarray,
) -> None:
    n = matrix.shape[0]
    diagonal = np.empty(n, dtype=np.float32)
    for x in range(n):
        diagonal[x] = matrix[x, x]
    for i in numba.prange(starts.shape[0]):
        hg, hh, sw = _dense_restart(matrix, diagonal, starts[i], k, use_max, subsets[i])
        h_greedy[i] = hg
        h[i] = hh
        swaps[i] = sw


# ----- argument checks ---------------------------------------------------------------------


def _as_source(matrix: np.ndarray | RowSource) -> RowSource:
    """A :class:`RowSource` as it is; an array, or nested lists of numbers, as :class:`DenseRows`."""
    if not isinstance(matrix, np.ndarray) and not all(hasattr(matrix, a) for a in ("n", "row", "diagonal")):
        try:
            matrix = np.asarray(matrix, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"the MI matrix must be an (n, n) array of numbers or a RowSource; got {type(matrix).__name__} "
                f"({exc}). Pass np.asarray(matrix, dtype=np.float32)."
            ) from exc
    if isinstance(matrix, np.ndarray):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ConfigError(f"the MI matrix must be square (n, n); got shape {matrix.shape}.")
        return DenseRows(np.ascontiguousarray(matrix, dtype=np.float32))
    return matrix


def _checked_source(matrix: np.ndarray | RowSource, *, symmetry: bool = True) -> RowSource:
    """:func:`_as_source`, with a dense matrix checked finite and symmetric (:func:`_check_mi_matrix`).

    With ``symmetry=False`` only finiteness is checked, by one vectorised sum (NaN or inf anywhere
    makes it non-finite), about ten times cheaper than the pairwise check: for :func:`run_restarts`,
    which the reduce flow's workers call once per chunk of starts on the same matrix. The pairwise
    check then runs only to name the bad entry.
    """
    source = _as_source(matrix)
    if isinstance(source, DenseRows) and (symmetry or not np.isfinite(source.matrix.sum())):
        _check_mi_matrix(source.matrix)
    return source


def _check_mi_matrix(matrix: np.ndarray) -> None:
    """Refuse a dense matrix with a non-finite entry or one that is not symmetric.

    Restarts read only one triangle's worth of each pair and compare sums, so NaN would give
    out-of-range subsets and an asymmetric matrix an H that depends on the order of a pair.
    """
    i, j = _first_bad_entry(matrix)
    if i < 0:
        return
    if not (np.isfinite(matrix[i, j]) and np.isfinite(matrix[j, i])):
        raise DataError(
            f"the MI matrix must hold finite numbers; entry ({i}, {j}) is {matrix[i, j]} and ({j}, {i}) is "
            f"{matrix[j, i]}. Recompute it (obliviate.reduction.mi.mi_matrix) or replace the bad entries."
        )
    raise DataError(
        f"the MI matrix must be symmetric (MI(u, v) = MI(v, u)); entry ({i}, {j}) is {matrix[i, j]} but ({j}, {i}) "
        f"is {matrix[j, i]}. Symmetrise it, e.g. (m + m.T) / 2, or recompute it with mi_matrix."
    )


@numba.njit(cache=True)
def _first_bad_entry(matrix: np.ndarray) -> tuple[int, int]:
    n = matrix.shape[0]
    for i in range(n):
        for j in range(i, n):
            a, b = matrix[i, j], matrix[j, i]
            if not (np.isfinite(a) and np.isfinite(b)):
                return i, j
            if abs(a - b) > 1e-6 + 1e-5 * max(abs(a), abs(b)):
                return i, j
    return -1, -1


def check_subset_size(k: int, *, n: int) -> None:
    """Raise :class:`ConfigError` unless the subset size ``k`` is a whole number with ``2 <= k < n`` (SPEC section 2)."""
    if not is_whole(k):
        raise ConfigError(f"k must be a whole number with 2 <= k < n={n}; got {k!r} ({type(k).__name__}). Pass an int.")
    if n < 3:
        raise ConfigError(
            f"a pool of n={n} image{'' if n == 1 else 's'} is too small to reduce: a subset needs 2 <= k < n, so the "
            "pool needs at least 3 images. Use a larger pool."
        )
    if k < 2:
        raise ConfigError(f"k must satisfy 2 <= k < n={n}; got k={k}. A subset has at least 2 images: raise k.")
    if k >= n:
        raise ConfigError(f"k must satisfy 2 <= k < n={n}; got k={k}. Choose a smaller subset or a larger pool.")


def _check_members(subset: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """``subset`` as a fresh int64 array of distinct indices in ``0..n-1``, or :class:`ConfigError`."""
    members = index_array(subset, name="subset").copy()
    if members.size and (members.min() < 0 or members.max() >= n):
        raise ConfigError(
            f"subset must hold indices in 0..{n - 1} (rows of the MI matrix); got {members.min()}..{members.max()}."
        )
    repeats = members.shape[0] - np.unique(members).shape[0]
    if repeats:
        raise ConfigError(f"subset must hold distinct indices; got {repeats} repeats.")
    return members


def _check_starts(starts: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    arr = index_array(starts, name="starts")
    if arr.size == 0:
        raise ConfigError("starts must name at least one start vertex; got none.")
    if arr.min() < 0 or arr.max() >= n:
        raise ConfigError(f"start vertices must be in 0..{n - 1}; got {arr.min()}..{arr.max()}.")
    return arr
