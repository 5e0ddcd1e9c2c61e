"""The ``reduce`` flow: DRMI on Ray actors with every artefact in object storage (SPEC sections 1-2).

Stages:

1. plan the upper-triangle tiles of the MI matrix; tiles already committed for the same
   (dataset fingerprint, bins, normalisation, tile size) are reused, the rest are fanned out
   over warm :class:`actors.reduction.ReductionWorker` actors (:class:`WorkerPool`, one pool
   for every stage and run of this process), which read the images prepared once here from
   Ray's object store, zero-copy, and commit each tile to storage;
2. restarts (every start vertex, or a seeded sample) are split into chunks and fanned out over
   the same workers: when the matrix fits, it is assembled once here (computed tiles arrive
   through the object store, reused ones from storage) and put once, and every worker reads it
   zero-copy, copying it once into its own memory (huge pages: restarts run faster there);
   otherwise each worker streams single rows from the stored tiles;
3. the best (lowest H, then lowest start) subset is written with H and every restart's summary,
   published by a manifest written last, and shown as a Prefect table artifact.

Storage outages are waited out (:class:`actors.reduction.RetryingStore`, up to 300 s of
back-off): the workers' tile writes and row reads and this flow's own reads and writes retry
while the store is unreachable, and the flow logs a warning meanwhile, so one blip does not
throw the tiles computed so far away.

Progress: the tile and restart stages report ``tiles`` and ``restarts`` (done / total) through
:func:`flows.progress.report` as each tile or chunk of restarts finishes, and log a line at
every tenth of the work (:class:`flows.progress.ProgressLines`: not within a second of the last line, so
a stage of milliseconds logs only its end) and at least every :data:`flows.progress.PROGRESS_LOG_SECONDS`
while work finishes.

The summary's ``stages`` give the seconds of each part (scheduling, actor start, data
preparation, object-store transfer, compute and storage write per worker, stage wall times).

The starts and the tie-break are those of :func:`obliviate.reduction.drmi.drmi_reduce`, and the stored
tiles reassemble exactly the floats of :func:`obliviate.reduction.mi.mi_matrix`, so the result equals the
in-process one for the same seed: same subset, same H.

Ray must be initialised once beforehand (:func:`flows.runtime.ensure_ray`).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from actors.reduction import STORAGE_RETRY_DEADLINE_S, ReductionWorker, RetryingStore
from flows.artifacts import SUBSET_PLOT, publish_table, reduction_lines, reduction_rows, reduction_title, subset_plot
from flows.progress import ProgressLines, report
from flows.runtime import _local_session_dirs
from obliviate.data import GrayMode, load_dataset
from obliviate.errors import ConfigError, named_choice
from obliviate.reduction.drmi import Aggregate, check_subset_size, choose_starts
from obliviate.reduction.mi import PreparedImages, check_bins, prepare_images
from obliviate.reduction.tiling import TilePlan, TileSpec
from storage.errors import CorruptObject, ObjectNotFound
from storage.objects import ObjectStore
from storage.tiles import (
    DIAGONAL,
    PLAN,
    TiledMatrix,
    drop_matrix_object,
    matrix_prefix,
    place_tile,
    stored_tiles,
    tile_key,
)

DEFAULT_TILE_SIZE = 512
DEFAULT_BINS = 256
DENSE_RESTART_LIMIT_BYTES = 2 * 1024**3
CHUNKS_PER_WORKER = 8
# Below this side a tile's compute (about 500 pairs) costs less than storing it as an object
# with its checksum and scheduling it on a worker: the run becomes overhead.
MIN_TILE_SIZE = 32
# Each tile is a store object plus its checksum and one worker call; past this count the store
# listing and the scheduler, not MI, set the run's pace (60,000 images at 2,048 make 465).
MAX_RUN_TILES = 100_000


def exact_bins(bins: int, *, levels: int) -> int:
    """``bins``, or the default 256 when it is at least the data's ``levels``.

    Counting at ``bins >= levels`` keeps every gray level apart, so MI is the same floats as at
    256; using 256 then shares the default's stored tiles and result folder instead of keying the
    same matrix under a second name and computing it again.
    """
    return DEFAULT_BINS if bins >= levels else bins


def check_tile_size(tile_size: int, *, n: int, run: bool = True) -> None:
    """Refuse a ``--tile-size`` that is too small, or (for a run) that cuts ``n`` images into too many tiles.

    Args:
        tile_size: the tile side asked for.
        n: pool size.
        run: whether tiles will be stored; ``--plan`` only does arithmetic, so it is not held to
            the tile count.
    """
    if tile_size < MIN_TILE_SIZE:
        raise ConfigError(
            f"--tile-size must be at least {MIN_TILE_SIZE}; got {tile_size}. A smaller tile costs more to store and "
            f"schedule than to compute (side 1 would cut {n:,} images into {n * (n + 1) // 2:,} tiles). Pass "
            f"--tile-size {MIN_TILE_SIZE} or more, or leave it unset for the default {DEFAULT_TILE_SIZE}."
        )
    tiles = TilePlan(n=n, tile_size=tile_size).num_tiles if n >= 2 else 1
    if run and tiles > MAX_RUN_TILES:
        most_blocks = int((math.isqrt(8 * MAX_RUN_TILES + 1) - 1) // 2)  # b (b + 1) / 2 <= MAX_RUN_TILES
        smallest = -(-n // most_blocks)
        raise ConfigError(
            f"--tile-size {tile_size} cuts {n:,} images into {tiles:,} tiles; a run stores at most "
            f"{MAX_RUN_TILES:,} (each is a store object with its checksum and a worker call, so more would spend the "
            f"run on overhead). Raise --tile-size to at least {smallest}."
        )


def check_start_count(starts: int | None, *, n: int) -> None:
    """Refuse a ``--starts`` outside ``1..n`` (one start vertex per image at most)."""
    if starts is not None and not 1 <= starts <= n:
        raise ConfigError(
            f"--starts must be in 1..{n} (seeded start vertices, at most one per image of the pool); got {starts}. "
            f"Pass a count in that range, or leave --starts unset for one restart from every image."
        )


def result_key(
    *, fingerprint: str, bins: int, normalize: bool, k: int, starts: int | None, seed: int, aggregate: str = "sum"
) -> str:
    """Folder of one reduction's result inside the store.

    ``-gmax`` is appended for greedy's ``max`` fold, so its subset does not overwrite the default's
    (``sum`` keeps the folder name it always had). The gray mode needs no part: it changes the images
    of colour data, hence the fingerprint, and changes nothing for gray data.
    """
    sample = "" if starts is None else f"-s{starts}-seed{seed}"
    fold = "" if Aggregate(aggregate) is Aggregate.SUM else f"-g{Aggregate(aggregate).value}"
    return f"reduce-{fingerprint}-b{bins}{'n' if normalize else ''}-k{k}{sample}{fold}"


def restart_memory_bytes(plan: TilePlan, *, k: int, limit_mb: float | None) -> int:
    """Matrix bytes a restart worker may hold: the whole matrix if it fits the limit, else O(n k)."""
    # inf passes "> 0" and nan fails every comparison: both must be refused before int() meets them.
    if limit_mb is not None and not (math.isfinite(limit_mb) and limit_mb > 0):
        raise ConfigError(
            f"--restart-memory-mb is the MiB of matrix one restart worker may hold and must be a positive, finite "
            f"number; got {limit_mb}. Pass a size such as 512, or leave it unset for the whole matrix up to 2 GiB."
        )
    if limit_mb is not None:
        return max(int(limit_mb * 1024**2), plan.band_bytes)
    if plan.dense_bytes <= DENSE_RESTART_LIMIT_BYTES:
        return plan.dense_bytes
    return max(plan.band_bytes, k * plan.n * 4)


#: How long a run waits for the Ray cluster to reserve its workers' CPUs (an autoscaling cluster adds nodes meanwhile).
SLOT_WAIT_S = 120.0
#: How often that wait says what it waits for.
SLOT_NOTICE_EVERY_S = 15.0


class WorkerSlots:
    """``size`` CPU slots of ``threads`` CPUs each, reserved as one Ray placement group.

    The reservation is Ray's accounting for the CPUs a flow run's stages use: it is taken at the
    start of a run and returned at its end, so other Ray work waits for those CPUs meanwhile
    instead of oversubscribing them. The warm workers themselves (:class:`WorkerPool`) hold no
    CPUs between runs.

    Args:
        size: workers.
        threads: CPUs per worker.
        timeout: seconds to wait for the reservation (default :data:`SLOT_WAIT_S`).
        grows: whether the cluster may add CPUs while the run waits; a local runtime never does, nor a joined
            cluster without an autoscaler, so a reservation beyond its CPUs is refused at once instead of after
            ``timeout``.
        joined: the cluster is one this process joined (said in the refusal with its fix), not a local runtime.
        say: where the wait's notices go, every :data:`SLOT_NOTICE_EVERY_S` (the run's log).
    """

    def __init__(
        self,
        size: int,
        threads: int,
        *,
        timeout: float | None = None,
        grows: bool = True,
        joined: bool = False,
        say: Callable[[str], object] | None = None,
    ) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.size = size
        self.threads = threads
        timeout = SLOT_WAIT_S if timeout is None else timeout
        cpus = ray.cluster_resources().get("CPU", 0)
        if not grows and size * threads > cpus:
            if joined:
                fits = int(cpus) // threads
                fewer = f"lower --workers to at most {fits}" if fits else f"use fewer than {threads} threads per worker"
                raise ConfigError(
                    f"the Ray cluster could not reserve {size} workers x {threads} CPUs ({size * threads} CPUs): it "
                    f"has {cpus:.0f} CPUs and no autoscaler (it was started by `ray start` without an autoscaling "
                    f"config), so it never grows and this was refused at once instead of after {timeout:.0f} s of "
                    f"waiting; {fewer}, or run on a cluster that autoscales (`ray up cluster.yaml`)."
                )
            raise ConfigError(
                f"the Ray cluster could not reserve {size} workers x {threads} CPUs: it has {cpus:.0f} CPUs and, a "
                "local runtime, never grows, so this was refused at once; lower --workers."
            )
        self._group = placement_group([{"CPU": threads}] * size, strategy="SPREAD")
        ready_ref = self._group.ready()
        started = time.monotonic()
        gives_up = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + timeout))
        while True:
            waited = time.monotonic() - started
            ready, _ = ray.wait([ready_ref], timeout=max(0.0, min(SLOT_NOTICE_EVERY_S, timeout - waited)))
            if ready:
                return
            waited = time.monotonic() - started
            if waited >= timeout:
                break
            if say is not None:
                # A placement group is placed whole: until then none of its workers is.
                say(
                    f"waiting for the Ray cluster to reserve {size} workers x {threads} CPUs: 0 of {size} placed "
                    f"after {waited:.0f} s (it has {ray.cluster_resources().get('CPU', 0):.0f} CPUs, "
                    f"{ray.available_resources().get('CPU', 0):.0f} free); waiting for more CPUs (an autoscaling "
                    f"cluster adds nodes) until {gives_up} ({timeout:.0f} s), then giving up."
                )
        self.close()
        raise ConfigError(
            f"the Ray cluster could not reserve {size} workers x {threads} CPUs within {timeout:.0f} s "
            f"(it has {ray.cluster_resources().get('CPU', 0):.0f} CPUs); lower --workers."
        )

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self._group)


class WorkerPool:
    """Warm :class:`actors.reduction.ReductionWorker` actors, kept for the Ray runtime's life.

    One pool per thread count serves both stages of a run and every later run in the same
    process: the worker processes start, import and load their compiled kernels once. A run
    that asks for more workers than the pool holds grows it; one that asks for fewer uses the
    first ones. Use :meth:`get`; :func:`release_pools` stops them.
    """

    _pools: ClassVar[dict[tuple[str, int], WorkerPool]] = {}

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.actors: list[Any] = []

    def grow(self, size: int) -> None:
        import ray

        remote_cls = ray.remote(ReductionWorker)
        # No CPUs of their own (the run's WorkerSlots reserve them); SPREAD over the nodes.
        fresh = [
            remote_cls.options(num_cpus=0, scheduling_strategy="SPREAD").remote(threads=self.threads)
            for _ in range(size - len(self.actors))
        ]
        ray.get([a.ready.remote() for a in fresh])
        self.actors.extend(fresh)

    @classmethod
    def get(cls, size: int, threads: int) -> tuple[list[Any], bool]:
        """``size`` warm workers of ``threads`` threads, started if needed; and whether all were warm."""
        import ray

        key = (ray.get_runtime_context().get_job_id(), threads)
        pool = cls._pools.get(key)
        if pool is not None:
            try:
                ray.get([a.ready.remote() for a in pool.actors], timeout=60)
            except Exception:  # noqa: BLE001 - a dead worker: start a fresh pool
                pool.close()
                pool = None
        if pool is None:
            pool = cls._pools[key] = cls(threads)
        warm = len(pool.actors) >= size
        if not warm:
            pool.grow(size)
        return pool.actors[:size], warm

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        for key in [k for k, v in self._pools.items() if v is self]:
            del self._pools[key]


def release_pools() -> None:
    """Stop every warm reduction worker of this process (they also stop with the Ray runtime)."""
    for pool in list(WorkerPool._pools.values()):
        pool.close()


def fan_out(actors: list[Any], call: Any, items: list[Any], *, in_flight: int = 2) -> Any:
    """Yield ``call(actor, item)`` results as they finish, keeping ``in_flight`` calls queued per actor.

    A queued call starts the moment the worker's previous one ends, so no worker waits for a
    round trip through the driver between items.
    """
    import ray

    pending: dict[Any, Any] = {}
    queue = list(reversed(items))
    for actor in actors:
        for _ in range(in_flight):
            if queue:
                pending[call(actor, queue.pop())] = actor
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        actor = pending.pop(ref)
        if queue:
            pending[call(actor, queue.pop())] = actor
        yield ray.get(ref)


@task(name="plan-tiles", cache_policy=NO_CACHE)
def plan_tiles(store: ObjectStore, prefix: str, plan: TilePlan) -> tuple[list[TileSpec], bool]:
    """The tiles not yet in storage, and whether the matrix's plan and diagonal are stored."""
    logger = get_run_logger()
    done = stored_tiles(store, prefix, plan)
    missing = [t for t in plan.tiles() if t not in done]
    logger.info(
        "tile plan: n=%d, tile %d, %d tiles (%d pairs, %.1f MB); %d reused from %s, %d to compute",
        plan.n,
        plan.tile_size,
        plan.num_tiles,
        plan.pairs,
        plan.stored_bytes / 1e6,
        len(done),
        store.uri(prefix),
        len(missing),
    )
    return missing, store.exists(f"{prefix}/{PLAN}")


