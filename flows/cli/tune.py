"""``obliviate tune unlearning|reduction``: Ray Tune sweeps over the trade-offs users choose."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from flows.cli._store import StoreOption, prepare_store, store_url
from flows.cli._types import Args, choice, choices, comma_list, flag_named, integer, new_app, option, parsed
from flows.cli._types import dataset as dataset_type
from flows.cli.reduce import AGGREGATES, GRAY_MODES
from flows.cli.train import SCHEDULES
from obliviate.defaults import DEFAULT_AGGREGATE, DEFAULT_GRAY
from obliviate.errors import ConfigError

# obliviate.models.MODEL_BUILDERS, spelled out so that building the parser does not import torch (a test keeps them equal)
MODELS = ("lenet5", "c3f2", "resnet18")


# The option each trial setting comes from, and its default: a rule broken in obliviate's words
# (``num_blocks must be ...``) is reported with the flag to change.
SWEEP_FLAGS: dict[str, tuple[str, object]] = {
    "num_blocks": ("--blocks", "10,20,40"),
    "local_epochs": ("--local-epochs", 1),
    "bins": ("--bins", "256,32,16"),
}

# The options both sweeps take.
DataOption = Annotated[
    str, option("--data", parser=dataset_type, help="mnist5k (default), digits, an .npz file or a dataset folder")
]
WorkersOption = Annotated[
    int | None,
    option("--workers", parser=integer, help="trials at once, one CPU each (default 2, at most this machine's CPUs)"),
]
ModelOption = Annotated[
    str,
    option("--model", parser=choice(*MODELS), metavar=choices(*MODELS), help="the trials' model (default lenet5)"),
]
SeedOption = Annotated[int, option("--seed", parser=integer, help="seed of every trial (default 0)")]
NameOption = Annotated[str | None, option("--name", help="sweep name (default: kind and time)")]


def choice_list(*values: str):
    """The value type of an option that takes comma-separated values, each one of ``values``.

    Each part is refused as :func:`flows.cli._types.choice` refuses a single value, so ``tune reduction --gray``
    says what ``reduce --gray`` says; duplicates and an empty list are left to :func:`_values`.
    """
    one = choice(*values)

    def parts(text: str) -> str:
        for part in text.split(","):
            if part.strip():
                one(part.strip())
        return text

    return parts


def unlearning_command(
    ctx: typer.Context,
    data: DataOption = "mnist5k",
    store: StoreOption = None,
    workers: WorkersOption = None,
    model: ModelOption = "lenet5",
    seed: SeedOption = 0,
    name: NameOption = None,
    blocks: Annotated[str, option("--blocks", help="values of B (default 10,20,40)")] = "10,20,40",
    epsilons: Annotated[str, option("--epsilons", help="values of ε (default 0.1,0.05)")] = "0.1,0.05",
    deleted: Annotated[int, option("--deleted", parser=integer, help="samples deleted per trial (default 10)")] = 10,
    train_size: Annotated[
        int | None,
        option("--train-size", parser=integer, help="default 2000, or 4/5 of a dataset under 2,500 images"),
    ] = None,
    heldout_size: Annotated[
        int | None,
        option("--heldout-size", parser=integer, help="default 500, or 1/5 of a dataset under 2,500 images"),
    ] = None,
    local_epochs: Annotated[
        int, option("--local-epochs", parser=integer, help="E, local epochs per block (default 1)")
    ] = 1,
    schedule: Annotated[
        str,
        option(
            "--schedule",
            parser=choice(*SCHEDULES),
            metavar=choices(*SCHEDULES),
            help="the learning-rate schedule (default cosine)",
        ),
    ] = "cosine",
) -> Args:
    return parsed(ctx, run_tune, sweep="unlearning")


def reduction_command(
    ctx: typer.Context,
    data: DataOption = "mnist5k",
    store: StoreOption = None,
    workers: WorkersOption = None,
    model: ModelOption = "lenet5",
    seed: SeedOption = 0,
    name: NameOption = None,
    ks: Annotated[str, option("--ks", help="values of k (default 50,150,300)")] = "50,150,300",
    bins: Annotated[str, option("--bins", help="values of bins (default 256,32,16)")] = "256,32,16",
    gray: Annotated[
        str,
        option(
            "--gray",
            parser=choice_list(*GRAY_MODES),
            metavar="{" + "|".join(GRAY_MODES) + "},...",
            help=f"values of how colour images become gray: luma (ITU-R 601-2), mean (per channel) (default {DEFAULT_GRAY})",
        ),
    ] = DEFAULT_GRAY,
    aggregate: Annotated[
        str,
        option(
            "--aggregate",
            parser=choice_list(*AGGREGATES),
            metavar="{" + "|".join(AGGREGATES) + "},...",
            help=f"values of greedy initialisation's fold of a new member's MI row: sum, max (default {DEFAULT_AGGREGATE})",
        ),
    ] = DEFAULT_AGGREGATE,
    target_size: Annotated[
        int | None,
        option("--target-size", parser=integer, help="default 2000, or 2/5 of a dataset under 5,000 images"),
    ] = None,
    pool_size: Annotated[
        int | None,
        option("--pool-size", parser=integer, help="default 2000, or 2/5 of a dataset under 5,000 images"),
    ] = None,
    test_size: Annotated[
        int | None,
        option("--test-size", parser=integer, help="default 1000, or 1/5 of a dataset under 5,000 images"),
    ] = None,
    steps: Annotated[
        int, option("--steps", parser=integer, help="substitute/target gradient steps (default 300)")
    ] = 300,
    starts: Annotated[int, option("--starts", parser=integer, help="seeded DRMI restarts (default 50)")] = 50,
) -> Args:
    return parsed(ctx, run_tune, sweep="reduction")


def register(app: typer.Typer) -> None:
    kinds = new_app(subcommand_metavar="SWEEP")
    help = "sweep (B, ε): speed-up vs consistency"
    kinds.command("unlearning", help=help, short_help=help)(unlearning_command)
    help = "sweep (k, bins): accuracy vs queries"
    kinds.command("reduction", help=help, short_help=help)(reduction_command)
    help = "Ray Tune sweeps: unlearning (B, ε) or reduction (k, bins)"
    app.add_typer(kinds, name="tune", help=help, short_help=help)


def _values(text: str, cast: type, option: str) -> list:
    # A trial is stored under its values (a float as format(value, "g")): two values that read alike there
    # would run two trials into one result (the second overwrote the first and the report kept one).
    return comma_list(text, cast, option, alike="trial")


def _workers(args: Args) -> int:
    """Trials at once: as given, else 2; a local Ray runtime has only this machine's CPUs (as for ``reduce``)."""
    local_cpus = os.cpu_count() or 1
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if args.workers is None:
        return 2 if on_cluster else min(2, local_cpus)
    if args.workers >= 1 and not on_cluster and args.workers > local_cpus:
        # A local runtime never grows: the trials beyond its CPUs would only wait.
        raise ConfigError(
            f"--workers {args.workers} needs {args.workers} CPUs (one per trial), but the local Ray runtime this "
            f"command starts has this machine's {local_cpus}; lower --workers to at most {local_cpus}, or join a "
            "cluster with RAY_ADDRESS."
        )
    return int(args.workers)


