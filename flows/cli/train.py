"""``obliviate train``: block-sequenced training of a run into a store (SPEC section 4)."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from flows.cli._store import StoreOption, prepare_store, store_url
from flows.cli._types import Args, choice, choices, flag_named, integer, number, option, parsed
from flows.cli._types import dataset as dataset_type
from flows.cli._types import seed as seed_type
from obliviate.defaults import DEFAULT_RECIPE  # not obliviate.unlearning.config's: that imports torch
from obliviate.errors import ConfigError

MODELS = ("lenet5", "c3f2", "resnet18")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "step", "cosine", "exponential")

# The option each run setting comes from, and its default: a ConfigError that names the setting
# (obliviate's messages speak of the config, ``num_blocks``) is reported with the flag to change.
CONFIG_FLAGS: dict[str, tuple[str, object]] = {
    "num_blocks": ("--blocks", DEFAULT_RECIPE["num_blocks"]),
    "local_epochs": ("--epochs", DEFAULT_RECIPE["local_epochs"]),
    "batch_size": ("--batch-size", DEFAULT_RECIPE["batch_size"]),
    "learning_rate": ("--lr", DEFAULT_RECIPE["learning_rate"]),
    "optimizer": ("--optimizer", DEFAULT_RECIPE["optimizer"]),
    "schedule": ("--schedule", DEFAULT_RECIPE["schedule"]),
    "min_lr_fraction": ("--min-lr-fraction", DEFAULT_RECIPE["min_lr_fraction"]),
    "seed": ("--seed", 0),
    "split_seed": ("--split-seed", 0),
    "shards": ("--shards", 1),
}


RECIPE = DEFAULT_RECIPE


def train_command(
    ctx: typer.Context,
    store: StoreOption = None,
    run_id: Annotated[str, option("--run-id", help="the run's name; rerun with the same options to resume")] = ...,
    data: Annotated[
        str, option("--data", parser=dataset_type, help="digits (default), mnist5k, an .npz file or a dataset folder")
    ] = "digits",
    model: Annotated[
        str, option("--model", parser=choice(*MODELS), metavar=choices(*MODELS), help="architecture (default lenet5)")
    ] = "lenet5",
    blocks: Annotated[
        int, option("--blocks", parser=integer, help=f"B, number of blocks (default {RECIPE['num_blocks']})")
    ] = RECIPE["num_blocks"],
    epochs: Annotated[
        int, option("--epochs", parser=integer, help=f"E, local epochs per block (default {RECIPE['local_epochs']})")
    ] = RECIPE["local_epochs"],
    batch_size: Annotated[
        int, option("--batch-size", parser=integer, help=f"samples per batch (default {RECIPE['batch_size']})")
    ] = RECIPE["batch_size"],
    optimizer: Annotated[
        str,
        option(
            "--optimizer",
            parser=choice(*OPTIMIZERS),
            metavar=choices(*OPTIMIZERS),
            help=f"optimizer (default {RECIPE['optimizer']})",
        ),
    ] = RECIPE["optimizer"],
    lr: Annotated[
        float, option("--lr", parser=number, help=f"block 1's learning rate (default {RECIPE['learning_rate']})")
    ] = RECIPE["learning_rate"],
    schedule: Annotated[
        str,
        option(
            "--schedule",
            parser=choice(*SCHEDULES),
            metavar=choices(*SCHEDULES),
            help=f"learning rate across blocks (default {RECIPE['schedule']})",
        ),
    ] = RECIPE["schedule"],
    min_lr_fraction: Annotated[
        float,
        option(
            "--min-lr-fraction",
            parser=number,
            help=f"cosine: the last block's rate as a fraction of --lr (default {RECIPE['min_lr_fraction']})",
        ),
    ] = RECIPE["min_lr_fraction"],
    seed: Annotated[
        int, option("--seed", parser=seed_type, help="chain seed (init, block split, batch order; default 0)")
    ] = 0,
    train_size: Annotated[
        int | None, option("--train-size", parser=integer, help="training samples (default: all not held out)")
    ] = None,
    heldout_size: Annotated[
        int | None,
        option("--heldout-size", parser=integer, help="held-out samples (default 300, or 1/5 of under 1,500 images)"),
    ] = None,
    split_seed: Annotated[
        int, option("--split-seed", parser=seed_type, help="seed of the train/held-out split (default 0)")
    ] = 0,
    shards: Annotated[
        int,
        option(
            "--shards",
            parser=integer,
            help="S > 1: S chains on disjoint stratified shards, trained in parallel; --blocks counts each shard's "
            "blocks, so B/S keeps the block size of an unsharded run of B blocks (smaller blocks cost accuracy; "
            "default 1)",
        ),
    ] = 1,
    ray_address: Annotated[
        str | None, option("--ray-address", help="Ray cluster (default RAY_ADDRESS, else a local runtime)")
    ] = None,
) -> Args:
    return parsed(ctx, run_train)


def register(app: typer.Typer) -> None:
    help = "train a run block by block, checkpoints in the store (SPEC 4)"
    app.command("train", help=help, short_help=help)(train_command)


def run_train(args: Args) -> int:
    from flows.progress import shown_progress
    from flows.runtime import apply_prefect_defaults, check_ray_address, prefect_api_and_ray
    from flows.train import (
        accuracy_text,
        check_run_shape,
        planning_erasures,
        run_spec,
        train_flow,
        training_claim,
        version_text,
    )
    from obliviate.unlearning.service import RunSpec, check_name
    from storage.objects import ObjectStore
    from storage.registry import RunRegistry

    options = {
        "data": args.data,
        "model": args.model,
        "blocks": args.blocks,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "optimizer": args.optimizer,
        "schedule": args.schedule,
        "min_lr_fraction": args.min_lr_fraction,
        "seed": args.seed,
        "train_size": args.train_size,
        "heldout_size": args.heldout_size,
        "split_seed": args.split_seed,
    }
    # Every option's rule, checked by planning the run (each shard's, the most constrained) before
    # any server starts or the store is touched.
    check_name(args.run_id, what="run id")
    try:
        run_spec(run_id=args.run_id, shards=args.shards, shard=max(args.shards, 1) - 1, **options)
    except ConfigError as err:
        raise flag_named(err, flags=CONFIG_FLAGS) from None
    check_ray_address(args.ray_address or os.environ.get("RAY_ADDRESS"))
    apply_prefect_defaults()
    store = prepare_store(store_url(args), write=True)
    # A run id trained before with other options (or another shard count) is refused now, not by
    # the worker after a server and Ray have started (that left a failed flow run behind).
    registry = RunRegistry(ObjectStore(store))
    erased = planning_erasures(registry.store, run_id=args.run_id, data=args.data, shards=args.shards)
    specs = [
        run_spec(run_id=args.run_id, shards=args.shards, shard=k, erased_ids=erased, **options)
        for k in range(max(args.shards, 1))
    ]
    check_run_shape(registry.store, args.run_id, [spec["run_id"] for spec in specs])
    for spec in specs:
        registry.check_spec(RunSpec.from_dict(spec))
    # One training per run id at a time: a second one is refused here, before any server starts.
    with training_claim(store, args.run_id), prefect_api_and_ray(ray_address=args.ray_address) as api_url:
        print(f"Prefect API: {api_url}", file=sys.stderr)
        with shown_progress():
            summary = train_flow(store=store, run_id=args.run_id, shards=args.shards, **options)
    served = summary.get("served_heldout_accuracy")
    served_text = "" if served is None else f", served as one model (mean of probabilities) {accuracy_text(served)}"
    shards = len(summary.get("shards") or [])
    each = f" ({shards} shards x {args.blocks} blocks)" if shards else ""
    print(
        f"run {summary['run_id']}: {version_text(summary['version'])} ({summary['status']}), held-out accuracy "
        f"{accuracy_text(summary.get('heldout_accuracy'))}{served_text}, {summary.get('trained_blocks', 0)} blocks "
        f"trained{each}, {summary.get('resumed_blocks', 0)} resumed; store {summary['store']}"
    )
    for message in summary.get("sharp_drops") or []:
        print(f"warning: {message}", file=sys.stderr)
    print(json.dumps(summary, default=str))
    return 0
