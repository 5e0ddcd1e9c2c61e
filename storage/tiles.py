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

import numpy as np

from obliviate.errors import ConfigError
from obliviate.reduction.tiling import TilePlan, TileSpec
from storage.objects import ObjectStore

DIAGONAL = "diagonal.npy"
PLAN = "plan.json"


def matrix_prefix(*, fingerprint: str, bins: int, normalize: bool, tile_size: int) -> str:
    """Folder of one MI matrix's tiles; equal inputs give the equal folder."""
    return f"mi-tiles/{fingerprint}-b{bins}-{'nmi' if normalize else 'raw'}-t{tile_size}"


def tile_key(prefix: str, tile: TileSpec) -> str:
    return f"{prefix}/{tile.name}"


def stored_tiles(store: ObjectStore, prefix: str, plan: TilePlan) -> set[TileSpec]:
    """The plan's tiles already committed under ``prefix`` (one listing call)."""
    committed = set(store.list(prefix))
    return {t for t in plan.tiles() if tile_key(prefix, t) in committed}


class TiledMatrix:
    """Rows of a stored tiled MI matrix, through a byte-bounded LRU cache of row bands.

    Args:
        store: where the tiles are.
        prefix: the matrix folder (see :func:`matrix_prefix`).
        cache_bytes: the most bytes of row bands held at once (at least one band is held).
    """

    def __init__(self, store: ObjectStore, prefix: str, *, cache_bytes: int) -> None:
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
        n = self.plan.n
        matrix = np.zeros((n, n), dtype=np.float32)
        for tile in self.plan.tiles():
            values = self._read_tile(tile)
            r0, r1, c0, c1 = tile.row_start, tile.row_stop, tile.col_start, tile.col_stop
            if tile.diagonal:
                block = np.triu(values, k=1)
                matrix[r0:r1, c0:c1] = block + block.T
            else:
                matrix[r0:r1, c0:c1] = values
                matrix[c0:c1, r0:r1] = values.T
        np.fill_diagonal(matrix, self._diagonal)
        return matrix

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
                band[:, c0:c1] = self._read_tile(self.plan.tile(block, other))
            elif other < block:
                band[:, c0:c1] = self._read_tile(self.plan.tile(other, block)).T
            else:
                upper = np.triu(self._read_tile(self.plan.tile(block, block)), k=1)
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
