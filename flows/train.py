"""The ``train`` flow: block-sequenced training on a Ray actor, checkpoints to storage, registry entry.

The flow plans the run (class-stratified train/held-out split of the dataset, SPEC section 4),
then one :class:`actors.chains.ChainWorker` trains it block by block: every checkpoint is
written as soon as it exists, so a killed worker (Ray restarts it and retries the call) or a
rerun of the flow continues after the last complete checkpoint. Version 1 is published with
the storage compare-and-swap pointer and the run is registered (sample ids per block, metrics).

Call ``ray.init`` once before (``flows.runtime.ensure_ray``); the flow reuses that runtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger

from actors.chains import ChainWorker, exclusions_key
from flows.artifacts import utc_text
from flows.progress import report
from obliviate.data import load_dataset
from obliviate.errors import ConfigError, ObliviateError
from obliviate.unlearning.config import DEFAULT_RECIPE, BlockTrainingConfig
from obliviate.unlearning.service import RunSpec, plan_run
from obliviate.unlearning.shards import make_shard_plan
from storage.errors import CorruptObject, StorageError, StorageUnavailable
from storage.lease import (
    DEFAULT_LEASE_S,
    ClaimHeld,
    LeaseKeeper,
    PointerClaim,
    holder_process_gone,
    release_claim,
    take_claim,
)
from storage.objects import ObjectStore
from storage.registry import TRAIN_CHAIN, RunRegistry, training_claim_key
from storage.retry import DEFAULT_RETRY_DEADLINE_S, RetryPolicy, retry_unavailable
from storage.serving import DatasetErasures, group_members

RAY_NAMESPACE = "obliviate"
#: How the training workers (:class:`actors.chains.ChainWorker`, its default ``retry_deadline_s``) retry outages.
WORKER_RETRY_POLICY = RetryPolicy(deadline_s=DEFAULT_RETRY_DEADLINE_S)


def remote_worker(store: str, *, name: str, retries: int = 2):
    """A :class:`ChainWorker` actor that Ray restarts (and whose call it retries) if its process dies."""
    import ray

    worker_class = ray.remote(num_cpus=1, max_restarts=retries, max_task_retries=retries)(ChainWorker)
    return worker_class.options(name=name, namespace=RAY_NAMESPACE, lifetime=None).remote(store)


def pool_name_prefix(store: str) -> str:
    """What the names of ``store``'s pooled workers start with: ``pool/<first 10 hex of sha256(store URL)>/``."""
    digest = hashlib.sha256(ObjectStore(store).url.encode()).hexdigest()[:10]
    return f"pool/{digest}/"


def pool_actor_name(store: str, index: int) -> str:
    """Name of the ``index``-th pooled unlearning worker of ``store``."""
    return f"{pool_name_prefix(store)}{index}"


def worker_pool(store: str, size: int) -> list:
    """``size`` long-lived :class:`ChainWorker` actors for ``store``, created once and then reused.

    Unlearning is latency-bound: a fresh actor costs a process start and the torch import on
    every deletion. Pooled actors are detached (they outlive the flow run that created them, up
    to the Ray runtime's end, e.g. ``obliviate serve`` stopping) and keep the data they loaded.
    They reserve no CPU (``num_cpus=0``, spread over nodes) so an idle pool never blocks other
    work; the pool's size bounds the parallelism. Ray restarts a dead one and retries its call.
    """
    import ray

    worker_class = ray.remote(ChainWorker)
    return [
        worker_class.options(
            name=pool_actor_name(store, index),
            namespace=RAY_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            scheduling_strategy="SPREAD",
            max_restarts=2,
            max_task_retries=2,
        ).remote(ObjectStore(store).url)
        for index in range(size)
    ]


