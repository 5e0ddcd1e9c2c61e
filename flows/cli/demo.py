"""``obliviate demo``: the README's main job, the whole story on the embedded default.

reduce (DRMI on mnist5k) -> extraction audit of a LeNet-5 target -> block-sequenced training of
two runs -> a deletion request -> event-triggered unlearning -> verification -> a batch of
requests (forgotten at once by rollback, exact after one retrain, its compute per request against
naive retraining), then a summary table and where each report lies. Local Ray, a Prefect server on 127.0.0.1 started on demand,
``file://`` storage, data from packages. ``--quick`` shrinks every step (used by the tests).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli import main as cli_main
from flows.cli._types import Args, flag, option, parsed

FULL = {
    "reduce": ["--data", "mnist5k", "--k", "600", "--workers", "2"],
    "target": ["--train-size", "2000", "--steps", "600"],
    "steal": [
        "--budgets",
        "50,150,300",
        "--seeds",
        "1",
        "--selectors",
        "drmi,random,cluster_centers",
        "--attackers",
        "basic,semi_supervised",
        "--pool-size",
        "1000",
        "--test-size",
        "500",
        "--steps",
        "150",
        "--consistency-steps",
        "600",
        "--drmi-starts",
        "8",
    ],
    "story": {
        "data": "digits",
        "run_ids": ("story-a", "story-b"),
        "forget_count": 5,
        "blocks": 8,
        "epochs": 3,
        "batch_requests": 4,
    },
}
QUICK = {
    "reduce": ["--data", "digits", "--k", "50", "--starts", "40", "--workers", "2"],
    "target": ["--train-size", "1000", "--steps", "200"],
    "steal": [
        "--budgets",
        "50,150",
        "--seeds",
        "1",
        "--selectors",
        "random,cluster_centers",
        "--attackers",
        "basic,semi_supervised",
        "--pool-size",
        "500",
        "--test-size",
        "300",
        "--steps",
        "80",
        "--consistency-steps",
        "300",
        "--drmi-starts",
        "4",
        "--eps",
        "0.3",
    ],
    "story": {
        "data": "digits",
        "run_ids": ("story-a",),
        "forget_count": 3,
        "blocks": 4,
        "epochs": 5,
        "train_size": 600,
        "heldout_size": 200,
        "batch_requests": 3,
    },
}


def demo_command(
    ctx: typer.Context,
    out: Annotated[
        str | None,
        option("--out", help="folder for every artefact (default ./runs/demo; with --quick ./runs/demo-quick)"),
    ] = None,
    quick: Annotated[
        bool,
        flag(
            "--quick",
            # Measured by probe 113 (end to end, with the Prefect server and Ray runtime it starts): 160 s, 114 of
            # them the extraction audit, on a 2-core host at load average 14.
            help="a small version of every step (about 3 min on a busy 2-core machine: 160 s measured at load "
            "average 14; less on an idle one)",
        ),
    ] = False,
) -> Args:
    return parsed(ctx, run_demo)


def register(app: typer.Typer) -> None:
    help = "the whole story on the embedded default: reduce, audit, train, forget, unlearn, verify"
    app.command("demo", help=help, short_help=help)(demo_command)


def demo_folder(args: Args) -> str:
    """``--out``, else ``runs/demo`` (``runs/demo-quick`` with ``--quick``).

    Apart by default: the quick demo trains its runs and target with other options, and a run id
    names one training, so the full demo must not meet the quick one's runs.
    """
    return args.out or ("runs/demo-quick" if args.quick else "runs/demo")


def run_demo(args: Args) -> int:
    from flows.runtime import prefect_api_and_ray, writable_folder

    root = writable_folder(Path(demo_folder(args)).expanduser().resolve(), what="the demo's folder (--out)")
    # One Prefect server and one Ray runtime for every step (the server started here when PREFECT_API_URL is unset),
    # both coming up at once; the steps run in this process and use them.
    with prefect_api_and_ray() as api_url:
        print(f"Prefect API: {api_url}", flush=True)
        code = _run_steps(args, root)
    _print_dashboard_hint(api_url)
    return code


def _print_dashboard_hint(api_url: str) -> None:
    """How to open the flow runs, logs and artifacts of the demo in the Prefect dashboard."""
    from flows.runtime import is_healthy, prefect_home, ui_url_of

    if is_healthy(api_url):  # PREFECT_API_URL or a running `obliviate ui`: the server is still up
        print(f"\nBrowse the flow runs, logs and artifacts now: {ui_url_of(api_url)}/runs", flush=True)
        return
    print(
        f"\nThe flow runs, logs and artifacts are kept in {prefect_home()}. To browse them: `make ui` "
        "(or `.venv/bin/obliviate ui`), then open http://127.0.0.1:4200 (Ctrl-C stops it).",
        flush=True,
    )


def _run_steps(args: Args, root: Path) -> int:
    from flows.artifacts import SUBSET_PLOT

    store_url = f"file://{root}"
    settings = QUICK if args.quick else FULL
    rows: list[dict[str, Any]] = []

    _banner("1/3 reduce: the k least mutually informative images (DRMI)")
    began = time.perf_counter()
    code = cli_main(["reduce", *settings["reduce"], "--store", store_url])
    # its picture is the report a person reads (flows.artifacts.subset_plot); summary.json lies beside it
    pictures = sorted(root.glob(f"reduce-*/{SUBSET_PLOT}"), key=lambda path: path.stat().st_mtime)
    rows.append(_row("reduce (DRMI)", began, code, str(pictures[-1]) if pictures else f"{store_url}/reduce-*"))

    _banner("2/3 extraction audit: how well k label queries steal a LeNet-5 target")
    began = time.perf_counter()
    steal_out = root / "steal"
    checkpoint = steal_out / "target.pt"
    code_steal = (
        0 if checkpoint.exists() else cli_main(["target", "train", "--out", str(checkpoint), *settings["target"]])
    )
    if code_steal == 0:
        code_steal = cli_main(["steal", "--target", str(checkpoint), "--out", str(steal_out), *settings["steal"]])
    rows.append(_row("extraction audit", began, code_steal, str(steal_out / "steal.md")))

    _banner(story_banner(settings["story"]))
    from flows.cli.story import deletion_story

    began = time.perf_counter()
    story = deletion_story(f"{store_url}/service", **settings["story"])
    story_ok = story["status"] == "done" and all(run["ids_gone"] for run in story["runs"].values())
    batch = story.get("batch") or {"requests": []}
    story_ok = story_ok and all(r["status"] == "done" and not r["late"] for r in batch["requests"])
    rows.append(_row("train + forget + unlearn", began, 0 if story_ok else 1, story["ledger"]))

    _print_story(story)
    if story.get("batch"):
        _print_batch(story["batch"])
    _print_summary(rows)
    return 0 if all(row["ok"] for row in rows) else 1


def story_banner(story: dict[str, Any]) -> str:
    """Step 3's banner: how many runs the story's settings train (the quick demo trains one, the full two)."""
    count = len(story["run_ids"])
    runs = {1: "one run", 2: "two runs"}.get(count, f"{count} runs")
    return f"3/3 train {runs} block by block, request a deletion, unlearn on the event, verify; then a batch"


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _row(step: str, began: float, code: int, where: str) -> dict[str, Any]:
    return {"step": step, "seconds": time.perf_counter() - began, "ok": code == 0, "where": where}


def _print_story(story: dict[str, Any]) -> None:
    print(f"\ndeletion request {story['request_id']}: {story['status']}, ids {story['forgotten_ids']}")
    latency = story.get("latency") or {}
    if latency:
        shown = ", ".join(f"{name} {value:.1f} s" for name, value in latency.items() if value is not None)
        print(f"latency: {shown}")
    print(
        "| run | version | held-out acc before → after | blocks retrained | speed-up | consistency with naive (noise floor) | ids gone |"
    )
    print("|---|---|---|---|---|---|---|")
    for run_id, run in story["runs"].items():
        check = run.get("verification") or {}
        consistency = check.get("consistency_with_naive")
        floor = check.get("noise_floor_consistency")
        shown = f"{consistency:.3f} ({floor:.3f})" if consistency is not None and floor is not None else "–"
        speedup = run.get("speedup_vs_full_retrain")
        print(
            f"| {run_id} | {run['version_before']} → {run['version_after']} | "
            f"{_pct(run['heldout_accuracy_before'])} → {_pct(run['heldout_accuracy_after'])} | "
            f"{len(run['blocks_retrained'] or [])} | {f'{speedup:.2f}×' if speedup else '–'} | {shown} | "
            f"{'yes' if run['ids_gone'] else 'NO'} |"
        )


def _print_batch(batch: dict[str, Any]) -> None:
    """The batch of requests (issue 11): forgotten at once by rollback, exact after one retrain, cost per request."""
    n = len(batch["requests"])
    until = batch.get("batched_until")
    shown_until = time.strftime("%H:%M:%S UTC", time.gmtime(until)) if until else "–"
    flushed_by = (
        f"flushed at once by the {batch['flushed_by_rule']} rule"
        if batch.get("flushed_by_rule")
        else f"batched until {shown_until} ({batch.get('batched_rule')} rule), then flushed by `forget --now`"
    )
    print(
        f"\nbatch of {n} deletion requests (serve --batch-window {batch['window_s'] / 3600:g}h --rollback, "
        f"floor {batch['floor_points']:g} points): {flushed_by}"
    )
    from flows.rollback import refusal_words

    if batch.get("flushed_by_rule") == "rollback_below_floor":
        print("  (a run's checkpoint before the ids is below the served-accuracy floor, so the batch retrains now)")
    elif batch.get("flushed_by_rule") == "rollback_no_earlier_model":
        print("  (the ids lie in a run's first block: no checkpoint before them is a model, so the batch retrains now)")
    for name, refusal in sorted((batch.get("rollback_refused") or {}).items()):
        print(f"  no rolled-back version for {refusal_words(f'run {name}', refusal)}")
    for run_id, interim in batch["interim"].items():
        block = interim["serve_block"]
        served = "nothing (paused)" if block is None else f"M_{block}"
        print(f"  rolled back at once: {run_id} v{interim['version']} serves {served}, which never saw the ids")
    print("| request | ids | status | forgotten after | exact after | late |")
    print("|---|---|---|---|---|---|")
    for r in batch["requests"]:
        print(
            f"| {r['request_id']} | {r['ids']} | {r['status']} | {_secs(r['forget_s'])} | {_secs(r['exact_s'])} | "
            f"{'YES' if r['late'] else 'no'} |"
        )
    for run_id, history in batch["served"].items():
        steps = " → ".join(
            f"v{h['version']} {'full' if h['serve_block'] == 'final' else _served(h['serve_block'], h['retrained'])}"
            f" ({_pct(h.get('served_accuracy', h.get('heldout_accuracy')))})"
            for h in history
        )
        if steps:
            print(f"  {run_id} served while the batch retrained: {steps}")
        elif run_id not in batch["runs_retrained"]:
            print(f"  {run_id}: none of the batch's ids is in its training data, so it keeps what it served")
        else:
            print(f"  {run_id}: retrained, but published no new version (see its ledger entries)")
    naive_blocks, naive_s = batch["naive_per_request_block_trainings"], batch["naive_per_request_seconds"]
    per_blocks, per_s = batch["per_request_block_trainings"], batch["per_request_seconds"]
    ratio = (
        f"{naive_blocks / per_blocks:.1f}× fewer block-trainings, {naive_s / per_s:.1f}× fewer seconds"
        if per_s > 0 and per_blocks > 0
        else "–"
    )
    print(
        f"batch cost: one exact retrain of {batch['block_trainings']} block-training"
        f"{'' if batch['block_trainings'] == 1 else 's'} ({batch['retrain_seconds']:.2f} s) "
        f"for {n} requests = {per_blocks:.2f} block-trainings ({per_s:.2f} s) per request vs naive retraining "
        f"{naive_blocks:.1f} block-trainings ({naive_s:.2f} s) per request: {ratio}"
    )


def _served(block: int | None, retrained: bool) -> str:
    if block is None:
        return "paused"
    return f"M'_{block}" if retrained else f"M_{block}"


def _secs(value: float | None) -> str:
    return f"{value:.1f} s" if value is not None else "–"


def _print_summary(rows: list[dict[str, Any]]) -> None:
    print("\n| step | result | seconds | report |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['step']} | {'ok' if row['ok'] else 'FAILED'} | {row['seconds']:.0f} | {row['where']} |")


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f} %" if value is not None else "–"
