"""Latency and fan-out of the unlearning service → bench/results/service_latency.json.

Measured on the embedded default (``file://`` store), a real ``prefect server`` on 127.0.0.1 and
one local Ray runtime (2 CPUs), with the same pieces a user runs (``obliviate serve`` in a
subprocess, deletion requests through the ledger and a Prefect event). One run, two phases:

Phase A, ``serve`` running:

* event-to-unlearning-start and end-to-end latency of one small model (LeNet-5 on digits, 6
  blocks), through ``serve --dispatch warm`` (the default: serve receives the event over
  Prefect's event stream and runs the ``unlearn`` flow itself on its warm worker pool) and,
  for comparison, ``serve --dispatch runner`` (the deployment's event trigger; the runner starts
  the flow run in a fresh subprocess);
* one exact unlearning through the service vs the same unlearning in-process (issue 14,
  target <= 1.15): two copies of one trained store; per repeat the same ids (in block 1, so
  every block is retrained) are forgotten in one copy by ``ChainWorker.unlearn`` in this
  process and in the other through ``serve --dispatch warm`` (request, event, ``unlearn`` flow,
  pooled Ray worker, ledger ``done``), interleaved with the order alternating; ratio = request
  to ``done`` / in-process wall, median over repeats after one warm-up pair; the new versions'
  held-out accuracies must be equal. Each pair has a per-stage breakdown from the ledger's own
  timestamps.

Phase B, ``serve`` stopped (nothing else of ours on the two cores): fan-out efficiency of 2
runs on 2 workers, T(1 worker) / (2 x T(2 workers)), same work (copies of one store with two
trained runs; ids in block 1 of both, so every block is retrained), through the ``reconcile``
flow in this process. Per repeat the 1- and 2-worker measurements alternate, on a **warm** pool
(:func:`flows.train.warm_pool`: actors started, every run's data loaded and torch warmed up
before the clock starts, as under ``serve``) and on a **cold** pool (fresh actors: actor start,
data and torch's first step inside the measurement), for a small and a 5x heavier workload.
Each worker also reports the CPU seconds its process used for the call; CPU seconds per second
of fan-out per worker (``cpu_share_per_worker``, 1.0 = a whole core each) tells a fan-out that
wastes work from one that got less CPU: on a shared machine with ``sched_autogroup`` on, a
session gets one share however many processes it runs.

Usage (one command; takes the machine-wide benchmark lock):
``flock /work/bench.lock nice -n 5 .venv/bin/python bench/service_latency.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.chains import ChainWorker
from flows.cli.story import request_latencies, serving
from flows.deployments import POOL_KEY
from flows.reconcile import reconcile_flow
from flows.train import pool_actor_name, run_spec, warm_pool
from flows.unlearn import submit_deletion, wait_for_request
from storage.ledger import DeletionLedger
from storage.objects import ObjectStore
from storage.registry import RunRegistry

RESULTS = Path(__file__).resolve().parent / "results" / "service_latency.json"
SMALL = {
    "data": "digits",
    "model": "lenet5",
    "blocks": 6,
    "epochs": 3,
    "batch_size": 32,
    "learning_rate": 0.01,
    "schedule": "constant",
    "seed": 0,
    "train_size": 1200,
    "heldout_size": 300,
}
# Fan-out workloads: the small one (about 1 s of training per run on an idle core), and a heavier
# one (5x the epochs) where fixed per-run costs (loading data and checkpoints) weigh less.
FANOUT = {**SMALL, "epochs": 8, "batch_size": 16}
FANOUT_HEAVY = {**SMALL, "epochs": 40, "batch_size": 16}


def _train(url: str, run_id: str, *, split_seed: int, options: dict) -> dict:
    return ChainWorker(url).train(run_spec(run_id=run_id, split_seed=split_seed, **options))


def _kill_pool(url: str, size: int = 4) -> None:
    """Stop one store's pooled workers (the other stores' pools, serve's included, stay)."""
    import ray

    from flows.train import RAY_NAMESPACE

    for index in range(size):
        try:
            ray.kill(ray.get_actor(pool_actor_name(url, index), namespace=RAY_NAMESPACE), no_restart=True)
        except ValueError:
            pass


