"""The ``reduce`` flow: DRMI on Ray actors with every artefact in object storage (SPEC sections 1-2).

Stages:

1. plan the upper-triangle tiles of the MI matrix; tiles already committed for the same
   (dataset fingerprint, bins, normalisation, tile size) are reused, the rest are fanned out
   over a pool of :class:`actors.reduction.MITileWorker` actors sized to the cluster;
2. restarts (every start vertex, or a seeded sample) are split into chunks and fanned out over
   a pool of :class:`actors.reduction.RestartWorker` actors;
3. the best (lowest H, then lowest start) subset is written with H and every restart's summary,
   published by a manifest written last, and shown as a Prefect table artifact.

The starts and the tie-break are those of :func:`obliviate.reduction.drmi.drmi_reduce`, and the stored
tiles reassemble exactly the floats of :func:`obliviate.reduction.mi.mi_matrix`, so the result equals the
in-process one for the same seed: same subset, same H.

Ray must be initialised once beforehand (:func:`flows.runtime.ensure_ray`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from actors.reduction import MITileWorker, RestartWorker
from flows.artifacts import publish_table, reduction_lines, reduction_rows, reduction_title
from flows.progress import report
from obliviate.data import load_dataset
from obliviate.errors import ConfigError
from obliviate.reduction.drmi import Aggregate, choose_starts
from obliviate.reduction.tiling import TilePlan, TileSpec
from storage.objects import ObjectStore
from storage.tiles import DIAGONAL, PLAN, matrix_prefix, stored_tiles

DEFAULT_TILE_SIZE = 512
DENSE_RESTART_LIMIT_BYTES = 2 * 1024**3
CHUNKS_PER_WORKER = 4


def result_key(*, fingerprint: str, bins: int, normalize: bool, k: int, starts: int | None, seed: int) -> str:
    """Folder of one reduction's result inside the store."""
    sample = "" if starts is None else f"-s{starts}-seed{seed}"
    return f"reduce-{fingerprint}-b{bins}{'n' if normalize else ''}-k{k}{sample}"


def restart_memory_bytes(plan: TilePlan, *, k: int, limit_mb: float | None) -> int:
    """Matrix bytes a restart worker may hold: the whole matrix if it fits the limit, else O(n k)."""
    if limit_mb is not None:
        return max(int(limit_mb * 1024**2), plan.band_bytes)
    if plan.dense_bytes <= DENSE_RESTART_LIMIT_BYTES:
        return plan.dense_bytes
    return max(plan.band_bytes, k * plan.n * 4)


