"""The actor of the distributed reduction (SPEC sections 1-2): tiles of the MI matrix, and restarts.

A plain class; :mod:`flows.reduce` makes it remote with ``ray.remote(ReductionWorker)`` and keeps
a warm pool of them for the life of the Ray runtime, so one worker process serves the tile stage,
then the restart stage, then the next flow run, without starting or importing anything again.

What a worker needs arrives once through Ray's object store, read zero-copy:

* the prepared images (:class:`obliviate.reduction.mi.PreparedImages`, prepared once by the
  flow) for the tile stage, kept until another dataset comes;
* the whole MI matrix, put once by the flow when it fits, for the restart stage (copied once
  into the worker's own memory, see :meth:`ReductionWorker.use_matrix`); otherwise the
  worker streams single rows from the stored tiles through a row cache
  (:class:`storage.tiles.TiledRows`).

Each method is one call into :mod:`obliviate` plus storage I/O, and returns its own timings
(compute, storage write, load) so the flow can report where the time went.

Storage outages are waited out, as the training worker does (:mod:`storage.retry`): every store
a worker is handed is used through a :class:`RetryingStore`, so a tile write or a streamed row
read that meets an unreachable backend is retried with back-off for up to 300 s instead of
failing the run. The reduction's writes are idempotent (a tile is the same bytes under the same
key however often it is written), so repeating one is safe.
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import numba
import numpy as np

from obliviate.reduction.drmi import Aggregate, run_restarts
from obliviate.reduction.mi import PreparedImages, mi_tile
from obliviate.reduction.tiling import TileSpec
from storage.objects import ObjectInfo, ObjectStore, check_shared
from storage.retry import DEFAULT_RETRY_DEADLINE_S, RetryPolicy, retry_unavailable
from storage.tiles import PLAN, TiledRows, tile_key

STORAGE_RETRY_DEADLINE_S = DEFAULT_RETRY_DEADLINE_S


class RetryingStore(ObjectStore):
    """An :class:`ObjectStore` whose reads, listings and writes wait out storage outages.

    Each call that raises :class:`storage.errors.StorageUnavailable` is retried with back-off
    (:func:`storage.retry.retry_unavailable`) for up to ``deadline_s``; missing or damaged
    objects are answers and pass straight through. Only the calls that are safe to repeat are
    retried: writes of whole objects (same key, same bytes: idempotent), reads, listings,
    deletes and the container check. The deadline travels with the store to Ray workers; the
    ``on_retry`` callback and the ``retries`` count stay in the process that holds it.

    Args:
        url: the store's URL, as :class:`ObjectStore`.
        deadline_s: seconds an outage is retried before the call fails with its last error.
        on_retry: called with ``(attempt, error)`` before each wait (to log the outage).
    """

    def __init__(
        self,
        url: str = "file://./runs",
        *,
        deadline_s: float = STORAGE_RETRY_DEADLINE_S,
        on_retry: Callable[[int, Exception], None] | None = None,
    ) -> None:
        super().__init__(url)
        self.policy = RetryPolicy(deadline_s=deadline_s)
        self.retries = 0
        self._on_retry = on_retry

    @classmethod
    def of(
        cls,
        store: ObjectStore,
        *,
        deadline_s: float | None = None,
        on_retry: Callable[[int, Exception], None] | None = None,
    ) -> RetryingStore:
        """``store`` itself when it already retries (and nothing is to change), else a retrying copy of it.

        The copy keeps ``store``'s URL and S3 endpoint (an endpoint is read from the environment of the
        process that made the store, not of this one). Without ``deadline_s`` a retrying store keeps its
        own, and a plain one gets :data:`STORAGE_RETRY_DEADLINE_S`.
        """
        if isinstance(store, RetryingStore) and deadline_s is None and on_retry is None:
            return store
        state = store.__getstate__()
        if deadline_s is None:
            deadline_s = store.policy.deadline_s if isinstance(store, RetryingStore) else STORAGE_RETRY_DEADLINE_S
        copy = cls.__new__(cls)
        copy.__setstate__({**state, "deadline_s": deadline_s})
        copy._on_retry = on_retry
        return copy

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "deadline_s": self.policy.deadline_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.policy = RetryPolicy(deadline_s=float(state.get("deadline_s", STORAGE_RETRY_DEADLINE_S)))
        self.retries = 0
        self._on_retry = None

    def __repr__(self) -> str:
        return f"RetryingStore({self.url!r}, deadline_s={self.policy.deadline_s:g})"

    def _retried(self, call: Callable[[], Any]) -> Any:
        def count(attempt: int, err: Exception) -> None:
            self.retries += 1
            if self._on_retry is not None:
                self._on_retry(attempt, err)

        return retry_unavailable(call, policy=self.policy, on_retry=count)

    # Every typed read and write (arrays, JSON, manifests) goes through one of these.
    def put_chunks(self, key: str, chunks: Iterable[bytes]) -> ObjectInfo:
        data = b"".join(chunks)  # gathered once: a retry writes the same bytes again
        info: ObjectInfo = self._retried(lambda: super(RetryingStore, self).put_chunks(key, [data]))
        return info

    def get_bytes(self, key: str) -> bytes:
        data: bytes = self._retried(lambda: super(RetryingStore, self).get_bytes(key))
        return data

    def info(self, key: str) -> ObjectInfo:
        info: ObjectInfo = self._retried(lambda: super(RetryingStore, self).info(key))
        return info

    def exists(self, key: str) -> bool:
        return bool(self._retried(lambda: super(RetryingStore, self).exists(key)))

    def list(self, prefix: str = "") -> builtins.list[str]:
        keys: builtins.list[str] = self._retried(lambda: super(RetryingStore, self).list(prefix))
        return keys

    def delete(self, key: str) -> None:
        self._retried(lambda: super(RetryingStore, self).delete(key))

    def ensure_container(self) -> None:
        self._retried(lambda: super(RetryingStore, self).ensure_container())


class ReductionWorker:
    """One warm worker of both reduction stages.

    Args:
        threads: numba threads (and torch threads, should torch be loaded) for this worker; 1
            when one worker runs per CPU, so W workers use W cores and never oversubscribe.
    """

    def __init__(self, *, threads: int = 1) -> None:
        t0 = time.perf_counter()
        numba.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        self._threads = threads
        self._images_key: str | None = None
        self._prepared: PreparedImages | None = None
        self._matrix_key: str | None = None
        self._matrix: np.ndarray | TiledRows | None = None
        self._shared_stores: set[tuple[str, str]] = set()  # (store URL, matrix folder) found to hold the flow's plan
        # Load the compiled restart kernels now (numba's on-disk cache), not on the first real call.
        warm = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]], dtype=np.float32)
        run_restarts(warm, k=2, starts=np.array([0]))
        self._start_seconds = time.perf_counter() - t0

    def ready(self) -> dict[str, Any]:
        """Returns once the worker process is up, imported and warm."""
        return {"pid": os.getpid(), "init_seconds": self._start_seconds}

    # ----- tile stage ------------------------------------------------------------------------

    def use_images(self, key: str, prepared: PreparedImages) -> float:
        """Hold ``prepared`` (zero-copy from the object store) as the images of dataset ``key``.

        Returns:
            seconds spent (0 when this worker already holds ``key``).
        """
        t0 = time.perf_counter()
        if self._images_key != key:
            self._prepared = prepared
            self._images_key = key
        return time.perf_counter() - t0

    def diagonal(self, *, normalize: bool) -> np.ndarray:
        """``I[x][x]``: the image entropies, or ones when normalised (as :func:`obliviate.reduction.mi.mi_matrix`)."""
        prepared = self._images()
        if normalize:
            return np.ones(prepared.n, dtype=np.float32)
        return prepared.entropy.astype(np.float32)

    def compute(
        self,
        tile: TileSpec,
        *,
        key: str,
        store: ObjectStore,
        prefix: str,
        normalize: bool,
        return_values: bool,
    ) -> dict[str, Any]:
        """Compute one tile and commit it; returns its key, checksum, size and timings.

        With ``return_values`` the tile's floats come back too (through the object store), for
        a flow that assembles the whole matrix in memory.
        """
        prepared = self._images(key)
        store = RetryingStore.of(store)
        self._check_store_shared(store, prefix, what=f"tile {tile.name}")
        t0 = time.perf_counter()
        values = mi_tile(
            prepared,
            rows=np.arange(tile.row_start, tile.row_stop),
            cols=np.arange(tile.col_start, tile.col_stop),
            normalize=normalize,
            upper_only=tile.diagonal,
        )
        t1 = time.perf_counter()
        info = store.put_array(tile_key(prefix, tile), values)  # an outage is waited out
        t2 = time.perf_counter()
        return {
            "tile": tile,
            "key": info.key,
            "sha256": info.sha256,
            "bytes": info.size,
            "compute_seconds": t1 - t0,
            "write_seconds": t2 - t1,
            "storage_retries": store.retries,
            "values": values if return_values else None,
        }

    def _check_store_shared(self, store: ObjectStore, prefix: str, *, what: str) -> None:
        """Refuse a store that is not the flow's: the flow writes the matrix's plan before it hands out any work.

        Checked once per store and matrix folder for the life of the worker (one ``exists`` per run, not per tile).

        Raises:
            StoreNotShared: ``prefix``'s plan is not in ``store`` as this worker reads it (its node has another
                folder at a ``file://`` URL, or reaches another S3 endpoint or bucket).
        """
        if (store.url, prefix) in self._shared_stores:
            return
        check_shared(
            store,
            f"{prefix}/{PLAN}",
            described="the MI matrix's plan",
            written_in="the reduce flow wrote it in before handing out this work",
            what=what,
        )
        self._shared_stores.add((store.url, prefix))

    def _images(self, key: str | None = None) -> PreparedImages:
        if self._prepared is None or (key is not None and key != self._images_key):
            raise RuntimeError(
                f"worker holds images {self._images_key!r}, asked for {key!r}: call use_images first (a flow bug)."
            )
        return self._prepared

    # ----- restart stage ---------------------------------------------------------------------

    def use_matrix(
        self,
        key: str,
        matrix: np.ndarray | None,
        *,
        store: ObjectStore,
        prefix: str,
        memory_bytes: int,
    ) -> dict[str, Any]:
        """Hold the MI matrix of ``key``: ``matrix`` (dense) or rows streamed from ``prefix``.

        A dense matrix arrives zero-copy from Ray's object store and is copied once into this
        process's own memory: the object store is shared memory in 4 KiB pages, while numpy asks
        the kernel for transparent huge pages, and restarts, which walk rows of the whole matrix,
        run 1.4-1.7x slower on the shared pages (measured here; ``docs/scaling.md``). The copy
        costs about 0.1 s per 100 MB, once per run.

        Returns:
            the mode (``"dense"`` or ``"streaming"``) and the seconds spent.
        """
        t0 = time.perf_counter()
        if self._matrix_key != key:
            self._matrix = None  # drop the previous one before taking the next
            if matrix is not None:
                self._matrix = np.array(matrix, dtype=np.float32, order="C", copy=True)
            else:
                rows_store = RetryingStore.of(store)  # row reads wait out outages
                self._check_store_shared(rows_store, prefix, what="the restart stage")
                self._matrix = TiledRows(rows_store, prefix, cache_bytes=memory_bytes)
            self._matrix_key = key
        return {"mode": self._mode(), "seconds": time.perf_counter() - t0}

    def _mode(self) -> str:
        return "dense" if isinstance(self._matrix, np.ndarray) else "streaming"

    def run(self, starts: list[int], *, key: str, k: int, aggregate: str = Aggregate.SUM.value) -> dict[str, Any]:
        """Restarts from ``starts``; returns per-restart summaries and the best (H, subset)."""
        if self._matrix is None or key != self._matrix_key:
            raise RuntimeError(f"worker holds matrix {self._matrix_key!r}, asked for {key!r}: call use_matrix first.")
        t0 = time.perf_counter()
        tiles_before = self._matrix.tiles_read if isinstance(self._matrix, TiledRows) else 0
        records = run_restarts(self._matrix, k=k, starts=np.asarray(starts, dtype=np.int64), aggregate=aggregate)
        best = min(records, key=lambda r: (r.h, r.start))
        tiles_read = (self._matrix.tiles_read if isinstance(self._matrix, TiledRows) else 0) - tiles_before
        return {
            "restarts": [{"start": r.start, "h_greedy": r.h_greedy, "h": r.h, "swaps": r.swaps} for r in records],
            "best_start": best.start,
            "best_h": best.h,
            "best_subset": np.sort(best.subset),
            "mode": self._mode(),
            "tiles_read": tiles_read,
            "seconds": time.perf_counter() - t0,
        }

    def release(self) -> None:
        """Drop the held matrix (the images stay: the next flow run is likely on the same data)."""
        self._matrix = None
        self._matrix_key = None
