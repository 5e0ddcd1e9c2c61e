"""MI matrices stored as tiles: where they live and how rows are read back (SPEC section 1).

Layout under a store: ``mi-tiles/<fingerprint>-b<bins>-<raw|nmi>-t<tile>/`` holds ``plan.json``,
``diagonal.npy`` and one ``r<row>-c<col>.npy`` per upper-triangle tile. The key carries
everything the values depend on, so a rerun with the same data and options finds and reuses
the tiles; each tile is committed on its own, so a crashed run keeps every finished tile.

:class:`TiledMatrix` is an :class:`obliviate.reduction.drmi.RowSource` over such a folder. It reads
row bands (``tile_size`` full rows, assembled from one row of tiles and one column of tiles,
transposed) into a least-recently-used cache bounded in bytes, so a reader needs at most its
cache budget, never the whole matrix. :meth:`TiledMatrix.dense` assembles the whole matrix
for callers that checked it fits. Both give exactly the floats of
:func:`obliviate.reduction.mi.mi_matrix` (``upper + upper.T`` with the diagonal filled).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from obliviate.errors import ConfigError
from storage.objects import ObjectStore

if TYPE_CHECKING:  # obliviate.reduction imports numba and scipy: imported where a matrix is read, not by `store check`
    from obliviate.reduction.tiling import TilePlan, TileSpec

MI_TILES = "mi-tiles"
DIAGONAL = "diagonal.npy"
PLAN = "plan.json"


def drop_matrix_object(store: ObjectStore, key: str) -> None:
    """Delete a damaged object of a stored MI matrix, a cache that the tile stage computes again.

    Without ``plan.json`` the tile stage writes the diagonal and the plan again, so a damaged
    diagonal or plan takes both with it.
    """
    prefix, name = key.rsplit("/", 1)
    if name in (DIAGONAL, PLAN):
        store.delete(f"{prefix}/{PLAN}")
        store.delete(f"{prefix}/{DIAGONAL}")
    store.delete(key)


def matrix_prefix(*, fingerprint: str, bins: int, normalize: bool, tile_size: int) -> str:
    """Folder of one MI matrix's tiles; equal inputs give the equal folder."""
    return f"{MI_TILES}/{fingerprint}-b{bins}-{'nmi' if normalize else 'raw'}-t{tile_size}"


def tile_key(prefix: str, tile: TileSpec) -> str:
    return f"{prefix}/{tile.name}"


def stored_tiles(store: ObjectStore, prefix: str, plan: TilePlan) -> set[TileSpec]:
    """The plan's tiles already committed under ``prefix`` (one listing call)."""
    committed = set(store.list(prefix))
    return {t for t in plan.tiles() if tile_key(prefix, t) in committed}


def place_tile(matrix: np.ndarray, tile: TileSpec, values: np.ndarray) -> None:
    """Write one upper-triangle tile and its mirror into a dense ``(n, n)`` matrix.

    The same float operations as :func:`obliviate.reduction.mi.mi_matrix` (a diagonal tile's
    strict upper triangle plus its transpose), so a matrix assembled from tiles, then given the
    diagonal with ``np.fill_diagonal``, equals the in-process one bit for bit.
    """
    r0, r1, c0, c1 = tile.row_start, tile.row_stop, tile.col_start, tile.col_stop
    if tile.diagonal:
        block = np.triu(values, k=1)
        matrix[r0:r1, c0:c1] = block + block.T
    else:
        matrix[r0:r1, c0:c1] = values
        matrix[c0:c1, r0:r1] = values.T


