"""Latency and fan-out of the unlearning service → bench/results/service_latency.json.

Measured on the embedded default (``file://`` store), a real ``prefect server`` on 127.0.0.1 and
one local Ray runtime (2 CPUs), with the same pieces a user runs (``obliviate serve`` in a
subprocess, deletion requests through the ledger and a Prefect event):

* event-to-unlearning-start: from the request (ledger time; the event is emitted right after)
  to the ``unlearn`` flow claiming it, and to the Ray worker starting on it (target <= 10 s);
* end-to-end deletion latency for one small model (LeNet-5 on digits, 6 blocks): request to
  ledger ``done`` with the new version current;
* fan-out efficiency: 2 affected runs unlearned on 1 worker vs on 2 workers, same work (fresh
  stores with identical runs, ids in block 1 so every block is retrained), efficiency =
  T(1 worker) / (2 x T(2 workers)) (target >= 85 %), on a warm worker pool (as under ``serve``
  after its first deletion).
* one exact unlearning through the service vs the same unlearning in-process (issue 14): two
  copies of one trained store; per repeat, the same ids (in block 1, so every block is
  retrained) are forgotten in one copy by ``ChainWorker.unlearn`` in this process and in the
  other through the service (request, event, ``unlearn`` flow, warm Ray worker, ledger
  ``done``), the two interleaved with the order alternating; ratio = service end to end /
  in-process wall, median over repeats (after one warm-up deletion each, so both sides have
  their data loaded); the new versions' held-out accuracies must be equal.

Usage: ``nice -n 10 python bench/service_latency.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.chains import ChainWorker
from flows.cli.story import request_latencies, serving
from flows.reconcile import reconcile_flow
from flows.train import run_spec, worker_pool
from flows.unlearn import submit_deletion, wait_for_request
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


def measure_latency(root: Path, api_url: str, repeats: int) -> dict:
    url = f"file://{root}/latency"
    _train(url, "small", split_seed=0, options=SMALL)
    spec = RunRegistry(ObjectStore(url)).spec("small")
    samples = []
    with serving(url, api_url=api_url) as process:
        time.sleep(3)  # let the runner start polling, as a long-running serve would be
        for repeat in range(repeats):
            ids = list(spec.train_ids[10 * repeat : 10 * repeat + 3])
            request = submit_deletion(url, ids, dataset="digits", reason="bench")
            entry = wait_for_request(url, request["request_id"], timeout_s=300)
            assert entry["status"] == "done", entry
            audit = entry["details"]["runs"]["small"]
            samples.append(
                {
                    **request_latencies(url, request["request_id"]),
                    "request_id": request["request_id"],
                    "first_affected_block": audit["first_affected_block"],
                    "worker_wall_s": audit["wall_seconds"],
                    "to_version": audit["to_version"],
                }
            )
        log_path = process.log_path
    return {
        "samples": samples,
        "serve_log": log_path,
        "median": {
            k: statistics.median(s[k] for s in samples)
            for k in ("event_to_unlearning_start_s", "event_to_worker_start_s", "end_to_end_s")
        },
    }


def measure_fanout(root: Path, workers: int, options: dict, tag: str) -> dict:
    url = f"file://{root}/fanout-{tag}-{workers}"
    _train(url, "fan-a", split_seed=0, options=options)
    _train(url, "fan-b", split_seed=1, options=options)
    registry = RunRegistry(ObjectStore(url))
    a, b = registry.entry("fan-a"), registry.entry("fan-b")
    # Ids in block 1 of both runs: both retrain every block, the same work in both measurements.
    shared = sorted(set(a["block_sample_ids"][0]) & set(b["block_sample_ids"][0]))[:2]
    submit_deletion(url, shared, dataset="digits", emit=False)
    # Warm pool, as under `serve` after the first deletion: time the unlearning, not process start-up.
    import ray

    ray.get([actor.pid.remote() for actor in worker_pool(url, workers)])
    began = time.perf_counter()
    result = reconcile_flow(store=url, workers=workers)
    wall = time.perf_counter() - began
    assert list(result["settled"].values()) == ["done"], result
    return {
        "workers": workers,
        "ids": shared,
        "fanout_seconds": result["fanout"]["seconds"],
        "flow_seconds": wall,
        "per_run_worker_seconds": {r: result["runs"][r]["wall_seconds"] for r in result["runs"]},
    }


def measure_service_vs_inprocess(root: Path, api_url: str, repeats: int, options: dict) -> dict:
    import shutil

    served_url, local_url = f"file://{root}/compare-served", f"file://{root}/compare-local"
    _train(served_url, "cmp", split_seed=0, options=options)
    shutil.copytree(root / "compare-served", root / "compare-local")
    block_one = sorted(RunRegistry(ObjectStore(served_url)).entry("cmp")["block_sample_ids"][0])
    local = ChainWorker(local_url)
    samples = []
    with serving(served_url, api_url=api_url):
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
                    measured["inprocess_accuracy"] = audit.get("heldout_accuracy")
                else:
                    request = submit_deletion(served_url, ids, dataset="digits", reason="bench", request_id=request_id)
                    entry = wait_for_request(served_url, request["request_id"], timeout_s=600)
                    assert entry["status"] == "done", entry
                    run_audit = entry["details"]["runs"]["cmp"]
                    measured.update(request_latencies(served_url, request["request_id"]))
                    measured["served_worker_s"] = run_audit["wall_seconds"]
                    measured["served_accuracy"] = run_audit.get("heldout_accuracy")
            measured["load_after"] = os.getloadavg()
            to_worker = measured["event_to_worker_start_s"] or 0.0
            measured["breakdown_s"] = {
                "scheduling: request to flow claim": measured["event_to_unlearning_start_s"],
                "scheduling + actor dispatch: request to worker start": to_worker,
                "worker: data, retraining, checkpoint writes, publish": measured["served_worker_s"],
                "after the worker: ledger done": measured["end_to_end_s"] - to_worker - measured["served_worker_s"],
            }
            measured["ratio"] = measured["end_to_end_s"] / measured["inprocess_s"]
            measured["worker_ratio"] = measured["served_worker_s"] / measured["inprocess_s"]
            samples.append(measured)
    counted = samples[1:]  # the first deletion of each side loads data and warms the worker
    return {
        "samples": samples,
        "ratio_median": statistics.median(s["ratio"] for s in counted),
        "worker_ratio_median": statistics.median(s["worker_ratio"] for s in counted),
        "inprocess_median_s": statistics.median(s["inprocess_s"] for s in counted),
        "served_median_s": statistics.median(s["end_to_end_s"] for s in counted),
        "identical_accuracy": all(s["inprocess_accuracy"] == s["served_accuracy"] for s in samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from flows.runtime import apply_prefect_defaults, ensure_ray, prefect_api

    apply_prefect_defaults()
    root = Path(tempfile.mkdtemp(prefix="obliviate-bench-"))
    load_before = os.getloadavg()
    with prefect_api(home=root / "prefect") as api_url:
        ensure_ray(num_cpus=2)
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        latency = measure_latency(root, api_url, args.repeats)
        fan1 = measure_fanout(root, 1, FANOUT, "small")
        fan2 = measure_fanout(root, 2, FANOUT, "small")
        heavy1 = measure_fanout(root, 1, FANOUT_HEAVY, "heavy")
        heavy2 = measure_fanout(root, 2, FANOUT_HEAVY, "heavy")
        compare = measure_service_vs_inprocess(root, api_url, args.repeats, FANOUT_HEAVY)
    efficiency = fan1["fanout_seconds"] / (2 * fan2["fanout_seconds"])
    heavy_efficiency = heavy1["fanout_seconds"] / (2 * heavy2["fanout_seconds"])
    median = latency["median"]
    out = {
        "headline": [
            {
                "metric": "event_to_unlearning_start_s (median, flow claims the request)",
                "value": round(median["event_to_unlearning_start_s"], 2),
                "target": 10,
                "better": "lower",
                "unit": "s",
                "peer": None,
            },
            {
                "metric": "event_to_worker_start_s (median, Ray worker starts retraining)",
                "value": round(median["event_to_worker_start_s"], 2),
                "target": 10,
                "better": "lower",
                "unit": "s",
                "peer": None,
            },
            {
                "metric": "end_to_end_deletion_latency_s (median, one small model: LeNet-5/digits, 6 blocks)",
                "value": round(median["end_to_end_s"], 2),
                "target": None,
                "better": "lower",
                "unit": "s",
                "peer": None,
            },
            {
                "metric": "fanout_efficiency_2_runs_2_workers",
                "value": round(efficiency, 3),
                "target": 0.85,
                "better": "higher",
                "unit": "fraction",
                "peer": f"same 2 unlearnings on 1 worker: {fan1['fanout_seconds']:.1f} s vs {fan2['fanout_seconds']:.1f} s on 2",
            },
            {
                "metric": "fanout_efficiency_2_runs_2_workers_heavier_runs (5x epochs)",
                "value": round(heavy_efficiency, 3),
                "target": 0.85,
                "better": "higher",
                "unit": "fraction",
                "peer": f"1 worker: {heavy1['fanout_seconds']:.1f} s vs {heavy2['fanout_seconds']:.1f} s on 2",
            },
            {
                "metric": "one exact unlearning through the service / the same in-process (heavier run, all blocks)",
                "value": round(compare["ratio_median"], 3),
                "target": 1.15,
                "better": "lower",
                "unit": "ratio (median of interleaved pairs)",
                "peer": f"in-process ChainWorker.unlearn {compare['inprocess_median_s']:.1f} s vs "
                f"request to done {compare['served_median_s']:.1f} s; worker alone "
                f"{compare['worker_ratio_median']:.2f}x; same accuracy: {compare['identical_accuracy']}",
            },
        ],
        "latency": latency,
        "service_vs_inprocess": compare,
        "fanout": {"one_worker": fan1, "two_workers": fan2, "efficiency": efficiency},
        "fanout_heavy": {"one_worker": heavy1, "two_workers": heavy2, "efficiency": heavy_efficiency},
        "config": {
            "small": SMALL,
            "fanout": FANOUT,
            "fanout_heavy": FANOUT_HEAVY,
            "store": "file:// (embedded default)",
            "repeats": args.repeats,
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "note": "2 cores shared with other jobs; load averages show the contention",
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2, default=str))
    for row in out["headline"]:
        print(f"{row['metric']}: {row['value']} {row['unit']} (target {row['target']})")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
