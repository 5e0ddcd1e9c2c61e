"""``obliviate steal``: the model-extraction audit (SPEC sections 3 and 3b) as a Prefect flow over Ray.

By default it assumes the strongest attacker measured (``semi_supervised_ensemble``) buying the
queries the audit's selector (``auto``: ``cluster_centers`` below 150 queries, adaptive rounds from
150) picks. Its report leads with the fewest queries at which any attacker and selector measured
reaches 90 % and 95 % agreement with the target, naming the pair that does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from flows.cli._types import comma_list, dataset, seed
from obliviate.errors import ConfigError
from obliviate.extraction.active import ADAPTIVE_FROM_BUDGET, AUDIT_SELECTOR
from obliviate.extraction.attackers import DEFAULT_ATTACKER, AttackOptions
from obliviate.extraction.audit import DEFAULT_SEEDS
from obliviate.extraction.selectors import DEFAULT_SELECTOR


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "steal", help="audit how well a black-box target can be extracted with k label queries"
    )
    parser.add_argument("--target", help="checkpoint path (obliviate target train) or http(s)://.../predict")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="train a small target under --out and audit it on a small grid (a few minutes on 2 cores); "
        "options you give replace the grid's",
    )
    parser.add_argument(
        "--pool",
        default="mnist5k",
        type=dataset,
        help="dataset for the attacker's pool and the test set (default mnist5k)",
    )
    parser.add_argument(
        "--budgets", default="50,150,200,300,600", help="comma-separated query budgets (default 50,150,200,300,600)"
    )
    parser.add_argument(
        "--attackers",
        default=DEFAULT_ATTACKER,
        help=(
            "comma-separated attackers: basic, augmented, pseudo_label, semi_supervised, semi_supervised_ensemble "
            f"(default {DEFAULT_ATTACKER}, the strongest)"
        ),
    )
    parser.add_argument(
        "--selectors",
        default=AUDIT_SELECTOR,
        help=f"comma-separated selector names, e.g. {AUDIT_SELECTOR},{DEFAULT_SELECTOR},random,drmi,jacobian,adaptive "
        f"(default {AUDIT_SELECTOR}: {DEFAULT_SELECTOR} below {ADAPTIVE_FROM_BUDGET} queries, adaptive rounds from "
        f"{ADAPTIVE_FROM_BUDGET})",
    )
    parser.add_argument(
        "--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds per (selector, budget) (default {DEFAULT_SEEDS})"
    )
    parser.add_argument("--out", default="runs/steal", help="output directory (default runs/steal)")
    parser.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help=f"the attacker's unlabeled pool (default {POOL_SIZE}, or 2/3 of the images that did not train the "
        "target when fewer are left)",
    )
    parser.add_argument(
        "--test-size",
        type=int,
        default=None,
        help=f"test images, at least 30 (default {TEST_SIZE}, or the other 1/3 likewise)",
    )
    parser.add_argument(
        "--split-seed",
        type=seed,
        default=None,
        help="seed of the pool/test split (default: the target's own, so `target train --seed S` gives the bench's split S)",
    )
    parser.add_argument("--substitute", default="lenet5", help="lenet5 (default) or c3f2")
    parser.add_argument("--steps", type=int, default=300, help="the basic attacker's training steps (default 300)")
    parser.add_argument(
        "--attack-steps",
        type=int,
        default=AttackOptions().max_steps,
        help=f"most supervised steps of augmented / pseudo_label / semi_supervised (default {AttackOptions().max_steps})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=AttackOptions().rounds,
        help=f"pseudo_label self-training rounds (default {AttackOptions().rounds})",
    )
    parser.add_argument(
        "--consistency-steps",
        type=int,
        default=AttackOptions().consistency_steps,
        help=f"semi_supervised FixMatch steps on the unlabeled pool (default {AttackOptions().consistency_steps})",
    )
    parser.add_argument(
        "--round-steps",
        type=int,
        default=AttackOptions().round_steps,
        help=f"steps per self-training round (default {AttackOptions().round_steps})",
    )
    parser.add_argument("--eps", default="0.1,0.2,0.3", help="FGSM radii on [0,1] inputs (default 0.1,0.2,0.3)")
    parser.add_argument("--ifgsm", action="store_true", help="iterative FGSM instead of FGSM")
    parser.add_argument(
        "--drmi-starts",
        type=int,
        default=32,
        help="seeded DRMI restarts (default 32; 0 = one per pool image, the SPEC default, slow)",
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: all)")
    parser.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout per request, seconds (default 30)")
    parser.add_argument("--retries", type=int, default=3, help="HTTP retries on transient errors (default 3)")
    parser.set_defaults(handler=run_steal, option_defaults={name: parser.get_default(name) for name in DEMO_SETTINGS})


POOL_SIZE, TEST_SIZE = 2000, 1000


def _split_sizes(args: argparse.Namespace, *, available: int | None) -> tuple[int, int]:
    """``--pool-size`` and ``--test-size``; left unset on a pool too small for the defaults, 2/3 and
    1/3 of the ``available`` images that did not train the target (``None``: not known)."""
    from obliviate.extraction.audit import check_split_fits, fit_split

    pool_size = POOL_SIZE if args.pool_size is None else args.pool_size
    test_size = TEST_SIZE if args.test_size is None else args.test_size
    if available is None:
        return pool_size, test_size
    if args.pool_size is None and args.test_size is None and pool_size + test_size > available:
        pool_size, test_size = fit_split(available=available, pool_size=pool_size, test_size=test_size)
        print(
            f"{args.pool} leaves {available} images outside the target's training set: pool {pool_size}, test "
            f"{test_size} (--pool-size and --test-size choose others)",
            file=sys.stderr,
        )
    check_split_fits(available=available, pool_size=pool_size, test_size=test_size, dataset=args.pool)
    return pool_size, test_size


def _grid_lists(args: argparse.Namespace) -> dict[str, list]:
    """``--budgets``, ``--selectors``, ``--attackers`` and ``--eps`` as lists, each value once: a value
    given twice would run its cells twice and report the copies as independent runs."""
    return {
        "budgets": comma_list(args.budgets, int, "--budgets", kind="integers"),
        "selectors": comma_list(args.selectors, str, "--selectors"),
        "attackers": comma_list(args.attackers, str, "--attackers"),
        # transferability is reported per format(eps, "g"): 0.1 and 0.1000001 would share one column
        "eps": comma_list(args.eps, float, "--eps", kind="numbers like 0.1,0.2", alike="transferability column"),
    }


DEMO_SETTINGS = {
    "budgets": "50,150,300",
    "attackers": "basic,semi_supervised",  # the default's one member: the demo shows the audit, not its cost
    "selectors": "random,cluster_centers",
    "seeds": 1,
    "pool_size": 1000,
    "test_size": 500,
    "steps": 150,
    "drmi_starts": 8,
}


def _checked_grid(args: argparse.Namespace) -> dict[str, Any]:
    """The audit grid's arguments of ``steal_flow``, once each is checked (before any work starts)."""
    from flows.audit import check_audit_grid, check_output

    grid = _grid_lists(args) | {"seeds": args.seeds, "pool_size": args.pool_size, "substitute": args.substitute}
    check_audit_grid(**grid)
    check_output(args.out)
    return grid


