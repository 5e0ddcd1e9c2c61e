"""``obliviate serve``: serve the unlearning deployments of one store until interrupted.

Starts (or joins) a Prefect API server and a Ray runtime, then serves: the ``unlearn`` flow on
every deletion event (by default run in this process on a warm worker pool, ``--dispatch warm``;
``--dispatch runner`` lets the deployment's event trigger start each run in a subprocess), the
cron ``reconcile`` flow and the cron extraction audit. A watchdog process
(:mod:`flows.watchdog`) kills what ``serve`` started if ``serve`` dies, even by ``kill -9``, and
withdraws its announcement from the store; a clean stop withdraws it too.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from dataclasses import replace
from typing import Annotated

import typer

from flows.cli._store import StoreOption, prepare_store, store_url
from flows.cli._types import Args, choice, choices, flag, integer, number, option, parsed
from flows.cli.steal import target_output
from obliviate.defaults import DEFAULT_MIN_POINTS, DEFAULT_STOP_RULE

POLICIES = ("exact", "deepobliviate")
STOP_RULES = ("residual_ratio", "ratio", "slope")  # obliviate.unlearning.deepobliviate.StopRule
MIN_POINTS_FLOOR = 3  # a power-law fit has three parameters (DeepObliviateOptions)
DISPATCHES = ("warm", "runner")
DEFAULT_FLOOR_POINTS = 2.0


def serve_command(
    ctx: typer.Context,
    store: StoreOption = None,
    policy: Annotated[
        str,
        option(
            "--policy",
            parser=choice(*POLICIES),
            metavar=choices(*POLICIES),
            help="unlearning policy (default exact: bit-identical to retraining)",
        ),
    ] = "exact",
    epsilon: Annotated[
        float | None,
        option(
            "--epsilon",
            parser=number,
            help="with --policy deepobliviate: the stop rule's threshold ε (default 0.05; `obliviate tune unlearning` "
            "sweeps it against consistency with naive retraining)",
        ),
    ] = None,
    stop_rule: Annotated[
        str | None,
        option(
            "--stop-rule",
            parser=choice(*STOP_RULES),
            metavar=choices(*STOP_RULES),
            help=f"with --policy deepobliviate: when to stop retraining (SPEC section 5): residual_ratio "
            f"(Δ_τ−b̂)/(Δ_1−b̂) < ε, ratio Δ_τ/Δ_1 < ε, or slope |a·h·τ^(−h−1)| < ε (default {DEFAULT_STOP_RULE})",
        ),
    ] = None,
    min_points: Annotated[
        int | None,
        option(
            "--min-points",
            parser=integer,
            help=f"with --policy deepobliviate: m, the fewest Δ points before the power-law fit and the stop rule "
            f"are tried, at least {MIN_POINTS_FLOOR} (default {DEFAULT_MIN_POINTS})",
        ),
    ] = None,
    verify: Annotated[bool, flag("--verify", help="also retrain naively and record consistency")] = False,
    workers: Annotated[
        int | None, option("--workers", parser=integer, help="Ray workers per fan-out (default: cluster CPUs)")
    ] = None,
    reconcile_cron: Annotated[
        str, option("--reconcile-cron", help="reconciliation schedule (default every 5 min)")
    ] = "*/5 * * * *",
    audit_cron: Annotated[
        str,
        option("--audit-cron", help="extraction audit schedule, cron syntax (default '0 3 * * *'); 'off' disables it"),
    ] = "0 3 * * *",
    audit_target_output: Annotated[
        str | None,
        option(
            "--target-output",
            parser=target_output,
            metavar="{labels,probabilities}",
            help="what each run's model answers the scheduled extraction audit's queries, as `steal --target-output`: "
            "labels (default; SPEC section 3's label-only oracle) or probabilities (a service whose API returns class "
            "probabilities: the attackers train on them, each image still costs one query)",
        ),
    ] = None,
    lease: Annotated[
        float | None,
        option(
            "--lease",
            parser=number,
            metavar="SECONDS",
            help="a claim not renewed for this long belongs to a dead worker and is taken over (default 20)",
        ),
    ] = None,
    max_attempts: Annotated[
        int,
        option("--max-attempts", parser=integer, help="attempts per request before it is marked failed (default 3)"),
    ] = 3,
    dispatch: Annotated[
        str,
        option(
            "--dispatch",
            parser=choice(*DISPATCHES),
            metavar=choices(*DISPATCHES),
            help="warm (default): serve receives deletion events and unlearns on its warm worker pool; "
            "runner: each event triggers a deployment run in a fresh subprocess",
        ),
    ] = "warm",
    ray_address: Annotated[
        str | None, option("--ray-address", help="Ray cluster (default RAY_ADDRESS, else a local runtime)")
    ] = None,
    # issue 11: deadline-aware batching (flows/batching.py)
    batch_window: Annotated[
        str, option("--batch-window", help="hold requests this long in one batch: 1h, 1d (default 0)")
    ] = "0",
    batch_max: Annotated[
        int | None,
        option(
            "--batch-max", parser=integer, help="flush a batch once it holds this many requests (default none: no cap)"
        ),
    ] = None,
    deadline: Annotated[str, option("--deadline", help="each request's deadline after receipt (default 30d)")] = "30d",
    rollback: Annotated[
        bool, flag("--rollback", help="on acceptance, serve M_{d-1} of each affected run (exact at once)")
    ] = False,
    floor_points: Annotated[
        float | None,
        option(
            "--floor-points",
            parser=number,
            help="with --rollback: publish M_{d-1} only if its held-out accuracy is within this many points of the "
            "model before the deletion, else keep serving and flush now (default 2; 100 accepts any drop)",
        ),
    ] = None,
    keep_superseded_versions: Annotated[
        bool,
        flag(
            "--keep-superseded-versions",
            help="keep the checkpoints of versions a deletion superseded (for audit: `verify --version`, serving them "
            "again). Breaks SPEC 5's invariant: checkpoints trained on deleted ids stay stored. Default: purged once "
            "the deletion's version is published",
        ),
    ] = False,
) -> Args:
    return parsed(ctx, run_serve)


def register(app: typer.Typer) -> None:
    help = "serve event-triggered unlearning + scheduled reconcile and audit"
    app.command("serve", help=help, short_help=help)(serve_command)


def run_serve(args: Args) -> int:
    from flows.batching import save_policy
    from flows.deployments import ServiceOptions, serve_deployments
    from flows.rollback import save_rollback
    from flows.runtime import apply_prefect_defaults, check_ray_address, prefect_api_and_ray, ui_url_of
    from flows.unlearn import claim_serving
    from flows.watchdog import start_watchdog
    from obliviate.errors import ConfigError
    from obliviate.unlearning.batching import DEFAULT_MARGIN_S, BatchPolicy, parse_option_duration
    from obliviate.unlearning.deepobliviate import DEFAULT_EPSILON
    from storage.check import save_keep_superseded
    from storage.lease import DEFAULT_LEASE_S
    from storage.objects import ObjectStore

    apply_prefect_defaults()
    lease_s = DEFAULT_LEASE_S if args.lease is None else args.lease
    if not (math.isfinite(lease_s) and lease_s >= 2):
        raise ConfigError(
            f"--lease is how long a claimed request may go unrenewed before its worker counts as dead and the request "
            f"is taken over; its worker renews it every quarter of it, so it must be a finite number >= 2 (seconds); "
            f"got {lease_s:g}. The default is {DEFAULT_LEASE_S:g}: leave --lease out for it, or give 2 or more."
        )
    if args.max_attempts < 1:
        raise ConfigError(
            f"--max-attempts is how many times a request is tried before it is marked failed, so it must be >= 1; got "
            f"{args.max_attempts}. The default is 3: leave --max-attempts out for it, or give 1 or more."
        )
    # Given without --rollback it would be stored and never read: the user believes a floor guards what is served.
    if args.floor_points is not None and not args.rollback:
        raise ConfigError(
            f"--floor-points is the accuracy floor of a rolled-back version, so it needs --rollback; got --floor-points "
            f"{args.floor_points:g} without --rollback. Add --rollback, or drop --floor-points (without rollback the "
            "model before the deletion stays served until the retrain lands)."
        )
    floor_points = DEFAULT_FLOOR_POINTS if args.floor_points is None else args.floor_points
    if not 0 <= floor_points <= 100:
        raise ConfigError(
            f"--floor-points is the largest held-out accuracy drop (points) a rolled-back version may serve, so it "
            f"must be in 0..100; got {floor_points:g}. Use 0 to serve no drop at all, 100 to accept any."
        )
    if args.batch_max is not None and args.batch_max < 1:
        raise ConfigError(
            f"--batch-max is the most requests one batch holds, so it must be >= 1; got {args.batch_max}. "
            "Leave it out for no cap."
        )
    window_s = parse_option_duration("--batch-window", args.batch_window)
    deadline_s = parse_option_duration("--deadline", args.deadline)
    if deadline_s <= DEFAULT_MARGIN_S:
        raise ConfigError(
            f"--deadline must exceed the {DEFAULT_MARGIN_S / 3600:g} h kept back before each deadline for the retrain "
            f"to land; got {args.deadline!r}. Use a longer one such as 1d (default 30d)."
        )
    # forget --deadline may only shorten a request's deadline, so no batch of a request this serve accepts outlives
    # its first request's deadline less the margin: a window that long never closes before the deadline flushes it.
    if window_s >= deadline_s - DEFAULT_MARGIN_S:
        raise ConfigError(
            f"--batch-window is how long a batch waits for more requests, but a batch is flushed "
            f"{DEFAULT_MARGIN_S / 3600:g} h before its first request's deadline (--deadline) at the latest, so a window "
            f"must be shorter than the deadline less {DEFAULT_MARGIN_S / 3600:g} h: a longer one never closes, the "
            f"deadline always flushes first. Got --batch-window {args.batch_window!r} with --deadline {args.deadline!r} "
            "(default 30d). Give a shorter --batch-window, or a longer --deadline."
        )
    if args.epsilon is not None and args.policy != "deepobliviate":
        raise ConfigError(
            f"--epsilon is DeepObliviate's stop threshold, so it needs --policy deepobliviate; got --epsilon "
            f"{args.epsilon:g} with --policy {args.policy}. Add --policy deepobliviate, or drop --epsilon (exact "
            "retraining has no threshold)."
        )
    if args.epsilon is not None and not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise ConfigError(
            f"--epsilon is the stop rule's threshold, a finite number > 0 (default {DEFAULT_EPSILON:g}); got "
            f"{args.epsilon:g}. Larger stops earlier (faster, further from exact)."
        )
    for flag_name, value in (("--stop-rule", args.stop_rule), ("--min-points", args.min_points)):
        if value is not None and args.policy != "deepobliviate":
            raise ConfigError(
                f"{flag_name} is a switch of DeepObliviate's stop rule, so it needs --policy deepobliviate; got "
                f"{flag_name} {value} with --policy {args.policy}. Add --policy deepobliviate, or drop {flag_name} "
                "(exact retraining never stops early)."
            )
    if args.min_points is not None and args.min_points < MIN_POINTS_FLOOR:
        raise ConfigError(
            f"--min-points is m, the fewest Δ points before the stop rule's power-law fit Δ_t ≈ a·t^(−h) + b is tried, "
            f"so it must be at least {MIN_POINTS_FLOOR} (three parameters are fitted); got {args.min_points}. Pass "
            f"{MIN_POINTS_FLOOR} or more, or leave it unset for the default {DEFAULT_MIN_POINTS}."
        )
    if args.audit_target_output is not None and args.audit_cron == "off":
        raise ConfigError(
            f"--target-output is what the scheduled extraction audit asks for, so it needs the audit; got "
            f"--target-output {args.audit_target_output} with --audit-cron off. Give --audit-cron a schedule, or drop "
            "--target-output."
        )
    # Every option is checked before the store is created or written.
    policy = BatchPolicy(window_s=window_s, batch_max=args.batch_max, deadline_s=deadline_s)
    options = ServiceOptions(
        store=store_url(args),
        policy=args.policy,
        epsilon=DEFAULT_EPSILON if args.epsilon is None else args.epsilon,
        stop_rule=DEFAULT_STOP_RULE if args.stop_rule is None else args.stop_rule,
        min_points=DEFAULT_MIN_POINTS if args.min_points is None else args.min_points,
        verify=args.verify,
        workers=args.workers,
        reconcile_cron=args.reconcile_cron,
        audit_cron=None if args.audit_cron == "off" else args.audit_cron,
        audit_target_output=args.audit_target_output or "labels",
        lease_s=lease_s,
        max_attempts=args.max_attempts,
        dispatch=args.dispatch,
    )
    check_ray_address(args.ray_address or os.environ.get("RAY_ADDRESS"))
    store = prepare_store(options.store, write=True)
    options = replace(options, store=store)
    # The batching and rollback settings below are the store's: a second serve would change them
    # under the first, and its announcement would replace the first's.
    claim_serving(ObjectStore(store), pid=os.getpid(), host=socket.gethostname())
    save_policy(ObjectStore(store), policy)
    save_rollback(ObjectStore(store), enabled=args.rollback, floor_points=floor_points)
    save_keep_superseded(ObjectStore(store), keep=args.keep_superseded_versions)
    start_watchdog(store)  # outlives this process by design: it reaps what serve leaves behind
    # Stopped with its Ray runtime gone (a SIGTERM to serve's process group), serve ends the pass under way by
    # ray.shutdown(), which first waits this long on the dead GCS for a last flush of task events (Ray's default
    # 5000 ms: the pass was let go about 6 s after the shutdown began, now about 2 s). A live GCS answers it in ms.
    os.environ.setdefault("RAY_task_events_shutdown_flush_timeout_ms", "1000")
    with prefect_api_and_ray(ray_address=args.ray_address) as api_url:
        print(f"Prefect API: {api_url} (dashboard: {ui_url_of(api_url)})", file=sys.stderr)
        import ray

        # Flow runs execute in subprocesses of the runner: they join this Ray runtime, not a new one.
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        lost = serve_deployments(options, api_url=api_url)  # stops its worker pools as it stops
    if lost is not None:  # another serve holds the store now: this one stopped, a broken rule (exit 2)
        raise ConfigError(
            f"{lost}. This serve has stopped. Stop that one first (Ctrl-C) to serve the store from here, or serve "
            "another --store."
        )
    return 0
