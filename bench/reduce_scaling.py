"""Scaling of the distributed ``reduce`` flow against the in-process pure functions (issues 4, 14).

One command, about 8-12 minutes on 2 busy cores:

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python bench/reduce_scaling.py [--n 5000] [--k 600] [--repeats 3]

On n = 5,000 real MNIST images (mnist5k), k = 600, one restart per image (the SPEC default), it
measures in the same process, interleaved (each repeat runs the four configurations, in an order
rotated from one repeat to the next):

* in-process: :func:`obliviate.reduction.mi.mi_matrix` then :func:`obliviate.reduction.drmi.drmi_reduce` with numba
  limited to 1 thread, and again with 2 threads (equal total threads to 1 and 2 workers);
* the ``reduce`` flow on a local Ray runtime with a real Prefect server, 1 and 2 workers of one
  numba thread each, every run on a fresh store (no tile reuse), the warm worker pool reused
  from run to run as a long-lived process (the CLI, a served deployment) reuses it.

Headline: the flow's wall time over the in-process one on the same threads, the median over
repeats of the per-repeat ratio (each pair ran minutes apart at most), and whether every run gave
the same subset and H. Beside it: per-configuration medians, every run with the load average
before and after (the machine is shared: ratios are what to read, not absolute seconds), the
flow's per-stage breakdown (scheduling, actor start, data preparation, object-store transfer,
compute, storage write), and parallel efficiency t(1) / (2 t(2)). Prefect server start and Ray
start-up are paid once per process and are reported apart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from obliviate.data import load_dataset
from obliviate.reduction.drmi import drmi_reduce
from obliviate.reduction.mi import mi_matrix


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def in_process(images: np.ndarray, *, k: int, threads: int) -> dict:
    numba.set_num_threads(threads)
    load_before = _load()
    t0 = time.perf_counter()
    matrix = mi_matrix(images, levels=256, bins=256, block=512)
    t1 = time.perf_counter()
    result = drmi_reduce(matrix, k=k)
    t2 = time.perf_counter()
    return {
        "tile_seconds": t1 - t0,
        "restart_seconds": t2 - t1,
        "total_seconds": t2 - t0,
        "h": result.h,
        "subset": result.subset.tolist(),
        "load_before": load_before,
        "load_after": _load(),
    }


def distributed(data_path: str, *, k: int, workers: int, workdir: Path) -> dict:
    from flows.reduce import reduce_flow

    store = Path(tempfile.mkdtemp(dir=workdir))
    load_before = _load()
    t0 = time.perf_counter()
    summary = reduce_flow(data=data_path, k=k, store_url=f"file://{store}", workers=workers, tile_size=512)
    total = time.perf_counter() - t0
    subset = np.load(store / summary["result_key"] / "subset.npy").tolist()
    shutil.rmtree(store, ignore_errors=True)
    return {
        "tile_seconds": summary["tile_seconds"],
        "restart_seconds": summary["restart_seconds"],
        "total_seconds": total,
        "flow_seconds": summary["flow_seconds"],
        "h": summary["h"],
        "subset": subset,
        "tiles_computed": summary["tiles_computed"],
        "restart_mode": summary["restart_mode"],
        "warm_pool": summary["warm_pool"],
        "stages": summary["stages"],
        "load_before": load_before,
        "load_after": _load(),
    }


def median_table(runs: list[dict]) -> dict:
    keys = ["tile_seconds", "restart_seconds", "total_seconds"]
    out: dict = {key: round(float(np.median([r[key] for r in runs])), 3) for key in keys}
    if "stages" in runs[0]:
        out["stages_median"] = {
            name: round(float(np.median([r["stages"][name] for r in runs])), 3) for name in runs[0]["stages"]
        }
    out["runs"] = [
        {
            **{key: round(r[key], 3) for key in keys},
            **({"stages": r["stages"], "warm_pool": r["warm_pool"]} if "stages" in r else {}),
            "load_before": r["load_before"],
            "load_after": r["load_after"],
        }
        for r in runs
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--k", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reduce_scaling.json"))
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.runtime import apply_prefect_defaults, ensure_ray, prefect_api

    apply_prefect_defaults()
    data = load_dataset("mnist5k")
    if args.n < len(data):
        data = data.subset(np.arange(args.n))
    workdir = Path(tempfile.mkdtemp(prefix="reduce-scaling-"))
    data_path = str(workdir / "pool.npz")
    np.savez(data_path, images=data.images, labels=data.labels)

    # Warm numba's on-disk cache so no configuration pays compilation.
    in_process(data.images[:300], k=20, threads=1)

    results: dict[str, list[dict]] = {"inproc_1t": [], "inproc_2t": [], "flow_1w": [], "flow_2w": []}
    runs = {
        "inproc_1t": lambda: in_process(data.images, k=args.k, threads=1),
        "flow_1w": lambda: distributed(data_path, k=args.k, workers=1, workdir=workdir),
        "inproc_2t": lambda: in_process(data.images, k=args.k, threads=2),
        "flow_2w": lambda: distributed(data_path, k=args.k, workers=2, workdir=workdir),
    }
    load_start = _load()
    t_server = time.perf_counter()
    with prefect_api(home=workdir / "prefect") as api_url:
        server_seconds = time.perf_counter() - t_server
        t_ray = time.perf_counter()
        ensure_ray(address="local", num_cpus=2)
        ray_seconds = time.perf_counter() - t_ray
        t_warm = time.perf_counter()
        distributed(data_path, k=20, workers=2, workdir=workdir)  # warm-up: the worker pool, the Prefect client
        warmup_seconds = time.perf_counter() - t_warm
        for repeat in range(args.repeats):
            # Each flow next to its in-process peer; who goes first alternates between repeats.
            pairs = [["inproc_1t", "flow_1w"], ["inproc_2t", "flow_2w"]]
            order = [name for pair in pairs for name in (pair if repeat % 2 == 0 else pair[::-1])]
            for name in order:
                outcome = runs[name]()
                outcome["repeat"] = repeat
                results[name].append(outcome)
                print(
                    f"[{repeat}] {name}: tiles {outcome['tile_seconds']:.2f}s restarts {outcome['restart_seconds']:.2f}s "
                    f"total {outcome['total_seconds']:.2f}s load {outcome['load_before']}",
                    file=sys.stderr,
                )
    shutil.rmtree(workdir, ignore_errors=True)

    reference = results["inproc_1t"][0]
    identical = all(
        r["h"] == reference["h"] and r["subset"] == reference["subset"] for rs in results.values() for r in rs
    )
    table = {name: median_table(runs) for name, runs in results.items()}
    f1, f2, i1, i2 = table["flow_1w"], table["flow_2w"], table["inproc_1t"], table["inproc_2t"]

    def paired(flow: str, local: str, key: str = "total_seconds") -> dict:
        ratios = [f[key] / p[key] for f, p in zip(results[flow], results[local], strict=True)]
        return {"median": round(float(np.median(ratios)), 3), "each": [round(r, 3) for r in ratios]}

    def eff(one: float, two: float) -> float:
        return round(one / (2 * two), 3)

    ratio_2 = paired("flow_2w", "inproc_2t")
    ratio_1 = paired("flow_1w", "inproc_1t")
    headline = [
        {
            "metric": "reduce flow on 2 Ray workers / in-process 2 threads, wall time (n=5000, k=600, all starts)",
            "value": ratio_2["median"],
            "target": 1.10,
            "better": "lower",
            "unit": "ratio (median of per-repeat pairs)",
            "peer": f"in-process 2 threads, median {i2['total_seconds']:.2f} s (flow {f2['total_seconds']:.2f} s)",
        },
        {
            "metric": "reduce flow on 1 Ray worker / in-process 1 thread, wall time",
            "value": ratio_1["median"],
            "target": 1.10,
            "better": "lower",
            "unit": "ratio (median of per-repeat pairs)",
            "peer": f"in-process 1 thread, median {i1['total_seconds']:.2f} s (flow {f1['total_seconds']:.2f} s)",
        },
        {
            "metric": "every run (flow and in-process, 1 and 2) gives the identical subset and H",
            "value": int(identical),
            "target": 1,
            "better": "higher",
            "unit": "bool",
            "peer": "in-process 1 thread",
        },
    ]
    report = {
        "headline": headline,
        "config": {
            "n": len(data),
            "k": args.k,
            "starts": "all",
            "bins": 256,
            "tile_size": 512,
            "repeats": args.repeats,
            "data": "mnist5k (real MNIST)",
            "numba_threads_per_worker": 1,
            "interleaving": "per repeat: inproc_1t/flow_1w then inproc_2t/flow_2w, the pair order alternating",
        },
        "results": table,
        "derived": {
            "ratio_flow2w_inproc2t": ratio_2,
            "ratio_flow1w_inproc1t": ratio_1,
            "ratio_tile_stage_2w_2t": paired("flow_2w", "inproc_2t", "tile_seconds"),
            "ratio_restart_stage_2w_2t": paired("flow_2w", "inproc_2t", "restart_seconds"),
            "tile_efficiency_2w": eff(f1["tile_seconds"], f2["tile_seconds"]),
            "restart_efficiency_2w": eff(f1["restart_seconds"], f2["restart_seconds"]),
            "inproc_tile_efficiency_2t": eff(i1["tile_seconds"], i2["tile_seconds"]),
            "inproc_restart_efficiency_2t": eff(i1["restart_seconds"], i2["restart_seconds"]),
        },
        "one_off_seconds": {
            "prefect_server_start": round(server_seconds, 2),
            "ray_init": round(ray_seconds, 2),
            "first_flow_run_with_worker_start": round(warmup_seconds, 2),
        },
        "results_identical": identical,
        "h": reference["h"],
        "prefect_api": api_url,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "load_average_start": load_start,
        "load_average_end": _load(),
        "contended": max(x for rs in results.values() for r in rs for x in r["load_before"] + r["load_after"])
        > (os.cpu_count() or 1),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"headline": headline, "derived": report["derived"], "identical": identical}, indent=2))


if __name__ == "__main__":
    main()