@task(name="compute-tiles", cache_policy=NO_CACHE)
def compute_tiles(
    prepared: PreparedImages,
    images_key: str,
    store: ObjectStore,
    prefix: str,
    plan: TilePlan,
    tiles: list[TileSpec],
    *,
    normalize: bool,
    write_meta: dict[str, Any] | None,
    actors: list[Any],
    dense: np.ndarray | None,
) -> dict[str, Any]:
    """Fan the missing tiles out over the warm pool; each worker commits its tile to storage.

    The prepared images go into Ray's object store once and every worker reads them zero-copy.
    With ``write_meta``, the diagonal and then ``plan.json`` (last, it marks the matrix folder
    usable) are written too. With ``dense``, each computed tile is also placed into that matrix.
    """
    import ray

    logger = get_run_logger()
    t0 = time.perf_counter()
    if not tiles and write_meta is None:
        report("tiles", 0, 0)
        return {"computed": 0, "seconds": 0.0, "compute_seconds": 0.0, "write_seconds": 0.0, "transfer_seconds": 0.0}
    images_ref = ray.put(prepared)
    ray.get([a.use_images.remote(images_key, images_ref) for a in actors])
    transfer = time.perf_counter() - t0
    write_seconds = 0.0
    if write_meta is not None:
        t_meta = time.perf_counter()
        diagonal = prepared_diagonal(prepared, normalize=normalize)
        store.put_array(f"{prefix}/{DIAGONAL}", diagonal)
        store.put_json(f"{prefix}/{PLAN}", {"n": plan.n, "tile_size": plan.tile_size, **write_meta})
        write_seconds += time.perf_counter() - t_meta
    # Largest tiles first, so the pool does not end waiting on one big straggler.
    ordered = sorted(tiles, key=lambda t: -t.pairs)
    compute_seconds = 0.0
    lines = ProgressLines(len(ordered))
    want_values = dense is not None
    report("tiles", 0, len(ordered))  # the bar shows from the start, not after the first tile

    def call(actor: Any, tile: TileSpec) -> Any:
        return actor.compute.remote(
            tile, key=images_key, store=store, prefix=prefix, normalize=normalize, return_values=want_values
        )

    place_seconds = 0.0
    for done, outcome in enumerate(fan_out(actors, call, ordered), start=1):
        compute_seconds += outcome["compute_seconds"]
        write_seconds += outcome["write_seconds"]
        if outcome.get("storage_retries"):
            logger.warning(
                "tile %s: storage was unreachable; the worker retried its write %d time(s) and it is committed",
                outcome["key"].rsplit("/", 1)[-1],
                outcome["storage_retries"],
            )
        if dense is not None:
            t_place = time.perf_counter()
            place_tile(dense, outcome["tile"], outcome["values"])
            place_seconds += time.perf_counter() - t_place
        report("tiles", done, len(ordered))
        if lines.due(done):
            logger.info("tiles %d/%d committed (%.1f s)", done, len(ordered), time.perf_counter() - t0)
    return {
        "computed": len(ordered),
        "seconds": time.perf_counter() - t0,
        "compute_seconds": compute_seconds,
        "write_seconds": write_seconds,
        "transfer_seconds": transfer + place_seconds,
    }


