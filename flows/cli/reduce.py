"""``obliviate reduce``: choose the k least mutually informative images of a pool (DRMI).

By default the ``reduce`` Prefect flow runs on Ray (tiles and restarts fanned out over actors,
everything in the store). ``--workers 0`` runs the same computation in this process with the
pure functions (:func:`run_reduce_in_process`); both give the same subset and the same H.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from flows.cli._types import Args, choice, choices, flag, flag_named, integer, number, option, parsed
from flows.cli._types import dataset as dataset_type
from flows.cli._types import seed as seed_type
from flows.progress import report, shown_progress
from obliviate.data import load_dataset
from obliviate.defaults import DEFAULT_AGGREGATE, DEFAULT_GRAY
from obliviate.errors import ConfigError

if TYPE_CHECKING:
    from obliviate.data import ImageDataset

# obliviate.reduction (numba, scipy) is imported by the functions that run a reduction, not here: building the
# command line, for any command's --help or parsing, must not load it.

DEFAULT_K = 600
GRAY_MODES = ("luma", "mean")  # obliviate.data.GrayMode, named here so --help imports nothing heavy
AGGREGATES = ("sum", "max")  # obliviate.reduction.drmi.Aggregate


def reduce_command(
    ctx: typer.Context,
    data: Annotated[
        str,
        option("--data", parser=dataset_type, help="mnist5k (default), digits, an .npz file or a dataset folder"),
    ] = "mnist5k",
    # None, not 600: a default that does not fit the pool is reported as the default, not as a choice.
    k: Annotated[int | None, option("--k", parser=integer, help=f"subset size (default {DEFAULT_K})")] = None,
    bins: Annotated[int, option("--bins", parser=integer, help="gray levels counted by MI (default 256: exact)")] = 256,
    normalize: Annotated[bool, flag("--normalize", help="normalised MI 2·MI/(H(u)+H(v))")] = False,
    gray: Annotated[
        str,
        option(
            "--gray",
            parser=choice(*GRAY_MODES),
            metavar=choices(*GRAY_MODES),
            help=f"how colour images become gray: luma (ITU-R 601-2) or per-channel mean (default {DEFAULT_GRAY})",
        ),
    ] = DEFAULT_GRAY,
    aggregate: Annotated[
        str,
        option(
            "--aggregate",
            parser=choice(*AGGREGATES),
            metavar=choices(*AGGREGATES),
            help=f"greedy initialisation's fold of a new member's MI row: sum or max (default {DEFAULT_AGGREGATE})",
        ),
    ] = DEFAULT_AGGREGATE,
    starts: Annotated[
        int | None, option("--starts", parser=integer, help="seeded start vertices (default: all n)")
    ] = None,
    seed: Annotated[int, option("--seed", parser=seed_type, help="seed for drawing start vertices (default 0)")] = 0,
    store: Annotated[
        str | None,
        option(
            "--store",
            help="store URL: file://PATH or s3://bucket/prefix (default: $OBLIVIATE_STORE, else file://./runs)",
        ),
    ] = None,
    out: Annotated[str | None, option("--out", help="local folder for results (same as --store file://OUT)")] = None,
    workers: Annotated[
        int | None,
        option(
            "--workers",
            parser=integer,
            help="Ray actors per stage (default: the cluster's CPUs); 0 runs in this process without Ray/Prefect",
        ),
    ] = None,
    tile_size: Annotated[int, option("--tile-size", parser=integer, help="MI tile side (default 512)")] = 512,
    restart_memory_mb: Annotated[
        float | None,
        option(
            "--restart-memory-mb",
            parser=number,
            help="matrix memory per restart worker (default: whole matrix up to 2 GiB, else O(n k))",
        ),
    ] = None,
    ray_address: Annotated[
        str | None, option("--ray-address", help="join this Ray cluster (default RAY_ADDRESS, else local)")
    ] = None,
    tiles_only: Annotated[bool, flag("--tiles-only", help="stop after computing and storing the MI tiles")] = False,
    plan: Annotated[
        int | None,
        option(
            "--plan",
            parser=integer,
            metavar="N",
            help="print tile count, bytes and per-worker memory for a pool of N images, computing nothing",
        ),
    ] = None,
) -> Args:
    return parsed(ctx, run_reduce)


def register(app: typer.Typer) -> None:
    help = "choose k query images by DRMI (SPEC section 2)"
    app.command("reduce", help=help, short_help=help)(reduce_command)


def _store_url(args: Args) -> str:
    store = getattr(args, "store", None)
    out = getattr(args, "out", None)
    if store and out:
        raise ConfigError(f"give either --store or --out, not both; got --store {store} and --out {out}.")
    if store:
        return store
    if out:
        from flows.cli._store import local_path

        folder = local_path(
            out, flag="--out", what="a local folder for results", instead=f"For object storage give --store {out}."
        )
        return f"file://{Path(folder).expanduser().resolve()}"
    return os.environ.get("OBLIVIATE_STORE") or f"file://{Path('runs').resolve()}"


def _prepared_store_url(args: Args) -> str:
    """The store, checked reachable and writable before any work (README "Stores")."""
    from flows.cli._store import prepare_store

    named_by = "--out" if getattr(args, "out", None) else "--store / $OBLIVIATE_STORE"
    return prepare_store(_store_url(args), write=True, named_by=named_by)


def _subset_size(k: int | None, n: int) -> int:
    """``--k`` as given, else the default, checked against a pool of ``n`` images."""
    from obliviate.reduction.drmi import check_subset_size

    if k is not None or n < 3:  # a pool under 3 images fits no k: its own message says so
        check_subset_size(DEFAULT_K if k is None else k, n=n)
        return DEFAULT_K if k is None else k
    if DEFAULT_K >= n:
        raise ConfigError(
            f"--k was not given, and its default {DEFAULT_K} does not fit this pool: k must satisfy 2 <= k < n={n}. "
            f"Pass --k with a subset size below {n}, e.g. --k {max(2, n // 10)}."
        )
    return DEFAULT_K


def _check(args: Args, dataset: ImageDataset) -> None:
    """Every option's rule, checked before any server starts or any work is stored.

    Resolves ``args.k`` to the subset size a run uses; ``--tiles-only`` uses none, so its k is
    left unchecked (the flow gets the default, which it ignores).
    """
    from flows.reduce import check_start_count, check_tile_size, restart_memory_bytes
    from obliviate.reduction.drmi import choose_starts
    from obliviate.reduction.mi import check_bins
    from obliviate.reduction.tiling import TilePlan

    n = len(dataset)
    if getattr(args, "tiles_only", False):
        args.k = DEFAULT_K if args.k is None else args.k
    else:
        args.k = _subset_size(args.k, n)
    workers = _checked_workers(args)
    if workers == 0 and getattr(args, "tiles_only", False):
        raise ConfigError(
            "--tiles-only stops after storing the MI tiles, but --workers 0 computes the matrix in this process "
            "without tiles (and would run every restart); drop --workers 0 to store tiles with Ray, or drop "
            "--tiles-only."
        )
    local_cpus = os.cpu_count() or 1
    if workers and not (getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS")) and workers > local_cpus:
        # A local runtime never grows: the reservation would wait its full timeout, then fail.
        raise ConfigError(
            f"--workers {workers} needs {workers} CPUs, but the local Ray runtime this command starts has this "
            f"machine's {local_cpus}; lower --workers to at most {local_cpus}, or join a cluster with --ray-address "
            "or RAY_ADDRESS."
        )
    if workers != 0:
        from flows.runtime import check_ray_address

        check_ray_address(getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS"))
    try:
        check_bins(levels=dataset.levels, bins=args.bins)
    except ConfigError as err:
        raise flag_named(err, flags={"bins": ("--bins", 256)}) from None
    check_start_count(args.starts, n=n)
    choose_starts(n, num_starts=args.starts, rng=np.random.default_rng(args.seed))
    check_tile_size(args.tile_size, n=n, run=True)
    plan = TilePlan(n=n, tile_size=args.tile_size)
    restart_memory_bytes(plan, k=args.k, limit_mb=getattr(args, "restart_memory_mb", None))


def _checked_workers(args: Args) -> int | None:
    workers = getattr(args, "workers", None)
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers must be 0 (in-process), a positive count, or unset; got {workers}.")
    return workers


def run_reduce(args: Args) -> int:
    if getattr(args, "plan", None) is not None:
        return print_plan(args)
    from flows.reduce import DEFAULT_BINS, exact_bins

    dataset = load_dataset(args.data, gray=getattr(args, "gray", DEFAULT_GRAY))
    _check(args, dataset)
    exact = exact_bins(args.bins, levels=dataset.levels)
    if exact != args.bins:
        print(
            f"note: --bins {args.bins} is at least the {dataset.levels} gray levels of this data, so MI counts every "
            f"level exactly, as the default does; running with the default --bins {DEFAULT_BINS}, whose stored tiles "
            "and result folder it shares.",
            file=sys.stderr,
        )
        args.bins = exact
    elif args.bins < dataset.levels:
        print(
            f"note: MI at {args.bins} bins ranks pairs differently from exact counting of this data's "
            f"{dataset.levels} gray levels (SPEC section 1: on MNIST 5k the k=600 subset scores +5.1 % worse at 32 "
            "bins).",
            file=sys.stderr,
        )
    if getattr(args, "workers", None) == 0:
        return run_reduce_in_process(args, dataset)
    return run_reduce_flow(args)


def _result_line(h: float, *, restarts: int, best: int, normalize: bool) -> str:
    """The objective of the chosen subset with its unit (MI in nats; normalised MI has none), and its restarts."""
    unit = "(normalised MI, no unit)" if normalize else "nats"
    return f"H = {h:.4f} {unit} over {restarts} restart{'' if restarts == 1 else 's'} (best start {best})"


def _written_line(result_url: str) -> str:
    """Where the result lies: the subset, its summary and its picture (``subset.png``)."""
    from flows.artifacts import SUBSET_PLOT

    return (
        f"subset written to {result_url}/subset.npy (summary: {result_url}/summary.json; "
        f"the chosen images, class shares and H per restart: {result_url}/{SUBSET_PLOT})"
    )


def print_plan(args: Args) -> int:
    """The reduction's sizes for ``--plan N`` images, without computing anything."""
    from obliviate.reduction.drmi import check_subset_size
    from obliviate.reduction.tiling import plan_report

    if args.k is None and args.plan > DEFAULT_K:
        k = DEFAULT_K
    elif args.k is None:
        # k only sizes a streaming restart worker's cache here; the largest k gives the upper bound.
        check_subset_size(2, n=args.plan)  # a pool under 3 images fits no k at all
        k = args.plan - 1
        print(
            f"note: --k not given and its default {DEFAULT_K} does not fit {args.plan} images; restart memory is "
            f"sized for the largest subset, k = {k}. Pass --k to size it for yours.",
            file=sys.stderr,
        )
    else:
        check_subset_size(args.k, n=args.plan)
        k = args.k
    workers = _checked_workers(args)
    if not workers:
        workers = os.cpu_count() or 1
        print(f"note: workers = this machine's {workers} CPUs; pass --workers for a cluster's.", file=sys.stderr)
    from flows.reduce import check_tile_size

    check_tile_size(args.tile_size, n=args.plan, run=False)  # a plan is arithmetic: no limit on the tile count
    sizes = plan_report(n=args.plan, tile_size=args.tile_size, k=k, workers=workers)
    for name, value in sizes.items():
        if name.endswith("_bytes"):
            shown = f"{value / 1e9:,.3f} GB"
        else:
            shown = f"{value:,}" if isinstance(value, int) else value
        print(f"{name:>32}: {shown}")
    return 0


