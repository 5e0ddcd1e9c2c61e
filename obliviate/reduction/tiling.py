"""How the symmetric MI matrix is cut into tiles, and what that costs (SPEC section 1).

Only the upper triangle of blocks is computed: tile ``(r, c)`` with ``r <= c`` covers rows
``[r*T, (r+1)*T)`` and columns ``[c*T, (c+1)*T)``; diagonal tiles hold only their strictly
upper entries. Row ``i`` of the matrix is assembled from the tiles of its row block (as stored)
and of its column block (transposed), plus the diagonal ``I[i][i] = H(i)`` (1 when normalised).

Everything here is arithmetic on sizes, so a plan for n = 60,000 is made without computing
anything.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from obliviate.checks import is_whole, whole_number
from obliviate.errors import ConfigError
from obliviate.reduction.drmi import check_subset_size

FLOAT32_BYTES = 4


@dataclass(frozen=True, order=True)
class TileSpec:
    """One tile: the half-open row and column ranges it covers."""

    row_start: int
    row_stop: int
    col_start: int
    col_stop: int

    @property
    def diagonal(self) -> bool:
        return self.row_start == self.col_start

    @property
    def name(self) -> str:
        """Stable object name, sortable by position."""
        return f"r{self.row_start:07d}-c{self.col_start:07d}.npy"

    @property
    def shape(self) -> tuple[int, int]:
        return self.row_stop - self.row_start, self.col_stop - self.col_start

    @property
    def pairs(self) -> int:
        """Image pairs this tile computes (strict upper half on diagonal tiles)."""
        rows, cols = self.shape
        return rows * (rows - 1) // 2 if self.diagonal else rows * cols


@dataclass(frozen=True)
class TilePlan:
    """The upper-triangle tiling of an ``n x n`` matrix with square tiles of side ``tile_size``."""

    n: int
    tile_size: int

    def __post_init__(self) -> None:
        if not is_whole(self.n):
            raise ConfigError(f"a tile plan needs a whole number of images; got n={self.n!r}. Pass an int.")
        if not is_whole(self.tile_size):
            raise ConfigError(f"tile_size must be a whole number >= 1; got {self.tile_size!r}. Pass an int.")
        if self.n < 2:
            raise ConfigError(f"a tile plan needs at least 2 images; got n={self.n}.")
        if self.tile_size < 1:
            raise ConfigError(f"tile_size must be positive; got {self.tile_size}.")

    @property
    def blocks(self) -> int:
        return -(-self.n // self.tile_size)

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.tile_size
        return start, min(start + self.tile_size, self.n)

    def block_of(self, index: int) -> int:
        return index // self.tile_size

    def tile(self, *, row_block: int, col_block: int) -> TileSpec:
        if not 0 <= row_block <= col_block < self.blocks:
            raise ConfigError(
                f"tiles exist for 0 <= row block <= column block < {self.blocks}; got ({row_block}, {col_block})."
            )
        r0, r1 = self.block_range(row_block)
        c0, c1 = self.block_range(col_block)
        return TileSpec(r0, r1, c0, c1)

    def tiles(self) -> list[TileSpec]:
        """Every tile of the upper triangle, row block by row block."""
        return [self.tile(row_block=r, col_block=c) for r in range(self.blocks) for c in range(r, self.blocks)]

    @property
    def num_tiles(self) -> int:
        return self.blocks * (self.blocks + 1) // 2

    @property
    def pairs(self) -> int:
        return self.n * (self.n - 1) // 2

    @property
    def stored_bytes(self) -> int:
        """Bytes of all stored tiles (float32; diagonal tiles are stored whole)."""
        # Over block sides s_i, the tiles (i <= j) hold sum s_i s_j = (n^2 + sum s_i^2) / 2 entries: in
        # closed form, as ``--plan`` asks it of pools whose tiles would be too many to list.
        full, rest = divmod(self.n, self.tile_size)
        squares = full * self.tile_size**2 + rest**2
        return (self.n**2 + squares) // 2 * FLOAT32_BYTES

    @property
    def dense_bytes(self) -> int:
        """Bytes of the whole matrix held in one process."""
        return self.n * self.n * FLOAT32_BYTES

    @property
    def band_bytes(self) -> int:
        """Bytes of one row band (``tile_size`` full rows): the unit a streaming reader caches."""
        return min(self.tile_size, self.n) * self.n * FLOAT32_BYTES


def plan_report(
    *,
    n: int,
    tile_size: int,
    k: int,
    workers: int,
    pixels: int = 784,
    nonzero_share: float = 0.19,
    pairs_per_second: float | None = None,
) -> dict[str, float | int | str]:
    """Sizes and per-worker memory of a reduction, computed without computing anything.

    Args:
        n: pool size.
        tile_size: tile side.
        k: subset size.
        workers: actors per stage.
        pixels: pixels per image (784 for 28x28).
        nonzero_share: share of non-zero pixels (about 0.19 on MNIST), for the sparse lists.
        pairs_per_second: measured single-thread MI throughput, to estimate the tile stage time.

    Returns:
        tile count, bytes stored, and per-worker memory of both stages: a restart worker holds the
        dense matrix, or (streaming, when it does not fit) an LRU cache of single rows of about k
        rows (``row_cache_rows``, at least one row band's bytes) read from the stored tiles.

    Raises:
        ConfigError: ``n``, ``tile_size``, ``k``, ``workers`` or ``pixels`` is not a whole number in its
            range (``2 <= k < n``, the others >= 1), ``nonzero_share`` is outside 0..1, or
            ``pairs_per_second`` is not a positive finite number.
    """
    plan = TilePlan(n=n, tile_size=tile_size)
    check_subset_size(k, n=n)
    whole_number(workers, name="workers", minimum=1)
    whole_number(pixels, name="pixels", minimum=1)
    if not (isinstance(nonzero_share, numbers.Real) and 0.0 <= nonzero_share <= 1.0):
        raise ConfigError(f"nonzero_share must be a share in 0..1 (about 0.19 on MNIST); got {nonzero_share!r}.")
    if pairs_per_second is not None and not (
        isinstance(pairs_per_second, numbers.Real) and math.isfinite(pairs_per_second) and pairs_per_second > 0
    ):
        raise ConfigError(f"pairs_per_second must be a positive finite throughput (or None); got {pairs_per_second!r}.")
    prepared = n * pixels + int(n * pixels * nonzero_share) * 5 + n * 8 * 3  # codes, (pos, code), ptr/entropy
    tile_worker = prepared + tile_size * tile_size * FLOAT32_BYTES * 2  # tile + its serialised copy
    # A streaming restart worker (storage.tiles.TiledRows) caches single rows of the matrix, LRU, in
    # the byte budget the reduce flow gives it when the matrix does not fit: about k rows (O(n k)),
    # at least one row band's bytes (flows.reduce.restart_memory_bytes). On top: the diagonal and the
    # row being assembled (n float32 each; on a file:// store one tile slice at a time) and O(n)
    # float64 sums and flags.
    row_bytes = n * FLOAT32_BYTES
    row_cache = max(plan.band_bytes, k * row_bytes)
    restart_worker_streaming = row_cache + 2 * row_bytes + n * (8 * 2 + 1)
    report: dict[str, float | int | str] = {
        "n": n,
        "tile_size": tile_size,
        "k": k,
        "workers": workers,
        "pairs": plan.pairs,
        "tiles": plan.num_tiles,
        "tiles_per_worker": -(-plan.num_tiles // max(workers, 1)),
        "stored_bytes": plan.stored_bytes,
        "dense_matrix_bytes": plan.dense_bytes,
        "tile_worker_bytes": tile_worker,
        "restart_worker_dense_bytes": plan.dense_bytes + n * 17,
        "row_cache_rows": row_cache // row_bytes,
        "row_cache_bytes": row_cache,
        "restart_worker_streaming_bytes": restart_worker_streaming,
    }
    if pairs_per_second:
        report["tile_stage_seconds_estimate"] = plan.pairs / (pairs_per_second * max(workers, 1))
    return report
