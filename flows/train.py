"""The ``train`` flow: block-sequenced training on a Ray actor, checkpoints to storage, registry entry.

The flow plans the run (class-stratified train/held-out split of the dataset, SPEC section 4),
then one :class:`actors.chains.ChainWorker` trains it block by block: every checkpoint is
written as soon as it exists, so a killed worker (Ray restarts it and retries the call) or a
rerun of the flow continues after the last complete checkpoint. Version 1 is published with
the storage compare-and-swap pointer and the run is registered (sample ids per block, metrics).

Call ``ray.init`` once before (``flows.runtime.ensure_ray``); the flow reuses that runtime.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from prefect import flow, get_run_logger

from actors.chains import ChainWorker
from obliviate.data import load_dataset
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.service import plan_run
from storage.objects import ObjectStore

RAY_NAMESPACE = "obliviate"


def remote_worker(store: str, *, name: str, retries: int = 2):
    """A :class:`ChainWorker` actor that Ray restarts (and whose call it retries) if its process dies."""
    import ray

    worker_class = ray.remote(num_cpus=1, max_restarts=retries, max_task_retries=retries)(ChainWorker)
    return worker_class.options(name=name, namespace=RAY_NAMESPACE, lifetime=None).remote(store)


def pool_actor_name(store: str, index: int) -> str:
    """Name of the ``index``-th pooled unlearning worker of ``store``."""
    digest = hashlib.sha256(ObjectStore(store).url.encode()).hexdigest()[:10]
    return f"pool/{digest}/{index}"


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


def shutdown_pools() -> int:
    """Kill every pooled worker in this Ray runtime (``serve`` does this on exit); returns how many."""
    import ray

    killed = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == RAY_NAMESPACE and actor["name"].startswith("pool/"):
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
    heldout_size: int,
    split_seed: int,
) -> dict[str, Any]:
    """Plan a run from CLI-like options (image size, levels and classes come from the data)."""
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
    )
    return spec.to_dict()


@flow(name="train", log_prints=False)
def train_flow(
    store: str,
    run_id: str,
    data: str = "digits",
    model: str = "lenet5",
    blocks: int = 6,
    epochs: int = 3,
    batch_size: int = 32,
    learning_rate: float = 0.01,
    optimizer: str = "adam",
    schedule: str = "constant",
    seed: int = 0,
    train_size: int | None = None,
    heldout_size: int = 300,
    split_seed: int = 0,
) -> dict[str, Any]:
    """Train run ``run_id`` on ``data`` block by block into ``store``; returns its summary.

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
        schedule: ``constant``, ``step``, ``cosine`` or ``exponential``.
        seed: chain seed (initialisation, block split, batch order).
        train_size: training samples (default: all not held out).
        heldout_size: held-out samples.
        split_seed: seed of the train/held-out split.
    """
    import ray

    from flows.runtime import ensure_ray

    logger = get_run_logger()
    spec = run_spec(
        run_id=run_id,
        data=data,
        model=model,
        blocks=blocks,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        optimizer=optimizer,
        schedule=schedule,
        seed=seed,
        train_size=train_size,
        heldout_size=heldout_size,
        split_seed=split_seed,
    )
    ObjectStore(store).ensure_container()
    ensure_ray()
    worker = remote_worker(store, name=f"train/{run_id}/{uuid.uuid4().hex[:8]}")
    try:
        summary = ray.get(worker.train.remote(spec))
    finally:
        ray.kill(worker, no_restart=True)
    logger.info(
        "run %s: version %s, held-out accuracy %s, %s blocks trained now, %s resumed from storage",
        run_id,
        summary["version"],
        summary.get("heldout_accuracy"),
        summary.get("trained_blocks", 0),
        summary.get("resumed_blocks", 0),
    )
    for message in summary.get("sharp_drops") or []:  # issue 11: diverging settings are not accepted silently
        logger.warning("run %s: %s", run_id, message)
    return {**summary, "store": ObjectStore(store).url}