def prepared_diagonal(prepared: PreparedImages, *, normalize: bool) -> np.ndarray:
    """``I[x][x]``: the image entropies, or ones when normalised (as :func:`obliviate.reduction.mi.mi_matrix`)."""
    if normalize:
        return np.ones(prepared.n, dtype=np.float32)
    return prepared.entropy.astype(np.float32)


@task(name="run-restarts", cache_policy=NO_CACHE)
def run_restart_stage(
    actors: list[Any],
    matrix_key: str,
    dense: np.ndarray | None,
    starts: np.ndarray,
    *,
    store: ObjectStore,
    prefix: str,
    memory_bytes: int,
    k: int,
    aggregate: str,
) -> dict[str, Any]:
    """Fan restarts out over the warm pool and keep the best (H, then start vertex).

    A dense matrix is put into Ray's object store once and read zero-copy by every worker;
    without one, each worker streams rows from the stored tiles within ``memory_bytes``.
    """
    import ray

    logger = get_run_logger()
    t0 = time.perf_counter()
    matrix_ref = ray.put(dense) if dense is not None else None
    held = ray.get(
        [
            a.use_matrix.remote(matrix_key, matrix_ref, store=store, prefix=prefix, memory_bytes=memory_bytes)
            for a in actors
        ]
    )
    del matrix_ref  # the workers hold it now; it leaves the object store when they release it
    transfer = time.perf_counter() - t0
    chunks = [c.tolist() for c in np.array_split(starts, len(actors) * CHUNKS_PER_WORKER) if c.size]
    outcomes: list[dict[str, Any]] = []
    done = 0
    lines = ProgressLines(len(starts))
    report("restarts", 0, len(starts))

    def call(actor: Any, chunk: list[int]) -> Any:
        return actor.run.remote(chunk, key=matrix_key, k=k, aggregate=aggregate)

    try:
        for outcome in fan_out(actors, call, chunks):
            outcomes.append(outcome)
            done += len(outcome["restarts"])
            report("restarts", done, len(starts))
            # One chunk per line would be workers x CHUNKS_PER_WORKER lines: hundreds on a cluster.
            if lines.due(done):
                logger.info(
                    "restarts %d/%d done (%s rows, %.1f s)",
                    done,
                    len(starts),
                    outcome["mode"],
                    time.perf_counter() - t0,
                )
    finally:
        ray.get([a.release.remote() for a in actors])
    best = min(outcomes, key=lambda o: (o["best_h"], o["best_start"]))
    by_start = {r["start"]: r for o in outcomes for r in o["restarts"]}
    return {
        "best_start": best["best_start"],
        "h": best["best_h"],
        "subset": best["best_subset"],
        "restarts": [by_start[int(s)] for s in starts],
        "mode": held[0]["mode"],
        "workers": len(actors),
        "seconds": time.perf_counter() - t0,
        "transfer_seconds": transfer,
        "compute_seconds": sum(o["seconds"] for o in outcomes),
        "tiles_read": sum(o["tiles_read"] for o in outcomes),
    }