def run_steal(args: argparse.Namespace) -> int:
    _grid_lists(args)  # the lists' own rules first: they need nothing loaded
    if args.demo:
        return run_steal_demo(args)
    if not args.target:
        raise ConfigError("--target is required (a checkpoint path or an http(s) URL), unless --demo is given.")
    if not args.target.startswith(("http://", "https://")) and not Path(args.target).exists():
        raise ConfigError(
            f"target {args.target!r} is neither an http(s) URL nor an existing checkpoint; "
            "make one with `obliviate target train --out runs/target.pt`."
        )
    from flows.audit import check_audit_settings

    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus is the Ray CPUs to start and must be >= 1; got {args.num_cpus}.")
    check_audit_settings(
        pool_size=POOL_SIZE if args.pool_size is None else args.pool_size,
        test_size=TEST_SIZE if args.test_size is None else args.test_size,
        steps=args.steps,
        attack_steps=args.attack_steps,
        rounds=args.rounds,
        round_steps=args.round_steps,
        consistency_steps=args.consistency_steps,
        drmi_starts=args.drmi_starts,
        timeout_s=args.timeout,
        retries=args.retries,
    )
    # What the target declares (a checkpoint's meta, a server's GET /info), read before any work: the
    # pool must fit its images, and the pool and test set the images that did not train it. The flow
    # checks again for callers of its API.
    from obliviate.data import load_dataset
    from obliviate.extraction.audit import check_pool_fits_target, target_training_indices
    from obliviate.extraction.target import open_backend

    data, meta = load_dataset(args.pool), open_backend(args.target, timeout_s=args.timeout, retries=args.retries)[1]
    check_pool_fits_target(pool=data, target_meta=meta)
    available = len(data) - len(set(target_training_indices(pool=data, target_meta=meta)[0]))
    args.pool_size, args.test_size = _split_sizes(args, available=available)
    grid = _checked_grid(args)
    import ray

    from flows.audit import steal_flow
    from flows.progress import shown_progress
    from flows.runtime import ensure_ray, prefect_api

    # The Prefect server every command shares (its database is what `obliviate ui` browses), not
    # Prefect's temporary one, whose flow runs land in a database no command shows.
    with prefect_api() as api_url:
        print(f"Prefect API: {api_url}", file=sys.stderr)
        started_ray = not ray.is_initialized()
        ensure_ray(address="local", num_cpus=args.num_cpus or os.cpu_count())
        try:
            with shown_progress():
                paths = steal_flow(
                    target=args.target,
                    pool=args.pool,
                    **grid,
                    attack_steps=args.attack_steps,
                    rounds=args.rounds,
                    round_steps=args.round_steps,
                    consistency_steps=args.consistency_steps,
                    out=args.out,
                    test_size=args.test_size,
                    split_seed=args.split_seed,
                    steps=args.steps,
                    iterative=args.ifgsm,
                    drmi_starts=args.drmi_starts or None,
                    timeout_s=args.timeout,
                    retries=args.retries,
                )
        finally:
            if started_ray:
                ray.shutdown()
    print(f"audit report: {paths['markdown']} (also {paths['json']}, {paths['png']})")
    return 0