class WorkerSlots:
    """``size`` CPU slots of ``threads`` CPUs each, reserved as one Ray placement group.

    Stage actors run in these slots one stage after another: a tile actor holds its slot's CPUs
    while it computes; the restart actor of the same slot is started early with no CPUs of its
    own (it idles until the tile actors are gone), so its start-up overlaps the tile stage.
    """

    def __init__(self, size: int, threads: int, *, timeout: float = 120.0) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.size = size
        self.threads = threads
        self._group = placement_group([{"CPU": threads}] * size, strategy="SPREAD")
        ready, _ = ray.wait([self._group.ready()], timeout=timeout)
        if not ready:
            self.close()
            raise ConfigError(
                f"the Ray cluster could not reserve {size} workers x {threads} CPUs within {timeout:.0f} s "
                f"(it has {ray.cluster_resources().get('CPU', 0):.0f} CPUs); lower --workers."
            )

    def options(self, slot: int, *, busy: bool) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(placement_group=self._group, placement_group_bundle_index=slot)
        return {"num_cpus": self.threads if busy else 0, "scheduling_strategy": strategy}

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self._group)


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
    images: np.ndarray,
    store: ObjectStore,
    prefix: str,
    plan: TilePlan,
    tiles: list[TileSpec],
    *,
    levels: int,
    bins: int,
    normalize: bool,
    write_meta: dict[str, Any] | None,
    slots: WorkerSlots,
) -> dict[str, Any]:
    """Fan the missing tiles out over a pool of tile actors; each commits its tile to storage.

    With ``write_meta``, the diagonal and then ``plan.json`` (last, it marks the matrix folder
    usable) are written too.
    """
    import ray
    from ray.util import ActorPool

    logger = get_run_logger()
    t0 = time.perf_counter()
    if not tiles and write_meta is None:
        report("tiles", 0, 0)
        return {"computed": 0, "seconds": 0.0, "compute_seconds": 0.0, "workers": 0}
    pool_size = max(1, min(slots.size, len(tiles)))
    images_ref = ray.put(np.ascontiguousarray(images))
    remote_cls = ray.remote(MITileWorker)
    actors = [
        remote_cls.options(**slots.options(i, busy=True)).remote(
            images_ref, store, prefix, levels=levels, bins=bins, normalize=normalize, threads=slots.threads
        )
        for i in range(pool_size)
    ]
    # Largest tiles first, so the pool does not end waiting on one big straggler.
    ordered = sorted(tiles, key=lambda t: -t.pairs)
    compute_seconds = 0.0
    step = max(1, len(ordered) // 10)
    try:
        if write_meta is not None:
            store.put_array(f"{prefix}/{DIAGONAL}", ray.get(actors[0].diagonal.remote()))
            store.put_json(f"{prefix}/{PLAN}", {"n": plan.n, "tile_size": plan.tile_size, **write_meta})
        pool = ActorPool(actors)
        for done, outcome in enumerate(pool.map_unordered(lambda a, t: a.compute.remote(t), ordered), start=1):
            compute_seconds += outcome["compute_seconds"]
            report("tiles", done, len(ordered))
            if done % step == 0 or done == len(ordered):
                logger.info("tiles %d/%d committed (%.1f s)", done, len(ordered), time.perf_counter() - t0)
    finally:
        for actor in actors:
            ray.kill(actor)
    return {
        "computed": len(ordered),
        "seconds": time.perf_counter() - t0,
        "compute_seconds": compute_seconds,
        "workers": pool_size,
    }


@task(name="run-restarts", cache_policy=NO_CACHE)
def run_restart_stage(actors: list[Any], starts: np.ndarray, *, k: int, aggregate: str) -> dict[str, Any]:
    """Fan restarts out over the restart actors and keep the best (H, then start vertex)."""
    from ray.util import ActorPool

    logger = get_run_logger()
    t0 = time.perf_counter()
    chunks = [c for c in np.array_split(starts, len(actors) * CHUNKS_PER_WORKER) if c.size]
    outcomes: list[dict[str, Any]] = []
    done = 0
    pool = ActorPool(actors)
    for outcome in pool.map_unordered(lambda a, c: a.run.remote(c.tolist(), k=k, aggregate=aggregate), chunks):
        outcomes.append(outcome)
        done += len(outcome["restarts"])
        report("restarts", done, len(starts))
        logger.info(
            "restarts %d/%d done (%s rows, %.1f s)", done, len(starts), outcome["mode"], time.perf_counter() - t0
        )
    best = min(outcomes, key=lambda o: (o["best_h"], o["best_start"]))
    by_start = {r["start"]: r for o in outcomes for r in o["restarts"]}
    return {
        "best_start": best["best_start"],
        "h": best["best_h"],
        "subset": best["best_subset"],
        "restarts": [by_start[int(s)] for s in starts],
        "mode": best["mode"],
        "workers": len(actors),
        "seconds": time.perf_counter() - t0,
        "load_seconds": max(o["load_seconds"] for o in outcomes),
    }


@task(name="publish-result", cache_policy=NO_CACHE)
def publish_result(
    store: ObjectStore, key: str, subset: np.ndarray, summary: dict[str, Any], restarts: list[dict[str, Any]]
) -> str:
    """Write subset, per-restart summary and summary, then the manifest that publishes them."""
    members = {
        "subset": store.put_array(f"{key}/subset.npy", np.asarray(subset, dtype=np.int64)),
        "restarts": store.put_json(f"{key}/restarts.json", restarts),
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
            **{name: store.uri(f"{key}/{name}") for name in ("summary.json", "subset.npy", "restarts.json")},
        },
    )
    return store.uri(key)


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
) -> dict[str, Any]:
    """Choose the k least mutually informative images of ``data`` on Ray, results in ``store_url``.

    Args:
        data: dataset name or path (see :func:`obliviate.data.load_dataset`).
        k: subset size.
        store_url: ``file://...`` or ``s3://bucket/prefix``.
        bins: gray levels counted by MI (SPEC default 256).
        normalize: normalised MI.
        starts: ``None`` for one restart per image, else this many seeded start vertices.
        seed: seeds the start sample (as ``np.random.default_rng(seed)`` in-process).
        workers: actors per stage; ``None`` = the cluster's CPUs / ``threads_per_worker``.
        tile_size: tile side.
        aggregate: greedy's fold, ``"sum"`` or ``"max"``.
        restart_memory_mb: matrix memory a restart worker may hold; default the whole matrix up
            to 2 GiB, else O(n k) streamed row bands.
        threads_per_worker: numba threads (and Ray CPUs) per actor.
        tiles_only: stop after the tile stage (precompute or extend a stored matrix).

    Returns:
        the summary written to storage, plus ``result_url``.
    """
    from flows.runtime import cluster_cpus

    logger = get_run_logger()
    t_flow = time.perf_counter()
    aggregate = Aggregate(aggregate).value
    dataset = load_dataset(data)
    n = len(dataset)
    if not 2 <= k < n:
        raise ConfigError(f"k must satisfy 2 <= k < n={n}; got k={k}. Choose a smaller subset or a larger pool.")
    if threads_per_worker < 1:
        raise ConfigError(f"threads_per_worker must be at least 1; got {threads_per_worker}.")
    pool = workers if workers else max(1, cluster_cpus() // threads_per_worker)
    store = ObjectStore(store_url)
    store.ensure_container()
    plan = TilePlan(n=n, tile_size=tile_size)
    prefix = matrix_prefix(fingerprint=dataset.fingerprint, bins=bins, normalize=normalize, tile_size=tile_size)
    logger.info(
        "reduce %s: n=%d, k=%d, bins=%d, normalize=%s, %d workers x %d threads, store %s",
        dataset.name,
        n,
        k,
        bins,
        normalize,
        pool,
        threads_per_worker,
        store.url,
    )

    missing, has_meta = plan_tiles(store, prefix, plan)
    start_vertices = choose_starts(n, num_starts=starts, rng=np.random.default_rng(seed))
    memory = restart_memory_bytes(plan, k=k, limit_mb=restart_memory_mb)
    slots = WorkerSlots(pool, threads_per_worker)
    restart_actors: list[Any] = []
    try:
        import ray

        remote_restart = ray.remote(RestartWorker)
        restart_actors = (
            []
            if tiles_only
            else [
                remote_restart.options(**slots.options(i, busy=False)).remote(
                    store, prefix, memory_bytes=memory, threads=threads_per_worker
                )
                for i in range(min(pool, len(start_vertices)))
            ]
        )
        meta = None if has_meta else {"fingerprint": dataset.fingerprint, "bins": bins, "normalize": normalize}
        tiles = compute_tiles(
            dataset.images,
            store,
            prefix,
            plan,
            missing,
            levels=dataset.levels,
            bins=bins,
            normalize=normalize,
            write_meta=meta,
            slots=slots,
        )
        if tiles_only:
            return {
                "data": dataset.name,
                "fingerprint": dataset.fingerprint,
                "n": n,
                "tile_size": tile_size,
                "tiles_total": plan.num_tiles,
                "tiles_computed": tiles["computed"],
                "tiles_reused": plan.num_tiles - tiles["computed"],
                "tiles_url": store.uri(prefix),
                "stored_bytes": plan.stored_bytes,
                "workers": pool,
                "tile_seconds": round(tiles["seconds"], 3),
                "tile_compute_seconds": round(tiles["compute_seconds"], 3),
                "flow_seconds": round(time.perf_counter() - t_flow, 3),
            }
        restarts = run_restart_stage(restart_actors, start_vertices, k=k, aggregate=aggregate)
    finally:
        for actor in restart_actors:
            ray.kill(actor)
        slots.close()

    key = result_key(fingerprint=dataset.fingerprint, bins=bins, normalize=normalize, k=k, starts=starts, seed=seed)
    subset = np.asarray(restarts["subset"], dtype=np.int64)
    histogram = np.bincount(dataset.labels[subset], minlength=dataset.num_classes)
    summary = {
        "data": dataset.name,
        "fingerprint": dataset.fingerprint,
        "n": n,
        "k": k,
        "bins": bins,
        "normalize": normalize,
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
        "workers": pool,
        "threads_per_worker": threads_per_worker,
        "restart_mode": restarts["mode"],
        "restart_memory_bytes": memory,
        "tile_seconds": round(tiles["seconds"], 3),
        "restart_seconds": round(restarts["seconds"], 3),
        "restart_load_seconds": round(restarts["load_seconds"], 3),
    }
    url = publish_result(store, key, subset, summary, restarts["restarts"])
    summary["flow_seconds"] = round(time.perf_counter() - t_flow, 3)
    logger.info(
        "H = %.4f over %d restarts (best start %d); result at %s",
        summary["h"],
        summary["restarts"],
        summary["best_start"],
        url,
    )
    return {**summary, "result_url": url, "result_key": key}