@task(name="publish-result", cache_policy=NO_CACHE)
def publish_result(
    store: ObjectStore,
    key: str,
    subset: np.ndarray,
    summary: dict[str, Any],
    restarts: list[dict[str, Any]],
    *,
    plot: bytes,
    stages: dict[str, float],
    t_flow: float,
) -> tuple[str, dict[str, Any]]:
    """Write subset, per-restart summary, plot (``subset.png``, :func:`flows.artifacts.subset_plot`) and summary,
    then the manifest that publishes them.

    The stored summary gets ``stages`` (with ``storage_write_publish``: the subset, per-restart
    records and plot, the bulk of the write) and ``flow_seconds`` (from ``t_flow``, a ``time.perf_counter()``
    at the flow's start, to the summary's write), so the file holds the timings the run returns.

    Returns:
        the result's URL and the summary as stored.
    """
    t_publish = time.perf_counter()
    subset_member = store.put_array(f"{key}/subset.npy", np.asarray(subset, dtype=np.int64))
    restarts_member = store.put_json(f"{key}/restarts.json", restarts)
    plot_member = store.put_bytes(f"{key}/{SUBSET_PLOT}", plot)
    stages = {**stages, "storage_write_publish": time.perf_counter() - t_publish}
    summary = {
        **summary,
        "stages": {name: round(value, 3) for name, value in stages.items()},
        "flow_seconds": round(time.perf_counter() - t_flow, 3),
    }
    members = {
        "subset": subset_member,
        "restarts": restarts_member,
        "plot": plot_member,
        "summary": store.put_json(f"{key}/summary.json", summary),
    }
    store.commit_manifest(f"{key}/manifest.json", members, {"kind": "drmi-reduction", "h": summary["h"]})
    best = sorted(restarts, key=lambda r: (r["h"], r["start"]))[:10]
    publish_table(
        key="drmi-reduction",
        title=reduction_title(summary),
        rows=reduction_rows(best),
        lines=reduction_lines(summary),
        links={
            "result": store.uri(key),
            **{
                name: store.uri(f"{key}/{name}")
                for name in ("summary.json", "subset.npy", SUBSET_PLOT, "restarts.json")
            },
        },
    )
    return store.uri(key), summary