def run_reduce_flow(args: Args) -> int:
    """Run the ``reduce`` flow on Ray, with a Prefect server of our own when none is configured."""
    from flows.reduce import reduce_flow
    from flows.runtime import apply_prefect_defaults, prefect_api_and_ray

    apply_prefect_defaults()
    t0 = time.perf_counter()
    store_url = _prepared_store_url(args)
    with prefect_api_and_ray(ray_address=getattr(args, "ray_address", None)) as api_url:
        print(f"Prefect API: {api_url}", file=sys.stderr)
        with shown_progress():
            summary = reduce_flow(
                data=args.data,
                k=args.k,
                store_url=store_url,
                bins=args.bins,
                normalize=args.normalize,
                starts=args.starts,
                seed=args.seed,
                workers=getattr(args, "workers", None),
                gray=getattr(args, "gray", DEFAULT_GRAY),
                aggregate=getattr(args, "aggregate", DEFAULT_AGGREGATE),
                tile_size=getattr(args, "tile_size", 512),
                restart_memory_mb=getattr(args, "restart_memory_mb", None),
                tiles_only=getattr(args, "tiles_only", False),
            )
    if getattr(args, "tiles_only", False):
        print(
            f"tiles: {summary['tiles_computed']} computed, {summary['tiles_reused']} reused; "
            f"stored at {summary['tiles_url']}"
        )
        return 0
    print(
        _result_line(summary["h"], restarts=summary["restarts"], best=summary["best_start"], normalize=args.normalize)
    )
    print("class histogram: " + "  ".join(f"{c}:{int(v)}" for c, v in enumerate(summary["class_histogram"])))
    print(
        f"tiles: {summary['tiles_computed']} computed, {summary['tiles_reused']} reused ({summary['tiles_url']}); "
        f"{summary['workers']} worker{'' if summary['workers'] == 1 else 's'}; tile stage {summary['tile_seconds']:.1f} s, "
        f"restarts {summary['restart_seconds']:.1f} s, "
        f"total {time.perf_counter() - t0:.1f} s"
    )
    print(_written_line(summary["result_url"]))
    return 0