def warm_pool(store: str, *, size: int | None = None, run_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Start the store's pooled workers and get each ready: data of every run loaded, torch warmed up.

    A warm pool (issue 14) makes an unlearning cost what the work costs: without it, the first
    unlearning on each worker also pays the actor start, loading the run's data and torch's
    first-step initialisation (1-2 s on this 2-core machine, on both workers of a fan-out).
    ``obliviate serve`` warms its pool when it starts and again when runs are registered.

    Args:
        store: the store whose pool is warmed.
        size: workers (default: the cluster's CPUs, the fan-out's default width).
        run_ids: runs to load (default: every registered run).

    Returns:
        each worker's :meth:`actors.chains.ChainWorker.warm` summary.
    """
    import ray

    from flows.runtime import cluster_cpus, ensure_ray

    ensure_ray()
    actors = worker_pool(store, max(1, size or cluster_cpus()))
    return list(ray.get([actor.warm.remote(run_ids) for actor in actors]))


def shutdown_pools(store: str, *, timeout_s: float = 10.0) -> int:
    """Kill ``store``'s pooled workers in this Ray runtime (``serve`` does this on exit); returns how many.

    Only that store's pool: on a shared Ray cluster (``RAY_ADDRESS``) the serves of other stores
    keep their warm pools (they killed them before, and their next unlearning paid the actor start
    and torch warm-up again, or a call under way on a killed worker was retried or failed).

    Gives up after ``timeout_s``: a SIGTERM to serve's process group stops its local Ray too, and a
    call to a GCS that is going away waits 60 s for it to come back. Its workers go with it.

    Args:
        store: the store whose pool is stopped.
        timeout_s: how long to wait for the kills.
    """
    import threading

    from flows.runtime import ray_gcs_answers

    prefix = pool_name_prefix(store)
    if not ray_gcs_answers():
        return 0
    killed: list[int] = []
    worker = threading.Thread(target=lambda: killed.append(_kill_pools(prefix)), name="stop-pools", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return killed[0] if killed else 0


def _kill_pools(prefix: str) -> int:
    import ray

    killed = 0
    # Ray stopping with serve's process group cancels these calls (RpcError CANCELLED): its workers go with it.
    with contextlib.suppress(Exception):
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["namespace"] == RAY_NAMESPACE and actor["name"].startswith(prefix):
                ray.kill(ray.get_actor(actor["name"], namespace=RAY_NAMESPACE), no_restart=True)
                killed += 1
    return killed


def run_spec(
    *,
    run_id: str,
    data: str,
    model: str,
    blocks: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    schedule: str,
    seed: int,
    train_size: int | None,
    optimizer: str = "adam",
    min_lr_fraction: float = 0.0,
    heldout_size: int | None,
    split_seed: int,
    shards: int = 1,
    shard: int = 0,
    erased_ids: Iterable[int] = (),
) -> dict[str, Any]:
    """Plan a run from CLI-like options (image size, levels and classes come from the data).

    ``erased_ids``: the dataset's erased rows, none of which is held out (:func:`planning_erasures` says which).

    With ``shards`` S > 1 (issue 11, SPEC 6 Sharding) the run is shard ``shard`` of S: its training
    ids are that shard of a class-stratified split of the training set into S disjoint shards
    (seeded by ``split_seed``), and its run id is ``<run_id>-s<shard>of<S>``; all shards share the
    held-out set, so each is an ordinary run that deletions reach independently.
    """
    if shards < 1:
        raise ConfigError(f"shards is the number of chains trained side by side and must be >= 1; got {shards}.")
    dataset = load_dataset(data)
    config = BlockTrainingConfig(
        model=model,
        num_classes=max(10, dataset.num_classes),
        image_size=dataset.image_shape[0],
        levels=dataset.levels,
        num_blocks=blocks,
        local_epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        optimizer=optimizer,
        schedule=schedule,
        min_lr_fraction=min_lr_fraction,
        seed=seed,
    )
    spec = plan_run(
        run_id=run_id,
        dataset=dataset,
        source=data,
        train_size=train_size,
        heldout_size=heldout_size,
        split_seed=split_seed,
        config=config,
        erased_ids=erased_ids,
    )
    if shards > 1:
        spec = shard_spec(spec, labels=dataset.labels, shards=shards, shard=shard)
    return spec.to_dict()


def planning_erasures(store: ObjectStore, *, run_id: str, data: str, shards: int) -> frozenset[int]:
    """The erased rows to plan run ``run_id`` with (:func:`run_spec`'s ``erased_ids``).

    Those of every standing deletion request of ``data`` (:class:`storage.serving.DatasetErasures`), for a run not
    stored yet; for one stored already, those it was planned with (its spec's ``erased_at_planning``), so that
    repeating the options resumes or returns it, as before any request came, instead of drawing another split.
    """
    first = f"{run_id}-s0of{shards}" if shards > 1 else run_id
    key = f"runs/{first}/spec.json"
    if store.exists(key):
        return frozenset(RunSpec.from_dict(store.get_json(key)).erased_at_planning)
    return DatasetErasures(store, data).ids()


def shard_spec(spec: RunSpec, *, labels: Any, shards: int, shard: int) -> RunSpec:
    """Shard ``shard`` of ``shards`` of a planned run (disjoint, class-stratified, seeded by its split seed)."""
    import numpy as np

    if not 0 <= shard < shards:
        raise ConfigError(f"shard must be in 0..{shards - 1}; got {shard}.")
    train = np.asarray(spec.train_ids, dtype=np.int64)
    # Shard sizes differ by at most one, so the smallest is known before planning; checked first, a
    # shard count above the sample count gets this rule too, not the planner's bare range.
    smallest = len(train) // shards
    if smallest < spec.config.num_blocks:
        raise ConfigError(
            f"each shard needs at least one training sample per block: {len(train)} samples in {shards} shards "
            f"leave {smallest} per shard, fewer than --blocks {spec.config.num_blocks}. Lower --shards to at most "
            f"{len(train) // spec.config.num_blocks}, or lower --blocks."
        )
    plan = make_shard_plan(np.asarray(labels)[train], num_shards=shards, seed=spec.split_seed)
    return replace(
        spec,
        run_id=f"{spec.run_id}-s{shard}of{shards}",
        train_ids=tuple(int(i) for i in train[plan.shards[shard]]),
    )


def check_run_shape(store: ObjectStore, run_id: str, members: list[str]) -> None:
    """Refuse to train ``run_id`` as ``members`` when the store holds it in another shape.

    A run id names one training: a sharded run of other shard count, or a single chain trained
    as shards (or the reverse), would leave the group record and the served model disagreeing.

    Raises:
        ConfigError: the store holds ``run_id`` as another group, or as a single chain.
    """
    stored = group_members(store, run_id)
    if stored is not None:
        if stored != members:
            raise ConfigError(
                f"run {run_id!r} is already trained as {len(stored)} shards ({', '.join(stored)}); this asks for "
                f"{len(members) if len(members) > 1 else 'a single chain'}. A run id names one training: choose a "
                f"new --run-id, or repeat --shards {len(stored)}."
            )
    elif len(members) > 1 and RunRegistry(store).current(run_id) is not None:
        raise ConfigError(
            f"run {run_id!r} is already trained as a single chain; this asks for {len(members)} shards. A run id "
            "names one training: choose a new --run-id, or leave out --shards."
        )


# The training claims this process takes or holds: (store url, run id) -> {thread: how many blocks deep}.
_HELD_TRAININGS: dict[tuple[str, str], dict[int, int]] = {}
_HELD_LOCK = threading.Lock()
# The training claims this process holds now: (store url, run id) -> the claim (its workers check it: held_claim).
_HELD_CLAIMS: dict[tuple[str, str], PointerClaim] = {}


def held_claim(store: str, run_id: str) -> dict[str, Any] | None:
    """The training claim this process holds on ``run_id`` (``key``, ``version``, ``holder``), for its workers.

    A worker given it (:meth:`actors.chains.ChainWorker.train`) reads the claim's pointer before each write and stops
    between blocks once another training took the claim over (this process stalled past its lease): the workers
    write, and only the store can tell them, as the process that renews the claim may be the one that stalled.
    """
    with _HELD_LOCK:
        claim = _HELD_CLAIMS.get((ObjectStore(store).url, run_id))
    return None if claim is None else {"key": claim.key, "version": claim.version, "holder": dict(claim.holder)}


@contextlib.contextmanager
def training_claim(store: str, run_id: str, *, lease_s: float = DEFAULT_LEASE_S) -> Iterator[None]:
    """Be the one process training run ``run_id`` into ``store`` for the length of the block, or refuse at once.

    Two ``obliviate train`` of one run id started together both trained every block (each of its
    workers found nothing stored yet), and the one that lost the publish said "0 blocks trained
    now, 3 resumed". The claim is a compare-and-swap of ``runs/<run>/train-claim``
    (:func:`storage.lease.take_claim`) whose lease this process renews while it trains; it is
    released at the end, however the training ends (the release drops the claim's older pointer versions and
    leases: :func:`storage.lease.tidy_claim`). A claim whose holder died is taken over: at
    once when it was a process of this host that is gone, else once its lease lapsed (``lease_s``
    after its last renewal). Re-entrant within one thread (``obliviate train`` claims before its
    servers start, and the flow it then runs, in the same thread, holds the same claim).

    Raises:
        ConfigError: another live process (or thread) trains that run id now (named, with the fix).
    """
    url = ObjectStore(store).url
    held, me = (url, run_id), threading.get_ident()
    with _HELD_LOCK:  # noted before claiming: to another thread of this process, the claim is live
        threads = _HELD_TRAININGS.setdefault(held, {})
        nested = threads.get(me, 0) > 0
        threads[me] = threads.get(me, 0) + 1
    try:
        if nested:
            yield
            return
        with _claimed(store, run_id, lease_s=lease_s, held=held):
            yield
    finally:
        with _HELD_LOCK:
            threads = _HELD_TRAININGS.get(held, {})
            threads[me] = threads.get(me, 1) - 1
            if threads[me] <= 0:
                del threads[me]
            if not threads:
                _HELD_TRAININGS.pop(held, None)


@contextlib.contextmanager
def _claimed(store: str, run_id: str, *, lease_s: float, held: tuple[str, str]) -> Iterator[None]:
    """:func:`training_claim`'s claim itself: taken (or refused), renewed while the block runs, released."""
    object_store = ObjectStore(store)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "command": "obliviate train"}

    def gone(other: dict[str, Any]) -> bool:
        if other.get("host") == holder["host"] and other.get("pid") == holder["pid"]:
            # this process: live while another of its threads takes or holds it; else a former process with its pid
            with _HELD_LOCK:
                return not set(_HELD_TRAININGS.get(held, {})) - {threading.get_ident()}
        return holder_process_gone(other)

    try:
        claim = take_claim(object_store, training_claim_key(run_id), holder=holder, lease_s=lease_s, gone=gone)
    except ClaimHeld as held_by:
        other = held_by.holder
        renewed = (
            f"its lease renewed {max(time.time() - held_by.renewed_at, 0.0):.0f} s ago"
            if held_by.renewed_at is not None
            else "no lease renewal yet"
        )
        raise ConfigError(
            f"one training per run id at a time: run {run_id!r} of store {object_store.url} is being trained now by "
            f"{other.get('command', 'another process')} (pid {other.get('pid')} on host {other.get('host')}, since "
            f"{utc_text(held_by.claimed_at)}; {renewed}). Wait for it to finish (then rerunning this command "
            f"returns or resumes the run), or train under another --run-id. A training that died is taken over "
            f"{float(other.get('lease_s', lease_s)):.0f} s after its last renewal (at once on its own host)."
        ) from None
    with _HELD_LOCK:
        _HELD_CLAIMS[held] = claim
    try:
        with LeaseKeeper(object_store, lease_s=lease_s, holder=f"{holder['host']}:{holder['pid']}") as keeper:
            keeper.hold_claim(claim)
            yield
    finally:
        with _HELD_LOCK:
            _HELD_CLAIMS.pop(held, None)
        with contextlib.suppress(StorageError):  # not released: taken over once its lease lapses
            release_claim(object_store, claim)


def shard_run_ids(run_id: str, shards: int) -> list[str]:
    """The run ids of a sharded run's members."""
    return [f"{run_id}-s{k}of{shards}" for k in range(shards)] if shards > 1 else [run_id]


@flow(name="train", log_prints=False)
def train_flow(
    store: str,
    run_id: str,
    data: str = "digits",
    model: str = "lenet5",
    blocks: int = DEFAULT_RECIPE["num_blocks"],
    epochs: int = DEFAULT_RECIPE["local_epochs"],
    batch_size: int = DEFAULT_RECIPE["batch_size"],
    learning_rate: float = DEFAULT_RECIPE["learning_rate"],
    optimizer: str = DEFAULT_RECIPE["optimizer"],
    schedule: str = DEFAULT_RECIPE["schedule"],
    min_lr_fraction: float = DEFAULT_RECIPE["min_lr_fraction"],
    seed: int = 0,
    train_size: int | None = None,
    heldout_size: int | None = None,
    split_seed: int = 0,
    shards: int = 1,
) -> dict[str, Any]:
    """Train run ``run_id`` on ``data`` block by block into ``store``; returns its summary.

    With ``shards`` S > 1, S runs ``<run_id>-s<k>of<S>`` are trained in parallel on disjoint
    stratified shards (at most one Ray actor per cluster CPU) and a group record
    ``groups/<run_id>.json`` states how they are served as one model (mean of their softmax
    probabilities, ties to the lowest class).

    Args:
        store: ``file://...`` or ``s3://bucket/prefix``.
        run_id: the run's name (rerunning with the same options resumes / returns it).
        data: dataset source (``digits``, ``mnist5k``, a path).
        model: ``lenet5``, ``c3f2`` or ``resnet18``.
        blocks: B.
        epochs: E, local epochs per block.
        batch_size: mini-batch size.
        learning_rate: base learning rate.
        optimizer: ``adam`` (default) or ``sgd``.
        schedule: ``constant``, ``step``, ``cosine`` or ``exponential`` across blocks.
        min_lr_fraction: for ``cosine``, the last block's rate as a fraction of ``learning_rate``.
        seed: chain seed (initialisation, block split, batch order).
        train_size: training samples (default: all not held out).
        heldout_size: held-out samples (default 300, or a fifth of a dataset under 1,500 samples).
        split_seed: seed of the train/held-out split.
    """
    logger = get_run_logger()
    options = {
        "data": data,
        "model": model,
        "blocks": blocks,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": optimizer,
        "schedule": schedule,
        "min_lr_fraction": min_lr_fraction,
        "seed": seed,
        "train_size": train_size,
        "heldout_size": heldout_size,
        "split_seed": split_seed,
    }
    ObjectStore(store).ensure_container()
    erased = planning_erasures(ObjectStore(store), run_id=run_id, data=data, shards=shards)
    specs = [
        run_spec(run_id=run_id, shards=shards, shard=k, erased_ids=erased, **options) for k in range(max(shards, 1))
    ]
    with training_claim(store, run_id):
        return _train(store, run_id, specs, shards=shards, logger=logger)


def _train(store: str, run_id: str, specs: list[dict[str, Any]], *, shards: int, logger: Any) -> dict[str, Any]:
    """:func:`train_flow` once this process holds the run's training claim."""
    import ray
    from ray.util import ActorPool

    from flows.runtime import cluster_cpus, ensure_ray

    check_run_shape(ObjectStore(store), run_id, [s["run_id"] for s in specs])
    ensure_ray()
    # At most one actor per cluster CPU, each training shards in turn: S actors of one CPU each on
    # fewer CPUs would wait, alive and idle, for CPUs the others never give back.
    workers = [
        remote_worker(store, name=f"train/{run_id}/{k}/{uuid.uuid4().hex[:8]}")
        for k in range(min(len(specs), cluster_cpus()))
    ]
    claim = held_claim(store, run_id)  # each worker checks it before each write (a stalled driver cannot)
    calls: list[Any] = []

    def train_call(worker: Any, spec: dict[str, Any]) -> Any:
        calls.append(worker.train.remote(spec, claim))
        return calls[-1]

    try:
        pool = ActorPool(workers)
        for spec in specs:
            pool.submit(train_call, spec)
        summaries = _results_with_progress(pool, ObjectStore(store), specs, logger=logger)
    finally:
        # A worker killed in the middle of a call has Ray retry the call (max_task_retries) and print "(raylet) Task
        # ChainWorker.train failed. There are 2 retries remaining, so the task will be retried. Error: The actor is
        # dead because it was killed by `ray.kill`" before the command's own sentence (Ctrl-C, SIGTERM, another
        # shard's error). A cancelled call is never retried, and cancelling one that ended does nothing (ray.cancel).
        for call in calls:
            with contextlib.suppress(Exception):
                ray.cancel(call)
        for worker in workers:
            ray.kill(worker, no_restart=True)
    summary = summaries[0]
    if shards > 1:
        group = {"run_id": run_id, "members": [s["run_id"] for s in summaries], "rule": "mean_probability"}
        ObjectStore(store).put_json(f"groups/{run_id}.json", group)
        summary = {
            **group_summary(run_id, summaries),
            "group": group,
            "served_heldout_accuracy": served_heldout_accuracy(store, run_id),
        }
    logger.info(
        "run %s: %s, held-out accuracy %s, %s blocks trained now, %s resumed from storage",
        run_id,
        version_text(summary["version"]),
        accuracy_text(summary.get("heldout_accuracy")),
        summary.get("trained_blocks", 0),
        summary.get("resumed_blocks", 0),
    )
    for message in summary.get("sharp_drops") or []:  # issue 11: diverging settings are not accepted silently
        logger.warning("run %s: %s", run_id, message)
    return {**summary, "store": ObjectStore(store).url}


def group_summary(run_id: str, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """A sharded run's summary, from its shards' summaries (in shard order), each shard counted.

    Each shard has its own versions (a deletion retrains only the shards it touches), so
    ``version`` lists them per shard, as ``heldout_accuracy`` does, and the run is ``trained`` when
    any shard trained now. What only one shard can say (its accuracy before its last unlearning,
    the seconds that took) stays in ``shards``: shard 0's values used to stand for the run's.

    Args:
        run_id: the sharded run.
        summaries: the shards' summaries, in shard order.

    Returns:
        The run's summary: its shards' summaries under ``shards``, counts and training time summed,
        the wall time of the slowest shard (they train side by side), and
        :func:`deletions_over_shards`.
    """
    return {
        "run_id": run_id,
        "version": [s.get("version") for s in summaries],
        "status": "already_trained" if all(s.get("status") == "already_trained" for s in summaries) else "trained",
        "heldout_accuracy": [s.get("heldout_accuracy") for s in summaries],
        "num_blocks": summaries[0].get("num_blocks"),
        "num_train": sum(s.get("num_train", 0) for s in summaries),
        "trained_blocks": sum(s.get("trained_blocks", 0) for s in summaries),
        "resumed_blocks": sum(s.get("resumed_blocks", 0) for s in summaries),
        "train_seconds": sum(s.get("train_seconds", 0.0) for s in summaries),
        "wall_seconds": max(s.get("wall_seconds", 0.0) for s in summaries),
        "shards": summaries,
        **deletions_over_shards(summaries),
    }


def version_text(version: int | list[int | None] | None) -> str:
    """A run's version (or one per shard) as people read it: ``version 2``, ``versions per shard 2 / 1``."""
    if isinstance(version, list):
        return "versions per shard " + " / ".join("?" if v is None else str(v) for v in version)
    return f"version {version}"


def deletions_over_shards(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """What a sharded run's summary says of deletions and sharp drops: over every shard, not shard 0's alone.

    Shard 0's values used to stand for the run: a request whose ids all lie in another shard looked
    ignored, and a sharp drop in another shard was never warned about.

    Args:
        summaries: the shards' summaries, in shard order.

    Returns:
        ``left_out_ids`` (ids left out by any shard; the shards are disjoint, so their counts add up),
        ``left_out_for_requests`` and ``late_requests`` (sorted unions) and ``sharp_drops`` (each
        message naming its shard). A key no shard reported (a resumed, already trained shard has no
        ``left_out_ids``) is left out.
    """
    out: dict[str, Any] = {}
    if any("left_out_ids" in s for s in summaries):
        out["left_out_ids"] = sum(int(s.get("left_out_ids") or 0) for s in summaries)
    for key in ("left_out_for_requests", "late_requests"):
        if any(key in s for s in summaries):
            out[key] = sorted({request for s in summaries for request in s.get(key) or []})
    if any("sharp_drops" in s for s in summaries):
        out["sharp_drops"] = [
            f"shard {k} ({s.get('run_id')}): {message}"
            for k, s in enumerate(summaries)
            for message in s.get("sharp_drops") or []
        ]
    return out


def _results_with_progress(pool: Any, store: ObjectStore, specs: list[dict[str, Any]], *, logger: Any) -> list[Any]:
    """The pool's results in submission order; meanwhile the blocks committed so far, as a bar and a log line.

    Blocks are counted from the store (the workers commit each checkpoint as it is trained), so
    resumed blocks count as done at once and nothing extra travels through Ray.
    """
    registry = RunRegistry(store)
    blocks = [int(spec["config"]["num_blocks"]) for spec in specs]
    total = sum(blocks)
    results: list[Any] = []
    shown = -1
    failed: list[BaseException] = []  # a worker's error met while the store did not answer
    while pool.has_next():
        try:
            with worker_errors_as_their_own():
                results.append(pool.get_next(timeout=2.0))
        except TimeoutError:
            pass
        try:
            # Retried as the workers retry (their policy): during an outage the stall notice then names
            # the run's real deadline, not the few seconds left to one unretried poll.
            polled = retry_unavailable(
                lambda: _progress_or_result(pool, store, registry, specs, blocks, results, failed),
                policy=WORKER_RETRY_POLICY,
            )
        except StorageError:
            # The bar is a view: the workers retry outages up to their deadline, so a blip seen here
            # must not end the training (it did: the flow killed workers that were still retrying).
            continue
        if failed:
            raise failed[0]
        if polled is None:
            continue  # a result came in while the store did not answer
        done = polled
        if done != shown:
            report("blocks", done, total)
            logger.info("blocks %d/%d trained", done, total)
            shown = done
    return results


def _progress_or_result(
    pool: Any,
    store: ObjectStore,
    registry: RunRegistry,
    specs: list[dict[str, Any]],
    blocks: list[int],
    results: list[Any],
    failed: list[BaseException],
) -> int | None:
    """Blocks done so far; ``None`` once a result (in ``results``) or a worker's error (in ``failed``) came in.

    While the store does not answer, a worker's result is taken as soon as it is ready, so a poll
    retried through an outage never holds one back.
    """
    try:
        return sum(blocks[: len(results)]) + _committed_blocks(
            store, registry, specs[len(results) :], blocks[len(results) :]
        )
    except StorageUnavailable:
        if pool.has_next():
            try:
                with worker_errors_as_their_own():
                    results.append(pool.get_next(timeout=0))
            except TimeoutError:
                pass
            except BaseException as err:  # noqa: BLE001 -- the worker's error, raised by the caller, not retried here
                failed.append(err)
                return None
            else:
                return None
        raise


def _committed_blocks(store: ObjectStore, registry: RunRegistry, specs: list[dict[str, Any]], blocks: list[int]) -> int:
    """How many blocks of these runs have a committed checkpoint in the store."""
    done = 0
    for spec, count in zip(specs, blocks, strict=True):
        chain = _training_chain(store, spec["run_id"])
        committed = set(store.list(f"runs/{spec['run_id']}/chains/{chain}"))
        done += sum(registry.checkpoint_key(spec["run_id"], chain, b) in committed for b in range(1, count + 1))
    return done


@contextlib.contextmanager
def worker_errors_as_their_own() -> Iterator[None]:
    """Around a wait on Ray: a worker's own error raised as itself, a SIGTERM as Prefect's signal.

    Ray raises a worker's exception as a ``RayTaskError`` whose text is the remote traceback, which
    Prefect then records as the flow run's state message; the worker's :class:`ObliviateError` says
    the rule and fix. A SIGTERM that lands inside Ray's wait comes out as a ``SystemError`` wrapping
    Prefect's ``TerminationSignal``, which made the run Failed with a meaningless message; re-raised,
    Prefect records the run as crashed by the signal.
    """
    import ray
    from prefect.exceptions import TerminationSignal

    try:
        yield
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, ObliviateError):
            raise err.cause from None
        raise
    except SystemError as err:
        signal = termination_behind(err)
        if isinstance(signal, TerminationSignal):
            raise signal from None
        raise


def termination_behind(err: BaseException) -> BaseException | None:
    """Prefect's ``TerminationSignal`` that ``err`` stands for, else ``None``.

    A SIGTERM that lands while Ray waits for a worker runs Prefect's handler inside Ray's C code,
    which returns as if nothing happened: the signal comes out of ``ray.get`` as a ``SystemError``
    ("<built-in method __new__ of type object ...> returned a result with an exception set") whose
    cause is the signal. The worker's own outcome was never received.
    """
    from prefect.exceptions import TerminationSignal

    if not isinstance(err, SystemError):
        return None
    signal = err.__cause__ or err.__context__
    return signal if isinstance(signal, TerminationSignal) else None


def _training_chain(store: ObjectStore, run_id: str) -> str:
    """The chain folder a run's training writes to: ``train``, or the one its left-out ids name."""
    try:
        return str(store.get_json(exclusions_key(run_id)).get("chain", TRAIN_CHAIN))
    except (StorageError, CorruptObject):  # not written yet, or unreadable: the bar is a view, the worker decides
        return TRAIN_CHAIN


def served_heldout_accuracy(store: str, run_id: str) -> float:
    """Held-out accuracy of what run ``run_id`` serves now (a sharded run: its shards as one model)."""
    import numpy as np

    from flows.model_server import RunBackend
    from obliviate.extraction.target import OutputMode

    backend = RunBackend(store, run_id)
    spec = RunRegistry(ObjectStore(store)).spec(backend.members[0])  # the shards share one held-out set
    data = load_dataset(spec.dataset)
    heldout = np.asarray(spec.heldout_ids, dtype=np.int64)
    labels = backend.predict(data.images[heldout], output=OutputMode.LABELS)
    return float(np.mean(labels == data.labels[heldout]))


def accuracy_text(accuracy: float | list[float | None] | None) -> str:
    """A held-out accuracy (or one per shard) as people read it: ``87.7 %``, ``per shard 87.0 / 86.3 %``."""
    if isinstance(accuracy, list):
        return "per shard " + " / ".join("?" if a is None else f"{100 * a:.1f}" for a in accuracy) + " %"
    return "unknown" if accuracy is None else f"{100 * accuracy:.1f} %"