def _deleted_damaged_tiles(error: BaseException, store: ObjectStore, prefix: str, plan: TilePlan) -> bool:
    """After a stage failed on a damaged object: delete every stored tile whose bytes fail their checksum.

    Tiles are a cache of the MI matrix, so a damaged one is computed again rather than reported as
    a dead end. Returns whether the failure was such damage and some tile was deleted.
    """
    cause: BaseException | None = error
    for _ in range(10):  # a RayTaskError holds the worker's error as its cause
        if cause is None or isinstance(cause, CorruptObject):
            break
        cause = getattr(cause, "cause", None) or cause.__cause__
    if not isinstance(cause, CorruptObject):
        return False
    damaged = []
    for key in [tile_key(prefix, tile) for tile in plan.tiles()] + [f"{prefix}/{DIAGONAL}", f"{prefix}/{PLAN}"]:
        try:
            store.get_bytes(key)
        except CorruptObject:
            damaged.append(key)
        except ObjectNotFound:
            continue
    for key in damaged:
        drop_matrix_object(store, key)
    if damaged:
        get_run_logger().warning(
            "%d stored MI matrix object(s) under %s failed their checksum (%s); deleted and computed again",
            len(damaged),
            store.uri(prefix),
            ", ".join(sorted({key.rsplit("/", 1)[-1] for key in damaged})[:5]),
        )
    return bool(damaged)


