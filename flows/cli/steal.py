"""``obliviate steal``: the model-extraction audit (SPEC sections 3 and 3b) as a Prefect flow over Ray.

By default it assumes the strongest attacker measured (``semi_supervised_ensemble``) buying the
queries the audit's selector (``auto``: ``cluster_centers`` below 150 queries, adaptive rounds from
150) picks. Its report leads with the fewest queries at which any attacker and selector measured
reaches 90 % and 95 % agreement with the target, naming the pair that does; the command prints that
line before the report's path. Off a terminal the log names the cells done and running at least every
``--progress-every`` seconds (a cell takes minutes); on one, a bar counts them.

``--target-output probabilities`` audits a target whose API returns class probabilities (SPEC
section 3's switch; label-only is the default): the attackers train on them, each image still costs
one query, and the report's threat model says so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli._types import Args, comma_list, dataset, flag, integer, number, option, parsed, seed
from flows.progress import PROGRESS_LOG_SECONDS

# From obliviate.defaults, not their homes in obliviate.extraction, which import torch: building the command line
# (any command's --help and parsing) must not.
from obliviate.defaults import (
    ADAPTIVE_FROM_BUDGET,
    ATTACK_CONSISTENCY_STEPS,
    ATTACK_MAX_STEPS,
    ATTACK_MIN_STEPS,
    ATTACK_ROUND_STEPS,
    ATTACK_ROUNDS,
    AUDIT_SELECTOR,
    DEFAULT_ATTACKER,
    DEFAULT_SEEDS,
    DEFAULT_SELECTOR,
    STEAL_SELECTORS,
)
from obliviate.errors import ConfigError

POOL_SIZE, TEST_SIZE = 2000, 1000
#: What ``--target-output`` takes: ``obliviate.extraction.target.OutputMode``'s values (that module imports torch).
TARGET_OUTPUTS = ("labels", "probabilities")


def target_output(text: str) -> str:
    """``--target-output``'s value: what the target answers the attacker's queries."""
    if text not in TARGET_OUTPUTS:
        raise typer.BadParameter(
            "what the target answers is 'labels' (the default: SPEC section 3's label-only oracle) or 'probabilities' "
            f"(for a target whose API returns class probabilities); got {text!r}. Give --target-output labels or "
            "--target-output probabilities."
        )
    return text


def steal_command(
    ctx: typer.Context,
    target: Annotated[
        str | None, option("--target", help="checkpoint path (obliviate target train) or http(s)://.../predict")
    ] = None,
    demo: Annotated[
        bool,
        flag(
            "--demo",
            help="train a small target under --out and audit it on a small grid (a few minutes on 2 cores); "
            "options you give replace the grid's",
        ),
    ] = False,
    pool: Annotated[
        str,
        option("--pool", parser=dataset, help="dataset for the attacker's pool and the test set (default mnist5k)"),
    ] = "mnist5k",
    target_output: Annotated[
        str,
        option(
            "--target-output",
            parser=target_output,
            metavar="{labels,probabilities}",
            help="what the target answers each query: labels (default; SPEC section 3's label-only oracle) or "
            "probabilities (an API that returns class probabilities: the attackers train on them, each image still "
            "costs one query; an HTTP target must allow them, `target serve --probabilities`)",
        ),
    ] = "labels",
    budgets: Annotated[
        str, option("--budgets", help="comma-separated query budgets (default 50,150,200,300,600)")
    ] = "50,150,200,300,600",
    attackers: Annotated[
        str,
        option(
            "--attackers",
            help="comma-separated attackers: basic, augmented, pseudo_label, semi_supervised, "
            f"semi_supervised_ensemble (default {DEFAULT_ATTACKER}, the strongest)",
        ),
    ] = DEFAULT_ATTACKER,
    selectors: Annotated[
        str,
        option(
            "--selectors",
            help=f"comma-separated selectors, any of {', '.join(STEAL_SELECTORS)}; e.g. {DEFAULT_SELECTOR},random "
            f"(default {AUDIT_SELECTOR}: {DEFAULT_SELECTOR} below {ADAPTIVE_FROM_BUDGET} queries, adaptive rounds from "
            f"{ADAPTIVE_FROM_BUDGET})",
        ),
    ] = AUDIT_SELECTOR,
    seeds: Annotated[
        int, option("--seeds", parser=integer, help=f"seeds per (selector, budget) (default {DEFAULT_SEEDS})")
    ] = DEFAULT_SEEDS,
    out: Annotated[str, option("--out", help="output directory (default runs/steal)")] = "runs/steal",
    pool_size: Annotated[
        int | None,
        option(
            "--pool-size",
            parser=integer,
            help=f"the attacker's unlabeled pool (default {POOL_SIZE}, or 2/3 of the images that did not train the "
            "target when fewer are left)",
        ),
    ] = None,
    test_size: Annotated[
        int | None,
        option(
            "--test-size",
            parser=integer,
            help=f"test images, at least 30 (default {TEST_SIZE}, or the other 1/3 likewise)",
        ),
    ] = None,
    split_seed: Annotated[
        int | None,
        option(
            "--split-seed",
            parser=seed,
            help="seed of the pool/test split (default: the target's own, so `target train --seed S` gives the "
            "bench's split S)",
        ),
    ] = None,
    substitute: Annotated[
        str, option("--substitute", help="lenet5 (default), c3f2 or resnet18 (slow on CPU)")
    ] = "lenet5",
    steps: Annotated[
        int, option("--steps", parser=integer, help="the basic attacker's training steps (default 300)")
    ] = 300,
    attack_steps: Annotated[
        int,
        option(
            "--attack-steps",
            parser=integer,
            help=f"most supervised steps of augmented / pseudo_label / semi_supervised (default {ATTACK_MAX_STEPS}); "
            f"below {ATTACK_MIN_STEPS}, the least their own schedule trains, they are cut short and the log and "
            "steal.md say so",
        ),
    ] = ATTACK_MAX_STEPS,
    rounds: Annotated[
        int, option("--rounds", parser=integer, help=f"pseudo_label self-training rounds (default {ATTACK_ROUNDS})")
    ] = ATTACK_ROUNDS,
    consistency_steps: Annotated[
        int,
        option(
            "--consistency-steps",
            parser=integer,
            help=f"semi_supervised FixMatch steps on the unlabeled pool (default {ATTACK_CONSISTENCY_STEPS})",
        ),
    ] = ATTACK_CONSISTENCY_STEPS,
    round_steps: Annotated[
        int,
        option("--round-steps", parser=integer, help=f"steps per self-training round (default {ATTACK_ROUND_STEPS})"),
    ] = ATTACK_ROUND_STEPS,
    eps: Annotated[str, option("--eps", help="FGSM radii on [0,1] inputs (default 0.1,0.2,0.3)")] = "0.1,0.2,0.3",
    ifgsm: Annotated[bool, flag("--ifgsm", help="iterative FGSM instead of FGSM")] = False,
    drmi_starts: Annotated[
        int,
        option(
            "--drmi-starts",
            parser=integer,
            help="seeded DRMI restarts (default 32; 0 = one per pool image, the SPEC default, slow)",
        ),
    ] = 32,
    num_cpus: Annotated[
        int | None, option("--num-cpus", parser=integer, help="CPUs of a local Ray runtime (default: all)")
    ] = None,
    ray_address: Annotated[
        str | None, option("--ray-address", help="Ray cluster (default RAY_ADDRESS, else a local runtime)")
    ] = None,
    timeout: Annotated[
        float, option("--timeout", parser=number, help="HTTP timeout per request, seconds (default 30)")
    ] = 30.0,
    retries: Annotated[
        int,
        option(
            "--retries",
            parser=integer,
            help="HTTP retries on timeouts and server errors (default 3); an unreachable target is retried for "
            "--target-wait",
        ),
    ] = 3,
    target_wait: Annotated[
        float,
        option(
            "--target-wait",
            parser=number,
            help="how long an HTTP target that cannot be reached (connection refused, HTTP 502/503/504: a restart, "
            "a redeploy) is retried mid-audit before the audit fails, seconds (default 120; 0: only --retries)",
        ),
    ] = 120.0,
    progress_every: Annotated[
        float,
        option(
            "--progress-every",
            parser=number,
            help=f"off a terminal (a CI log, a pipe), log the cells done and running at least this often, "
            f"seconds (default {PROGRESS_LOG_SECONDS:g}); a terminal shows bars instead",
        ),
    ] = PROGRESS_LOG_SECONDS,
) -> Args:
    # The demo's small grid fills only the options left at their defaults: it needs to know them.
    defaults = {param.name: param.get_default(ctx) for param in ctx.command.params if param.name in DEMO_SETTINGS}
    return parsed(ctx, run_steal, option_defaults=defaults)


def register(app: typer.Typer) -> None:
    help = "audit how well a black-box target can be extracted with k label queries"
    app.command("steal", help=help, short_help=help)(steal_command)


def _split_sizes(args: Args, *, available: int | None) -> tuple[int, int]:
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


def _grid_lists(args: Args) -> dict[str, list]:
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


def _checked_grid(args: Args) -> dict[str, Any]:
    """The audit grid's arguments of ``steal_flow``, once each is checked (before any work starts)."""
    from flows.audit import check_audit_grid, check_output

    grid = _grid_lists(args) | {"seeds": args.seeds, "pool_size": args.pool_size, "substitute": args.substitute}
    check_audit_grid(**grid)
    check_output(args.out)
    return grid