def _demo_target_mismatch(checkpoint: Path, *, data: Any, train_size: int) -> str | None:
    """What the checkpoint at ``checkpoint`` was trained on (e.g. ``"2,000 images of mnist5k"``) when that
    is not ``train_size`` images of ``data``; ``None`` when it fits or there is none."""
    if not checkpoint.exists():
        return None
    from obliviate.extraction.target import load_checkpoint

    meta = load_checkpoint(str(checkpoint))[1]
    fits = meta.get("dataset_fingerprint") == data.fingerprint and meta.get("train_size") == train_size
    if fits:
        return None
    size = meta.get("train_size")
    return f"{size:,} images of {meta.get('dataset', 'other data')}" if isinstance(size, int) else "other data"


def run_steal_demo(args: argparse.Namespace) -> int:
    """Train a LeNet-5 target on 2,000 images of ``--pool`` (a third of a smaller dataset; once, kept
    under ``--out``, and again when the one kept there was trained on other data) and audit it on a
    small grid; prints where the report is."""
    from flows.cli.target import run_train
    from obliviate.data import load_dataset
    from obliviate.extraction.audit import default_target_train_size, fit_split

    checkpoint = Path(args.out) / "target.pt"
    # The demo's small grid fills only what the user left at its default; an option given wins.
    small_grid = {k: v for k, v in DEMO_SETTINGS.items() if getattr(args, k) == args.option_defaults[k]}
    demo = argparse.Namespace(**(vars(args) | small_grid | {"target": str(checkpoint), "demo": False}))
    data = load_dataset(args.pool)
    size = len(data)
    target_size = default_target_train_size(size)
    if "pool_size" in small_grid and "test_size" in small_grid:  # digits (1,797) cannot hold 2,000 + 1,500
        demo.pool_size, demo.test_size = fit_split(
            available=size - target_size, pool_size=demo.pool_size, test_size=demo.test_size
        )
    _checked_grid(demo)
    stale = _demo_target_mismatch(checkpoint, data=data, train_size=target_size)
    if stale:
        # The demo's own target, left by a demo on other data (or sizes): the audit would refuse it.
        print(f"{checkpoint} was trained on {stale}, not the demo's {target_size:,} of {data.name}: replacing it")
    if stale or not checkpoint.exists():
        print(f"training a LeNet-5 target on {target_size:,} {args.pool} images -> {checkpoint}", flush=True)
        run_train(
            argparse.Namespace(
                data=args.pool, out=str(checkpoint), arch="lenet5", train_size=target_size, steps=600, seed=0
            )
        )
    return run_steal(demo)