@flow(name="reduce")
def reduce_flow(
    data: str = "mnist5k",
    k: int = 600,
    store_url: str = "file://./runs",
    bins: int = 256,
    normalize: bool = False,
    starts: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    aggregate: str = "sum",
    restart_memory_mb: float | None = None,
    threads_per_worker: int = 1,
    tiles_only: bool = False,
    gray: str = "luma",
) -> dict[str, Any]:
    """Choose the k least mutually informative images of ``data`` on Ray, results in ``store_url``.

    Args:
        data: dataset name or path (see :func:`obliviate.data.load_dataset`).
        k: subset size (not used, nor checked, with ``tiles_only``).
        store_url: ``file://...`` or ``s3://bucket/prefix``.
        bins: gray levels counted by MI (SPEC default 256); at or above the data's levels it is
            exact and is run as 256 (see :func:`exact_bins`).
        normalize: normalised MI.
        starts: ``None`` for one restart per image, else this many seeded start vertices.
        seed: seeds the start sample (as ``np.random.default_rng(seed)`` in-process).
        workers: actors per stage; ``None`` = the cluster's CPUs / ``threads_per_worker``.
        tile_size: tile side.
        aggregate: greedy's fold, ``"sum"`` or ``"max"``.
        restart_memory_mb: matrix memory a restart worker may hold; default the whole matrix up
            to 2 GiB, else an LRU cache of single rows read from the stored tiles (about k rows,
            O(n k); at least one row band's bytes).
        threads_per_worker: numba threads (and Ray CPUs) per actor.
        tiles_only: stop after the tile stage (precompute or extend a stored matrix).
        gray: how colour images become gray, ``"luma"`` or ``"mean"`` (SPEC section 1).

    Returns:
        the summary written to storage, plus ``result_url``.
    """
    from flows.runtime import cluster_autoscales, cluster_cpus

    logger = get_run_logger()
    t_flow = time.perf_counter()
    aggregate = named_choice(Aggregate, value=aggregate, what="aggregate", means="greedy's fold").value
    gray = named_choice(GrayMode, value=gray, what="gray", means="how colour images become gray").value
    dataset = load_dataset(data, gray=gray)
    load_seconds = time.perf_counter() - t_flow
    n = len(dataset)
    check_bins(levels=dataset.levels, bins=bins)
    bins = exact_bins(bins, levels=dataset.levels)
    if not tiles_only:  # k is a restart setting; storing tiles needs none
        check_subset_size(k, n=n)
    check_tile_size(tile_size, n=n, run=True)
    check_start_count(starts, n=n)
    if threads_per_worker < 1:
        raise ConfigError(f"threads_per_worker must be at least 1; got {threads_per_worker}.")
    pool_size = workers if workers else max(1, cluster_cpus() // threads_per_worker)

    def outage(attempt: int, err: Exception) -> None:
        if attempt == 1 or attempt % 5 == 0:
            logger.warning("%s (retrying for up to %.0f s, attempt %d)", err, STORAGE_RETRY_DEADLINE_S, attempt)

    store: ObjectStore = RetryingStore(store_url, on_retry=outage)  # every read and write waits out outages
    store.ensure_container()
    plan = TilePlan(n=n, tile_size=tile_size)
    prefix = matrix_prefix(fingerprint=dataset.fingerprint, bins=bins, normalize=normalize, tile_size=tile_size)
    logger.info(
        "reduce %s: n=%d, %s, bins=%d, normalize=%s, gray=%s, aggregate=%s, %d worker%s x %d thread%s, store %s",
        dataset.name,
        n,
        "tiles only" if tiles_only else f"k={k}",
        bins,
        normalize,
        gray,
        aggregate,
        pool_size,
        "" if pool_size == 1 else "s",
        threads_per_worker,
        "" if threads_per_worker == 1 else "s",
        store.url,
    )

    for attempt in (1, 2):  # a second attempt only after deleting damaged stored tiles (a cache)
        t_sched = time.perf_counter()
        missing, has_meta = plan_tiles(store, prefix, plan)
        start_vertices = choose_starts(n, num_starts=starts, rng=np.random.default_rng(seed))
        memory = restart_memory_bytes(plan, k=k, limit_mb=restart_memory_mb)
        dense_mode = not tiles_only and plan.dense_bytes <= memory
        # A local runtime this process started never grows; a joined cluster does only if it runs an autoscaler
        # (unknown counts as may: waiting SLOT_WAIT_S is then the cost of an honest "don't know").
        joined = not _local_session_dirs
        grows = joined and cluster_autoscales() is not False
        slots = WorkerSlots(pool_size, threads_per_worker, grows=grows, joined=joined, say=logger.info)
        scheduling = time.perf_counter() - t_sched
        try:
            t_pool = time.perf_counter()
            actors, warm = WorkerPool.get(pool_size, threads_per_worker)
            actor_start = time.perf_counter() - t_pool
            t_prep = time.perf_counter()
            meta = None if has_meta else {"fingerprint": dataset.fingerprint, "bins": bins, "normalize": normalize}
            needs_images = bool(missing) or meta is not None
            prepared = prepare_images(dataset.images, levels=dataset.levels, bins=bins) if needs_images else None
            preparation = load_seconds + time.perf_counter() - t_prep
            dense = np.zeros((n, n), dtype=np.float32) if dense_mode else None
            tiles = compute_tiles(
                prepared,
                f"{dataset.fingerprint}-l{dataset.levels}-b{bins}",
                store,
                prefix,
                plan,
                missing,
                normalize=normalize,
                write_meta=meta,
                actors=actors,
                dense=dense,
            )
            stages: dict[str, float] = {
                "scheduling": scheduling,
                "actor_start": actor_start,
                "data_preparation": preparation,
                "object_store_transfer": tiles["transfer_seconds"],
                "tile_compute_worker_seconds": tiles["compute_seconds"],
                "storage_write_worker_seconds": tiles["write_seconds"],
                "tile_stage_wall": tiles["seconds"],
            }
            if tiles_only:
                return {
                    "data": dataset.name,
                    "fingerprint": dataset.fingerprint,
                    "n": n,
                    "gray": gray,
                    "tile_size": tile_size,
                    "tiles_total": plan.num_tiles,
                    "tiles_computed": tiles["computed"],
                    "tiles_reused": plan.num_tiles - tiles["computed"],
                    "tiles_url": store.uri(prefix),
                    "stored_bytes": plan.stored_bytes,
                    "workers": pool_size,
                    "warm_pool": warm,
                    "tile_seconds": round(tiles["seconds"], 3),
                    "tile_compute_seconds": round(tiles["compute_seconds"], 3),
                    "stages": {name: round(value, 3) for name, value in stages.items()},
                    "flow_seconds": round(time.perf_counter() - t_flow, 3),
                }
            t_read = time.perf_counter()
            if dense is not None:
                stored = TiledMatrix(store, prefix, cache_bytes=0)
                computed = set(missing)
                for tile in plan.tiles():
                    if tile not in computed:
                        place_tile(dense, tile, stored.read_tile(tile))
                np.fill_diagonal(dense, stored.diagonal())
            stages["storage_read"] = time.perf_counter() - t_read
            restarts = run_restart_stage(
                actors,
                f"{prefix}#{uuid.uuid4().hex[:12]}",
                dense,
                start_vertices,
                store=store,
                prefix=prefix,
                memory_bytes=memory,
                k=k,
                aggregate=aggregate,
            )
            del dense
            stages["object_store_transfer"] += restarts["transfer_seconds"]
            stages["restart_compute_worker_seconds"] = restarts["compute_seconds"]
            stages["restart_stage_wall"] = restarts["seconds"]
        except Exception as err:
            if attempt == 2 or not _deleted_damaged_tiles(err, store, prefix, plan):
                raise
            continue
        finally:
            slots.close()
        break

    key = result_key(
        fingerprint=dataset.fingerprint,
        bins=bins,
        normalize=normalize,
        k=k,
        starts=starts,
        seed=seed,
        aggregate=aggregate,
    )
    subset = np.asarray(restarts["subset"], dtype=np.int64)
    histogram = np.bincount(dataset.labels[subset], minlength=dataset.num_classes)
    summary = {
        "data": dataset.name,
        "fingerprint": dataset.fingerprint,
        "n": n,
        "k": k,
        "bins": bins,
        "normalize": normalize,
        "gray": gray,
        "aggregate": aggregate,
        "seed": seed,
        "restarts": len(start_vertices),
        "best_start": int(restarts["best_start"]),
        "h": float(restarts["h"]),
        "class_histogram": histogram.tolist(),
        "tile_size": tile_size,
        "tiles_total": plan.num_tiles,
        "tiles_computed": tiles["computed"],
        "tiles_reused": plan.num_tiles - tiles["computed"],
        "tiles_url": store.uri(prefix),
        "workers": pool_size,
        "threads_per_worker": threads_per_worker,
        "warm_pool": warm,
        "restart_mode": restarts["mode"],
        "restart_memory_bytes": memory,
        "restart_tiles_read": restarts["tiles_read"],
        "tile_seconds": round(tiles["seconds"], 3),
        "restart_seconds": round(restarts["seconds"], 3),
    }
    restart_h = [r["h"] for r in restarts["restarts"]]
    plot = subset_plot(pool=dataset, subset=subset, restart_h=restart_h, title=reduction_title(summary))
    url, summary = publish_result(
        store, key, subset, summary, restarts["restarts"], plot=plot, stages=stages, t_flow=t_flow
    )
    logger.info(
        "H = %.4f over %d restarts (best start %d); result at %s",
        summary["h"],
        summary["restarts"],
        summary["best_start"],
        url,
    )
    return {**summary, "result_url": url, "result_key": key}