def stage_breakdown(url: str, request_id: str, run_id: str) -> dict:
    """Seconds per stage of one served request, from the ledger's and the worker's own timestamps."""
    ledger = DeletionLedger(ObjectStore(url))
    entry = ledger.get(request_id)
    requested = float(entry.request["requested_at"])
    history = ledger.history(request_id)
    claimed = next((h["at"] for h in history if h["status"] == "claimed"), None)
    done = next((h["at"] for h in history if h["status"] == "done"), None)
    flow_started = min(
        (
            float(e["received_at"])
            for e in ledger.events()
            if e.get("request_id") == request_id and e.get("outcome") == "processing"
        ),
        default=None,
    )
    audit = entry.details["runs"][run_id]
    worker_start, published = float(audit["started_at"]), float(audit["published_at"])

    def gap(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    return {
        "request to unlearn flow running (event delivery, flow-run start)": gap(requested, flow_started),
        "flow running to claim (ledger, batch gate, claim)": gap(flow_started, claimed),
        "claim to worker start (specs, Ray dispatch)": gap(claimed, worker_start),
        "worker: chain load, retraining (checkpoint writes overlapped), publish": published - worker_start,
        "worker retraining alone": float(audit["wall_seconds"]),
        "publish to ledger done (settle)": gap(published, done),
        "request to done": gap(requested, done),
    }


def _wait_pool_warm(url: str, timeout_s: float = 120.0) -> dict | None:
    """Wait until a `serve --dispatch warm` of ``url`` reports its pool warm (service/pool.json)."""
    store = ObjectStore(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if store.exists(POOL_KEY):
            return store.get_json(POOL_KEY)
        time.sleep(0.2)
    return None


def measure_latency(root: Path, api_url: str, repeats: int, dispatch: str) -> dict:
    url = f"file://{root}/latency-{dispatch}"
    _train(url, "small", split_seed=0, options=SMALL)
    spec = RunRegistry(ObjectStore(url)).spec("small")
    samples = []
    with serving(url, api_url=api_url, extra_args=["--dispatch", dispatch]) as process:
        pool = _wait_pool_warm(url) if dispatch == "warm" else None
        time.sleep(3)  # let serve settle (runner polling), as a long-running serve would be
        for repeat in range(repeats):
            ids = list(spec.train_ids[10 * repeat : 10 * repeat + 3])
            request = submit_deletion(url, ids, dataset="digits", reason="bench")
            entry = wait_for_request(url, request["request_id"], timeout_s=300, poll_s=0.5)
            assert entry["status"] == "done", entry
            audit = entry["details"]["runs"]["small"]
            samples.append(
                {
                    **request_latencies(url, request["request_id"]),
                    "request_id": request["request_id"],
                    "first_affected_block": audit["first_affected_block"],
                    "worker_wall_s": audit["wall_seconds"],
                    "to_version": audit["to_version"],
                    "stages_s": stage_breakdown(url, request["request_id"], "small"),
                }
            )
        log_path = process.log_path
    _kill_pool(url)
    return {
        "dispatch": dispatch,
        "pool": pool,
        "samples": samples,
        "serve_log": log_path,
        "median": {
            k: statistics.median(s[k] for s in samples)
            for k in ("event_to_unlearning_start_s", "event_to_worker_start_s", "end_to_end_s")
        },
    }


def measure_service_vs_inprocess(root: Path, api_url: str, repeats: int, options: dict) -> dict:
    served_url, local_url = f"file://{root}/compare-served", f"file://{root}/compare-local"
    _train(served_url, "cmp", split_seed=0, options=options)
    shutil.copytree(root / "compare-served", root / "compare-local")
    block_one = sorted(RunRegistry(ObjectStore(served_url)).entry("cmp")["block_sample_ids"][0])
    local = ChainWorker(local_url)
    samples = []
    with serving(served_url, api_url=api_url, extra_args=["--dispatch", "warm"]):
        _wait_pool_warm(served_url)
        time.sleep(3)
        for repeat in range(repeats + 1):
            ids = [int(i) for i in block_one[2 * repeat : 2 * repeat + 2]]
            request_id = f"cmp-{repeat}"
            measured: dict = {"repeat": repeat, "ids": ids, "load_before": os.getloadavg()}
            for side in ["local", "served"] if repeat % 2 == 0 else ["served", "local"]:
                if side == "local":
                    began = time.perf_counter()
                    audit = local.unlearn("cmp", {request_id: ids})
                    measured["inprocess_s"] = time.perf_counter() - began
                    measured["inprocess_retrain_s"] = audit["wall_seconds"]
                    measured["inprocess_accuracy"] = audit.get("heldout_accuracy")
                else:
                    request = submit_deletion(served_url, ids, dataset="digits", reason="bench", request_id=request_id)
                    entry = wait_for_request(served_url, request["request_id"], timeout_s=600, poll_s=0.5)
                    assert entry["status"] == "done", entry
                    run_audit = entry["details"]["runs"]["cmp"]
                    measured.update(request_latencies(served_url, request["request_id"]))
                    measured["served_worker_s"] = float(run_audit["published_at"]) - float(run_audit["started_at"])
                    measured["served_accuracy"] = run_audit.get("heldout_accuracy")
                    measured["stages_s"] = stage_breakdown(served_url, request["request_id"], "cmp")
            measured["load_after"] = os.getloadavg()
            measured["ratio"] = measured["end_to_end_s"] / measured["inprocess_s"]
            measured["worker_ratio"] = measured["served_worker_s"] / measured["inprocess_s"]
            samples.append(measured)
    _kill_pool(served_url)
    counted = samples[1:]  # the first deletion of each side: the in-process side loads its data there
    stages = {
        stage: statistics.median(s["stages_s"][stage] for s in counted if s["stages_s"][stage] is not None)
        for stage in counted[0]["stages_s"]
        if any(s["stages_s"][stage] is not None for s in counted)
    }
    return {
        "samples": samples,
        "ratio_median": statistics.median(s["ratio"] for s in counted),
        "worker_ratio_median": statistics.median(s["worker_ratio"] for s in counted),
        "inprocess_median_s": statistics.median(s["inprocess_s"] for s in counted),
        "served_median_s": statistics.median(s["end_to_end_s"] for s in counted),
        "stages_median_s": stages,
        "identical_accuracy": all(s["inprocess_accuracy"] == s["served_accuracy"] for s in samples),
    }


def _fanout_template(root: Path, options: dict, tag: str) -> tuple[Path, list[int]]:
    template = root / f"fanout-{tag}-template"
    url = f"file://{template}"
    _train(url, "fan-a", split_seed=0, options=options)
    _train(url, "fan-b", split_seed=1, options=options)
    registry = RunRegistry(ObjectStore(url))
    a, b = registry.entry("fan-a"), registry.entry("fan-b")
    # Ids in block 1 of both runs: both retrain every block, the same work in every measurement.
    return template, sorted(set(a["block_sample_ids"][0]) & set(b["block_sample_ids"][0]))[:2]


def measure_fanout_once(root: Path, template: Path, ids: list[int], *, workers: int, warm: bool, name: str) -> dict:
    path = root / name
    shutil.copytree(template, path)
    url = f"file://{path}"
    submit_deletion(url, ids, dataset="digits", emit=False)
    warm_summary = None
    if warm:  # as under `serve`: actors started, data loaded, torch warmed up before any request
        warm_summary = warm_pool(url, size=workers)
    # cold: the fan-out starts fresh actors; their start, data loading and first step are measured
    began = time.perf_counter()
    result = reconcile_flow(store=url, workers=workers)
    wall = time.perf_counter() - began
    assert list(result["settled"].values()) == ["done"], result
    runs = result["runs"]
    out = {
        "workers": workers,
        "warm": warm,
        "fanout_seconds": result["fanout"]["seconds"],
        "flow_seconds": wall,
        "per_run_worker_seconds": {r: float(runs[r]["published_at"]) - float(runs[r]["started_at"]) for r in runs},
        "per_run_retrain_seconds": {r: runs[r]["wall_seconds"] for r in runs},
        "per_run_cpu_seconds": {r: runs[r].get("cpu_seconds") for r in runs},
        # CPU seconds the workers got per second of fan-out per worker: 1.0 = a whole core each.
        "cpu_share_per_worker": sum(float(runs[r].get("cpu_seconds") or 0.0) for r in runs)
        / (workers * result["fanout"]["seconds"]),
        "warm_up": warm_summary,
        "load": os.getloadavg(),
    }
    _kill_pool(url)
    shutil.rmtree(path, ignore_errors=True)
    return out


def measure_fanout(root: Path, repeats: int, options: dict, tag: str) -> dict:
    template, ids = _fanout_template(root, options, tag)
    samples = []
    for repeat in range(repeats):
        for warm in (True, False):
            order = (1, 2) if repeat % 2 == 0 else (2, 1)
            pair = {
                w: measure_fanout_once(
                    root, template, ids, workers=w, warm=warm, name=f"fanout-{tag}-{repeat}-{warm}-{w}"
                )
                for w in order
            }
            samples.append(
                {
                    "repeat": repeat,
                    "warm": warm,
                    "one_worker": pair[1],
                    "two_workers": pair[2],
                    "efficiency": pair[1]["fanout_seconds"] / (2 * pair[2]["fanout_seconds"]),
                }
            )

    def summary(warm: bool) -> dict:
        chosen = [s for s in samples if s["warm"] is warm]
        return {
            "efficiency_median": statistics.median(s["efficiency"] for s in chosen),
            "efficiencies": [round(s["efficiency"], 3) for s in chosen],
            "one_worker_median_s": statistics.median(s["one_worker"]["fanout_seconds"] for s in chosen),
            "two_workers_median_s": statistics.median(s["two_workers"]["fanout_seconds"] for s in chosen),
            "cpu_share_per_worker_median": {
                "one_worker": statistics.median(s["one_worker"]["cpu_share_per_worker"] for s in chosen),
                "two_workers": statistics.median(s["two_workers"]["cpu_share_per_worker"] for s in chosen),
            },
            "cpu_seconds_per_run_median": {
                "one_worker": statistics.median(
                    v for s in chosen for v in s["one_worker"]["per_run_cpu_seconds"].values() if v is not None
                ),
                "two_workers": statistics.median(
                    v for s in chosen for v in s["two_workers"]["per_run_cpu_seconds"].values() if v is not None
                ),
            },
        }

    return {"ids": ids, "samples": samples, "warm": summary(True), "cold": summary(False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from flows.runtime import apply_prefect_defaults, ensure_ray, prefect_api

    apply_prefect_defaults()
    root = Path(tempfile.mkdtemp(prefix="obliviate-bench-"))
    load_before = os.getloadavg()
    began = time.time()
    with prefect_api(home=root / "prefect") as api_url:
        ensure_ray(num_cpus=2)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        # Phase A: serve running.
        latency = measure_latency(root, api_url, args.repeats, "warm")
        latency_runner = measure_latency(root, api_url, 2, "runner")
        compare = measure_service_vs_inprocess(root, api_url, args.repeats, FANOUT_HEAVY)
        # Phase B: serve stopped.
        fan = measure_fanout(root, args.repeats, FANOUT, "small")
        heavy = measure_fanout(root, args.repeats, FANOUT_HEAVY, "heavy")
    shutil.rmtree(root, ignore_errors=True)
    median = latency["median"]
    stages = compare["stages_median_s"]
    out = {
        "headline": [
            {
                "metric": "one exact unlearning through the service / the same in-process (heavier run, all blocks)",
                "value": round(compare["ratio_median"], 3),
                "target": 1.15,
                "better": "lower",
                "unit": "ratio (median of interleaved pairs)",
                "peer": f"in-process ChainWorker.unlearn {compare['inprocess_median_s']:.2f} s vs request to done "
                f"{compare['served_median_s']:.2f} s through `serve --dispatch warm`; worker alone "
                f"{compare['worker_ratio_median']:.2f}x; same accuracy: {compare['identical_accuracy']}",
            },
            {
                "metric": "fanout_efficiency_2_runs_2_workers (warm pool)",
                "value": round(fan["warm"]["efficiency_median"], 3),
                "target": 0.85,
                "better": "higher",
                "unit": "fraction (median of interleaved 1-/2-worker pairs)",
                "peer": f"same 2 unlearnings on 1 warm worker: {fan['warm']['one_worker_median_s']:.2f} s vs "
                f"{fan['warm']['two_workers_median_s']:.2f} s on 2; cold pool {fan['cold']['efficiency_median']:.3f}; "
                f"CPU share per worker 1w/2w {fan['warm']['cpu_share_per_worker_median']['one_worker']:.2f}/"
                f"{fan['warm']['cpu_share_per_worker_median']['two_workers']:.2f}",
            },
            {
                "metric": "fanout_efficiency_2_runs_2_workers_heavier_runs (5x epochs, warm pool)",
                "value": round(heavy["warm"]["efficiency_median"], 3),
                "target": 0.85,
                "better": "higher",
                "unit": "fraction (median of interleaved 1-/2-worker pairs)",
                "peer": f"1 warm worker: {heavy['warm']['one_worker_median_s']:.2f} s vs "
                f"{heavy['warm']['two_workers_median_s']:.2f} s on 2; cold pool "
                f"{heavy['cold']['efficiency_median']:.3f}",
            },
            {
                "metric": "fanout_efficiency_2_runs_2_workers (cold pool: actor start, data, first step measured)",
                "value": round(fan["cold"]["efficiency_median"], 3),
                "target": None,
                "better": "higher",
                "unit": "fraction",
                "peer": f"1 cold worker {fan['cold']['one_worker_median_s']:.2f} s vs "
                f"{fan['cold']['two_workers_median_s']:.2f} s on 2",
            },
            {
                "metric": "event_to_unlearning_start_s (median, serve --dispatch warm: flow claims the request)",
                "value": round(median["event_to_unlearning_start_s"], 2),
                "target": 10,
                "better": "lower",
                "unit": "s",
                "peer": f"serve --dispatch runner (deployment trigger, runner subprocess): "
                f"{latency_runner['median']['event_to_unlearning_start_s']:.2f} s",
            },
            {
                "metric": "event_to_worker_start_s (median, serve --dispatch warm: Ray worker starts retraining)",
                "value": round(median["event_to_worker_start_s"], 2),
                "target": 10,
                "better": "lower",
                "unit": "s",
                "peer": f"--dispatch runner: {latency_runner['median']['event_to_worker_start_s']:.2f} s",
            },
            {
                "metric": "end_to_end_deletion_latency_s (median, one small model: LeNet-5/digits, 6 blocks)",
                "value": round(median["end_to_end_s"], 2),
                "target": None,
                "better": "lower",
                "unit": "s",
                "peer": f"--dispatch runner: {latency_runner['median']['end_to_end_s']:.2f} s",
            },
        ],
        "service_vs_inprocess": compare,
        "service_stages_median_s": stages,
        "latency": latency,
        "latency_runner": latency_runner,
        "fanout": fan,
        "fanout_heavy": heavy,
        "config": {
            "small": SMALL,
            "fanout": FANOUT,
            "fanout_heavy": FANOUT_HEAVY,
            "store": "file:// (embedded default)",
            "repeats": args.repeats,
            "fanout_note": "warm = flows.train.warm_pool before the clock (actors up, data loaded, torch "
            "warmed up), as under `obliviate serve`; cold = fresh actors started inside the measurement",
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "wall_s": time.time() - began,
            "note": "2 cores shared with other jobs; load averages (per sample too) show the contention",
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2, default=str))
    for row in out["headline"]:
        print(f"{row['metric']}: {row['value']} {row['unit']} (target {row['target']}; {row['peer']})")
    print("service stages (median s):", json.dumps(stages, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
