"""``obliviate tune unlearning|reduction``: Ray Tune sweeps over the trade-offs users choose."""

from __future__ import annotations

import argparse

from flows.cli._store import add_store_argument, prepare_store, store_url
from obliviate.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="Ray Tune sweeps: unlearning (B, ε) or reduction (k, bins)")
    kinds = parser.add_subparsers(dest="sweep", required=True, metavar="SWEEP")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", default="mnist5k", help="mnist5k, digits, an .npz file or a dataset folder")
    add_store_argument(common)
    common.add_argument("--workers", type=int, default=2, help="trials at once, one CPU each (default 2)")
    common.add_argument("--model", default="lenet5", help="lenet5 or c3f2")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--name", default=None, help="sweep name (default: kind and time)")

    unlearning = kinds.add_parser("unlearning", parents=[common], help="sweep (B, ε): speed-up vs consistency")
    unlearning.add_argument("--blocks", default="10,20,40", help="values of B (default 10,20,40)")
    unlearning.add_argument("--epsilons", default="0.1,0.05", help="values of ε (default 0.1,0.05)")
    unlearning.add_argument("--deleted", type=int, default=10, help="samples deleted per trial (default 10)")
    unlearning.add_argument("--train-size", type=int, default=2000)
    unlearning.add_argument("--heldout-size", type=int, default=500)
    unlearning.add_argument("--local-epochs", type=int, default=1)
    unlearning.add_argument("--schedule", default="cosine", help="constant, step, cosine or exponential")
    unlearning.set_defaults(handler=run_tune)

    reduction = kinds.add_parser("reduction", parents=[common], help="sweep (k, bins): accuracy vs queries")
    reduction.add_argument("--ks", default="50,150,300", help="values of k (default 50,150,300)")
    reduction.add_argument("--bins", default="256,32,16", help="values of bins (default 256,32,16)")
    reduction.add_argument("--target-size", type=int, default=2000)
    reduction.add_argument("--pool-size", type=int, default=2000)
    reduction.add_argument("--test-size", type=int, default=1000)
    reduction.add_argument("--steps", type=int, default=300, help="substitute/target gradient steps")
    reduction.add_argument("--starts", type=int, default=50, help="seeded DRMI restarts (default 50)")
    reduction.set_defaults(handler=run_tune)


def _values(text: str, cast: type, option: str) -> list:
    try:
        values = [cast(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option} takes comma-separated {cast.__name__} values; got {text!r}.") from None
    if not values:
        raise ConfigError(f"{option} needs at least one value; got {text!r}.")
    return values


def run_tune(args: argparse.Namespace) -> int:
    from flows.tune import check_trial_grid, describe, run_sweep

    constants = {"data": args.data, "model": args.model, "seed": args.seed}
    if args.sweep == "unlearning":
        grid = {
            "num_blocks": _values(args.blocks, int, "--blocks"),
            "epsilon": _values(args.epsilons, float, "--epsilons"),
        }
        constants.update(
            num_deleted=args.deleted,
            train_size=args.train_size,
            heldout_size=args.heldout_size,
            local_epochs=args.local_epochs,
            schedule=args.schedule,
        )
    else:
        grid = {"k": _values(args.ks, int, "--ks"), "bins": _values(args.bins, int, "--bins")}
        constants.update(
            target_size=args.target_size,
            pool_size=args.pool_size,
            test_size=args.test_size,
            steps=args.steps,
            num_starts=args.starts,
        )
    check_trial_grid(args.sweep, grid=grid, constants=constants)  # before the store is touched
    report = run_sweep(
        args.sweep,
        store_url=prepare_store(store_url(args), write=True),
        grid=grid,
        constants=constants,
        workers=args.workers,
        name=args.name,
    )
    print(describe(report))
    return 0 if report.errors == 0 else 1