def _split_sizes(args: Args, defaults: dict[str, int]) -> dict[str, int]:
    """The trial's split sizes: those given, the others by the help's rule for this dataset.

    A part not given takes its default, or for a dataset smaller than all the defaults together
    its share of the dataset (the defaults scaled down alike), whether or not other parts are given.
    """
    from obliviate.data import load_dataset

    images = len(load_dataset(args.data))
    total = sum(defaults.values())
    shares = defaults if total <= images else {part: size * images // total for part, size in defaults.items()}
    given = {part: getattr(args, part) for part in defaults}
    scaled = [part for part, size in given.items() if size is None and shares[part] != defaults[part]]
    if scaled:
        print(
            f"{args.data} holds {images:,} images, fewer than the default split's {total:,}: "
            + ", ".join(f"{part.replace('_', ' ')} {shares[part]:,}" for part in scaled)
            + " ("
            + ", ".join(f"--{part.replace('_', '-')}" for part in scaled)
            + " choose others)",
            flush=True,
        )
    return {part: shares[part] if size is None else size for part, size in given.items()}


def run_tune(args: Args) -> int:
    from flows.runtime import check_ray_address
    from flows.tune import (
        SweepFailed,
        SweepInterrupted,
        check_sweep_name,
        check_trial_grid,
        check_workers,
        describe,
        run_sweep,
    )

    workers = _workers(args)
    check_workers(workers)
    if args.name is not None:
        check_sweep_name(args.name)
    constants = {"data": args.data, "model": args.model, "seed": args.seed}
    if args.sweep == "unlearning":
        grid = {
            "num_blocks": _values(args.blocks, int, "--blocks"),
            "epsilon": _values(args.epsilons, float, "--epsilons"),
        }
        constants.update(
            _split_sizes(args, {"train_size": 2000, "heldout_size": 500}),
            num_deleted=args.deleted,
            local_epochs=args.local_epochs,
            schedule=args.schedule,
        )
    else:
        grid = {
            "k": _values(args.ks, int, "--ks"),
            "bins": _values(args.bins, int, "--bins"),
            "gray": _values(args.gray, str, "--gray"),
            "aggregate": _values(args.aggregate, str, "--aggregate"),
        }
        constants.update(
            _split_sizes(args, {"target_size": 2000, "pool_size": 2000, "test_size": 1000}),
            steps=args.steps,
            num_starts=args.starts,
        )
    try:
        check_trial_grid(args.sweep, grid=grid, constants=constants)  # before the store is touched
    except ConfigError as err:
        raise flag_named(err, flags=SWEEP_FLAGS) from None
    check_ray_address(os.environ.get("RAY_ADDRESS"))  # so is a cluster that does not answer
    try:
        report = run_sweep(
            args.sweep,
            store_url=prepare_store(store_url(args), write=True),
            grid=grid,
            constants=constants,
            workers=workers,
            name=args.name,
        )
    except SweepInterrupted as stop:
        print(stop, file=sys.stderr)  # then main() says the command was interrupted and exits 130
        raise
    except SweepFailed as failed:
        print(f"obliviate tune: error: {failed}", file=sys.stderr)
        return 1  # as a sweep with some failed trials: the trials failed, the command's options were fine
    print(describe(report))
    return 0 if report.errors == 0 else 1