def run_steal(args: Args) -> int:
    from flows.cli._store import local_path

    _grid_lists(args)  # the lists' own rules first: they need nothing loaded
    local_path(args.out, flag="--out", what="the report's folder", instead="Write the report to a local folder.")
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
    from flows.runtime import check_ray_address

    ray_address = getattr(args, "ray_address", None)
    check_ray_address(ray_address or os.environ.get("RAY_ADDRESS"))  # a mistyped address, before any work
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
        progress_every_s=args.progress_every,
        target_wait_s=args.target_wait,
        target_output=args.target_output,
    )
    # What the target declares (a checkpoint's meta, a server's GET /info), read before any work: the
    # pool must fit its images, and the pool and test set the images that did not train it. The flow
    # checks again for callers of its API.
    from obliviate.data import load_dataset
    from obliviate.extraction.audit import check_pool_fits_target, target_training_indices
    from obliviate.extraction.target import open_backend, output_mode

    # Nothing is done yet, so a target not there is said at once (a mistyped port), not waited for; a server that
    # answers labels only refuses --target-output probabilities here, in words.
    output = output_mode(args.target_output, option="--target-output")
    data, meta = (
        load_dataset(args.pool),
        open_backend(args.target, timeout_s=args.timeout, retries=args.retries, wait_s=0, output=output)[1],
    )
    check_pool_fits_target(pool=data, target_meta=meta)
    available = len(data) - len(set(target_training_indices(pool=data, target_meta=meta)[0]))
    args.pool_size, args.test_size = _split_sizes(args, available=available)
    grid = _checked_grid(args)
    import ray

    from flows.audit import steal_flow
    from flows.progress import shown_progress
    from flows.runtime import prefect_api_and_ray

    started_ray = not ray.is_initialized()
    # The Prefect server every command shares (its database is what `obliviate ui` browses), not
    # Prefect's temporary one, whose flow runs land in a database no command shows.
    # A cluster (--ray-address, RAY_ADDRESS: a submitted job's own) runs the cells; else a local runtime.
    with prefect_api_and_ray(ray_address=ray_address, num_cpus=args.num_cpus or os.cpu_count()) as api_url:
        print(f"Prefect API: {api_url}", file=sys.stderr)
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
                    progress_every_s=args.progress_every,
                    target_wait_s=args.target_wait,
                    target_output=args.target_output,
                )
        finally:
            if started_ray:
                ray.shutdown()
    # The answer the audit is run for, as steal.md leads with it, before where the report lies.
    print(paths["headline"])
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


def run_steal_demo(args: Args) -> int:
    """Train a LeNet-5 target on 2,000 images of ``--pool`` (a third of a smaller dataset; once, kept
    under ``--out``, and again when the one kept there was trained on other data) and audit it on a
    small grid; prints where the report is."""
    from flows.cli.target import run_train
    from obliviate.data import load_dataset
    from obliviate.extraction.audit import default_target_train_size, fit_split

    checkpoint = Path(args.out) / "target.pt"
    # The demo's small grid fills only what the user left at its default; an option given wins.
    small_grid = {k: v for k, v in DEMO_SETTINGS.items() if getattr(args, k) == args.option_defaults[k]}
    demo = Args(**(vars(args) | small_grid | {"target": str(checkpoint), "demo": False}))
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
            Args(
                data=args.pool,
                out=str(checkpoint),
                arch="lenet5",
                train_size=target_size,
                steps=600,
                seed=0,
                overwrite=True,  # the demo replaces only its own target, said above
            )
        )
    return run_steal(demo)