def run_reduce_in_process(args: Args, dataset=None) -> int:
    """The whole reduction in this process with the pure functions (no Ray, no Prefect)."""
    from flows.artifacts import SUBSET_PLOT, reduction_title, subset_plot
    from flows.reduce import result_key
    from obliviate.reduction.drmi import drmi_reduce
    from obliviate.reduction.mi import mi_matrix
    from storage.objects import ObjectStore

    store = ObjectStore(_prepared_store_url(args))
    gray = getattr(args, "gray", DEFAULT_GRAY)
    aggregate = getattr(args, "aggregate", DEFAULT_AGGREGATE)
    dataset = dataset if dataset is not None else load_dataset(args.data, gray=gray)
    t0 = time.perf_counter()
    try:
        # Both stages report as the flow's do (flows.progress.report), so the bars and any listener see them.
        with shown_progress():
            matrix = mi_matrix(
                dataset.images,
                levels=dataset.levels,
                bins=args.bins,
                normalize=args.normalize,
                on_tile=lambda done, total: report("MI tiles", done, total),
            )
            mi_seconds = time.perf_counter() - t0
            result = drmi_reduce(
                matrix,
                k=args.k,
                num_starts=args.starts,
                rng=np.random.default_rng(args.seed),
                aggregate=aggregate,
                on_restarts=lambda done, total: report("restarts", done, total),
            )
    except KeyboardInterrupt:
        from flows.cli import EXIT_INTERRUPTED

        # The generic message promises a resume from stored work; this path has none to resume from.
        print(
            "obliviate reduce: interrupted. --workers 0 keeps the MI matrix and the restarts in memory and stores "
            "nothing until the end, so nothing was stored and rerunning starts over. Without --workers 0 the Ray "
            "flow stores each MI tile as it goes, and a rerun reuses them.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    key = result_key(
        fingerprint=dataset.fingerprint,
        bins=args.bins,
        normalize=args.normalize,
        k=args.k,
        starts=args.starts,
        seed=args.seed,
        aggregate=aggregate,
    )
    histogram = np.bincount(dataset.labels[result.subset], minlength=dataset.num_classes)
    summary = {
        "data": dataset.name,
        "fingerprint": dataset.fingerprint,
        "n": len(dataset),
        "k": args.k,
        "bins": args.bins,
        "normalize": args.normalize,
        "gray": gray,
        "aggregate": aggregate,
        "seed": args.seed,
        "restarts": len(result.restarts),
        "best_start": result.best_start,
        "h": result.h,
        "class_histogram": histogram.tolist(),
        "workers": 0,
        "mi_seconds": round(mi_seconds, 3),
        "restart_seconds": round(result.seconds, 3),
    }
    members = {
        "subset": store.put_array(f"{key}/subset.npy", result.subset.astype(np.int64)),
        "restarts": store.put_json(
            f"{key}/restarts.json",
            [{"start": r.start, "h_greedy": r.h_greedy, "h": r.h, "swaps": r.swaps} for r in result.restarts],
        ),
        "plot": store.put_bytes(
            f"{key}/{SUBSET_PLOT}",
            subset_plot(
                pool=dataset,
                subset=result.subset,
                restart_h=[r.h for r in result.restarts],
                title=reduction_title(summary),
            ),
        ),
        "summary": store.put_json(f"{key}/summary.json", summary),
    }
    store.commit_manifest(f"{key}/manifest.json", members, {"kind": "drmi-reduction", "h": result.h})
    print(_result_line(result.h, restarts=len(result.restarts), best=result.best_start, normalize=args.normalize))
    print("class histogram: " + "  ".join(f"{c}:{int(v)}" for c, v in enumerate(histogram)))
    print(_written_line(store.uri(key)))
    return 0