class TiledMatrix:
    """Rows of a stored tiled MI matrix, through a byte-bounded LRU cache of row bands.

    Args:
        store: where the tiles are.
        prefix: the matrix folder (see :func:`matrix_prefix`).
        cache_bytes: the most bytes of row bands held at once (at least one band is held).
    """

    def __init__(self, store: ObjectStore, prefix: str, *, cache_bytes: int) -> None:
        from obliviate.reduction.tiling import TilePlan

        self._store = store
        self._prefix = prefix
        meta = store.get_json(f"{prefix}/{PLAN}")
        self.plan = TilePlan(n=int(meta["n"]), tile_size=int(meta["tile_size"]))
        self._diagonal = store.get_array(f"{prefix}/{DIAGONAL}").astype(np.float32)
        if self._diagonal.shape != (self.plan.n,):
            raise ConfigError(
                f"{store.uri(prefix)}/{DIAGONAL} has shape {self._diagonal.shape}, expected ({self.plan.n},)."
            )
        self._cache_bytes = int(cache_bytes)
        self._bands: OrderedDict[int, np.ndarray] = OrderedDict()
        self.tiles_read = 0
        self.bands_loaded = 0

    @property
    def n(self) -> int:
        return self.plan.n

    def diagonal(self) -> np.ndarray:
        return self._diagonal

    def row(self, index: int) -> np.ndarray:
        block = self.plan.block_of(index)
        band = self._band(block)
        return band[index - self.plan.block_range(block)[0]]

    def dense(self) -> np.ndarray:
        """The whole ``(n, n)`` matrix; only for callers that checked ``plan.dense_bytes`` fits."""
        matrix = np.zeros((self.plan.n, self.plan.n), dtype=np.float32)
        for tile in self.plan.tiles():
            place_tile(matrix, tile, self._read_tile(tile))
        np.fill_diagonal(matrix, self._diagonal)
        return matrix

    def read_tile(self, tile: TileSpec) -> np.ndarray:
        """One stored tile's floats (checked against the plan's shape)."""
        return self._read_tile(tile)

    def _band(self, block: int) -> np.ndarray:
        band = self._bands.get(block)
        if band is not None:
            self._bands.move_to_end(block)
            return band
        band = self._load_band(block)
        while self._bands and (len(self._bands) + 1) * self.plan.band_bytes > self._cache_bytes:
            self._bands.popitem(last=False)
        self._bands[block] = band
        return band

    def _load_band(self, block: int) -> np.ndarray:
        r0, r1 = self.plan.block_range(block)
        band = np.zeros((r1 - r0, self.plan.n), dtype=np.float32)
        for other in range(self.plan.blocks):
            c0, c1 = self.plan.block_range(other)
            if other > block:
                band[:, c0:c1] = self._read_tile(self.plan.tile(row_block=block, col_block=other))
            elif other < block:
                band[:, c0:c1] = self._read_tile(self.plan.tile(row_block=other, col_block=block)).T
            else:
                upper = np.triu(self._read_tile(self.plan.tile(row_block=block, col_block=block)), k=1)
                band[:, c0:c1] = upper + upper.T
        band[np.arange(r1 - r0), np.arange(r0, r1)] = self._diagonal[r0:r1]
        self.bands_loaded += 1
        return band

    def _read_tile(self, tile: TileSpec) -> np.ndarray:
        values = self._store.get_array(tile_key(self._prefix, tile))
        if values.shape != tile.shape or values.dtype != np.float32:
            raise ConfigError(
                f"tile {self._store.uri(tile_key(self._prefix, tile))} has shape {values.shape} and dtype "
                f"{values.dtype}; expected {tile.shape} float32. Delete the folder and recompute."
            )
        self.tiles_read += 1
        return values


