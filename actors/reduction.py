"""Actors of the distributed reduction (SPEC sections 1-2): tiles of the MI matrix, and restarts.

Plain classes; the flow makes them remote with ``ray.remote(Cls)`` and sizes the pool.
Each method is one call into :mod:`obliviate` plus storage I/O.
"""

from __future__ import annotations

import time
from typing import Any

import numba
import numpy as np

from obliviate.reduction.drmi import Aggregate, run_restarts
from obliviate.reduction.mi import mi_tile, prepare_images
from obliviate.reduction.tiling import TileSpec
from storage.objects import ObjectStore
from storage.tiles import TiledMatrix, tile_key


class MITileWorker:
    """Prepares the images once, then computes tiles and commits each to storage.

    Args:
        images: ``(n, H, W)`` or ``(n, P)`` uint8 gray levels.
        levels: gray levels of the source.
        bins: code levels MI counts (SPEC default 256).
        store: where tiles go.
        prefix: the matrix folder (:func:`storage.tiles.matrix_prefix`).
        normalize: normalised MI (SPEC section 1 switch).
        threads: numba threads for this worker (1 when one worker runs per CPU).
    """

    def __init__(
        self,
        images: np.ndarray,
        store: ObjectStore,
        prefix: str,
        *,
        levels: int,
        bins: int,
        normalize: bool,
        threads: int = 1,
    ) -> None:
        numba.set_num_threads(threads)
        self._prepared = prepare_images(images, levels=levels, bins=bins)
        self._store = store
        self._prefix = prefix
        self._normalize = normalize

    def diagonal(self) -> np.ndarray:
        """``I[x][x]``: the image entropies, or ones when normalised (as :func:`obliviate.reduction.mi.mi_matrix`)."""
        if self._normalize:
            return np.ones(self._prepared.n, dtype=np.float32)
        return self._prepared.entropy.astype(np.float32)

    def compute(self, tile: TileSpec) -> dict[str, Any]:
        """Compute one tile and commit it; returns its key, checksum, size and compute seconds."""
        t0 = time.perf_counter()
        values = mi_tile(
            self._prepared,
            rows=np.arange(tile.row_start, tile.row_stop),
            cols=np.arange(tile.col_start, tile.col_stop),
            normalize=self._normalize,
            upper_only=tile.diagonal,
        )
        seconds = time.perf_counter() - t0
        info = self._store.put_array(tile_key(self._prefix, tile), values)
        return {
            "key": info.key,
            "sha256": info.sha256,
            "bytes": info.size,
            "compute_seconds": seconds,
            "total_seconds": time.perf_counter() - t0,
        }


class RestartWorker:
    """Runs greedy + replacement restarts over a stored tiled matrix.

    When the whole matrix fits ``memory_bytes`` it is assembled once and restarts run on the
    dense in-memory path; otherwise rows are streamed through a row-band cache of that size
    (O(n k) with the default budget). Both paths return the same floats (SPEC section 2
    invariant, checked by the tests).

    Args:
        store: where the tiles are.
        prefix: the matrix folder.
        memory_bytes: the most bytes of matrix this worker may hold.
        threads: numba threads for this worker.
    """

    def __init__(self, store: ObjectStore, prefix: str, *, memory_bytes: int, threads: int = 1) -> None:
        numba.set_num_threads(threads)
        # Opened on first use: the worker may be started while the tiles are still being computed.
        self._store = store
        self._prefix = prefix
        self._memory_bytes = memory_bytes
        self._rows_cache: TiledMatrix | None = None
        self._dense: np.ndarray | None = None
        # Load the compiled restart kernels now (numba's on-disk cache), while the worker waits
        # for the tile stage, rather than on the first real call.
        warm = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]], dtype=np.float32)
        run_restarts(warm, k=2, starts=np.array([0]))

    @property
    def _rows(self) -> TiledMatrix:
        if self._rows_cache is None:
            self._rows_cache = TiledMatrix(self._store, self._prefix, cache_bytes=self._memory_bytes)
        return self._rows_cache

    @property
    def mode(self) -> str:
        """``"dense"`` when the whole matrix fits the budget, else ``"streaming"`` row bands."""
        return "dense" if self._rows.plan.dense_bytes <= self._memory_bytes else "streaming"

    def ready(self) -> bool:
        """A no-op call: returns once the worker process is up and imported."""
        return True

    def run(self, starts: list[int], *, k: int, aggregate: str = Aggregate.SUM.value) -> dict[str, Any]:
        """Restarts from ``starts``; returns per-restart summaries and the best (H, subset)."""
        t0 = time.perf_counter()
        if self.mode == "dense":
            if self._dense is None:
                self._dense = self._rows.dense()
            source: Any = self._dense
        else:
            source = self._rows
        load_seconds = time.perf_counter() - t0
        records = run_restarts(source, k=k, starts=np.asarray(starts, dtype=np.int64), aggregate=aggregate)
        best = min(records, key=lambda r: (r.h, r.start))
        return {
            "restarts": [{"start": r.start, "h_greedy": r.h_greedy, "h": r.h, "swaps": r.swaps} for r in records],
            "best_start": best.start,
            "best_h": best.h,
            "best_subset": np.sort(best.subset),
            "mode": self.mode,
            "tiles_read": self._rows.tiles_read,
            "load_seconds": load_seconds,
            "seconds": time.perf_counter() - t0,
        }