class TiledRows:
    """Single rows of a stored tiled MI matrix, through a byte-bounded LRU cache of rows.

    The access pattern of DRMI restarts makes this the cheap way to stream: after the first
    restart, each further one touches about one row not seen before (its start vertex; the rest
    are the same low-entropy images every restart picks), so a cache of a few thousand rows
    serves thousands of restarts. A row is assembled from the ``blocks`` tiles of its row and
    column: on a local (``file://``) store each tile is memory-mapped for just that slice and
    unmapped at once (a process never maps more than one tile), after its checksum has been
    verified on first use; on a remote store whole tiles are fetched (verified) through a small
    LRU of tiles.

    Gives exactly the floats of :meth:`TiledMatrix.row` (same additions, same diagonal).

    Args:
        store: where the tiles are.
        prefix: the matrix folder (see :func:`matrix_prefix`).
        cache_bytes: the most bytes of rows (plus remote tiles) held at once.
    """

    def __init__(self, store: ObjectStore, prefix: str, *, cache_bytes: int) -> None:
        from obliviate.reduction.tiling import TilePlan

        self._store = store
        self._prefix = prefix
        meta = store.get_json(f"{prefix}/{PLAN}")
        self.plan = TilePlan(n=int(meta["n"]), tile_size=int(meta["tile_size"]))
        self._diagonal = store.get_array(f"{prefix}/{DIAGONAL}").astype(np.float32)
        if self._diagonal.shape != (self.plan.n,):
            raise ConfigError(
                f"{store.uri(prefix)}/{DIAGONAL} has shape {self._diagonal.shape}, expected ({self.plan.n},)."
            )
        row_bytes = self.plan.n * 4
        tile_bytes = self.plan.tile_size * self.plan.tile_size * 4
        self._local = store.is_local
        self._tile_budget = 0 if self._local else max(tile_bytes, int(cache_bytes) // 4)
        self._max_rows = max(1, (int(cache_bytes) - self._tile_budget) // row_bytes)
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()
        self._tiles: OrderedDict[TileSpec, np.ndarray] = OrderedDict()
        self._verified: set[TileSpec] = set()
        self.tiles_read = 0
        self.rows_loaded = 0

    @property
    def n(self) -> int:
        return self.plan.n

    def diagonal(self) -> np.ndarray:
        return self._diagonal

    def row(self, index: int) -> np.ndarray:
        row = self._rows.get(index)
        if row is not None:
            self._rows.move_to_end(index)
            return row
        row = self._load_row(index)
        while len(self._rows) >= self._max_rows:
            self._rows.popitem(last=False)
        self._rows[index] = row
        return row

    def _load_row(self, index: int) -> np.ndarray:
        block = self.plan.block_of(index)
        r0, r1 = self.plan.block_range(block)
        r = index - r0
        row = np.empty(self.plan.n, dtype=np.float32)
        for other in range(self.plan.blocks):
            c0, c1 = self.plan.block_range(other)
            if other > block:
                row[c0:c1] = self._slice(self.plan.tile(row_block=block, col_block=other), row=r)
            elif other < block:
                row[c0:c1] = self._slice(self.plan.tile(row_block=other, col_block=block), col=r)
            else:
                # (triu(T, 1) + triu(T, 1).T)[r], element by element, as TiledMatrix's band.
                width = r1 - r0
                j = np.arange(width)
                upper = np.where(
                    j > r, self._slice(self.plan.tile(row_block=block, col_block=block), row=r), np.float32(0)
                )
                lower = np.where(
                    j < r, self._slice(self.plan.tile(row_block=block, col_block=block), col=r), np.float32(0)
                )
                row[c0:c1] = upper.astype(np.float32) + lower.astype(np.float32)
        row[index] = self._diagonal[index]
        self.rows_loaded += 1
        return row

    def _slice(self, tile: TileSpec, *, row: int | None = None, col: int | None = None) -> np.ndarray:
        if self._local:
            key = tile_key(self._prefix, tile)
            if tile not in self._verified:
                self._check(tile, self._store.get_array(key))  # checksum-verified once
                self._verified.add(tile)
            mapped = np.load(self._store.uri(key).removeprefix("file://"), mmap_mode="r", allow_pickle=False)
            out = np.array(mapped[row] if row is not None else mapped[:, col], dtype=np.float32)
            del mapped  # unmapped here: at most one tile is ever mapped
            self.tiles_read += 1
            return out
        values = self._tiles.get(tile)
        if values is None:
            values = self._check(tile, self._store.get_array(tile_key(self._prefix, tile)))
            self.tiles_read += 1
            tile_bytes = values.nbytes
            while self._tiles and (len(self._tiles) + 1) * tile_bytes > self._tile_budget:
                self._tiles.popitem(last=False)
            self._tiles[tile] = values
        else:
            self._tiles.move_to_end(tile)
        return values[row] if row is not None else values[:, col]

    def _check(self, tile: TileSpec, values: np.ndarray) -> np.ndarray:
        if values.shape != tile.shape or values.dtype != np.float32:
            raise ConfigError(
                f"tile {self._store.uri(tile_key(self._prefix, tile))} has shape {values.shape} and dtype "
                f"{values.dtype}; expected {tile.shape} float32. Delete the folder and recompute."
            )
        return values
