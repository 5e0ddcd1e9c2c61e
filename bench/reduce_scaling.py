"""Scaling of the distributed ``reduce`` flow against the in-process pure functions (issue 4).

One command, about 5-8 minutes on 2 cores:

    PYTHONPATH=$PWD .venv/bin/python bench/reduce_scaling.py [--n 5000] [--k 600] [--repeats 2]

On n = 5,000 real MNIST images (mnist5k), k = 600, one restart per image (the SPEC default), it
measures in the same process and run:

* in-process: :func:`obliviate.reduction.mi.mi_matrix` then :func:`obliviate.reduction.drmi.drmi_reduce` with numba
  limited to 1 thread, and again with 2 threads (equal total threads to 1 and 2 workers);
* the ``reduce`` flow on a local Ray runtime with a real Prefect server, 1 and 2 workers of one
  numba thread each, every run on a fresh store (no tile reuse).

Reported per configuration, as the minimum over ``--repeats`` runs: tile stage and restart stage
wall time (flow: actor start, storage writes/reads and fan-out included), and the whole flow.
Parallel efficiency = t(1 worker) / (2 t(2 workers)); orchestration overhead = (flow with 1 worker
- in-process with 1 thread) / in-process with 1 thread, on the whole run and per stage. The load
average is recorded before and after each measurement: the machine is shared, so re-run on a
quiet one for clean figures. Prefect server start and Ray start-up are paid once per process and
are reported apart.
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
        "load_before": load_before,
        "load_after": _load(),
    }


def best(runs: list[dict]) -> dict:
    keys = ["tile_seconds", "restart_seconds", "total_seconds"]
    out = {key: round(min(r[key] for r in runs), 3) for key in keys}
    out["runs"] = [
        {**{key: round(r[key], 3) for key in keys}, "load_before": r["load_before"], "load_after": r["load_after"]}
        for r in runs
    ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--k", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=2)
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
    t_server = time.perf_counter()
    with prefect_api(home=workdir / "prefect") as api_url:
        server_seconds = time.perf_counter() - t_server
        t_ray = time.perf_counter()
        ensure_ray(address="local", num_cpus=2)
        ray_seconds = time.perf_counter() - t_ray
        distributed(data_path, k=20, workers=2, workdir=workdir)  # warm-up: worker imports, Prefect client
        for repeat in range(args.repeats):
            for name, run in [
                ("inproc_1t", lambda: in_process(data.images, k=args.k, threads=1)),
                ("flow_1w", lambda: distributed(data_path, k=args.k, workers=1, workdir=workdir)),
                ("inproc_2t", lambda: in_process(data.images, k=args.k, threads=2)),
                ("flow_2w", lambda: distributed(data_path, k=args.k, workers=2, workdir=workdir)),
            ]:
                outcome = run()
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
    table = {name: best(runs) for name, runs in results.items()}
    f1, f2, i1, i2 = table["flow_1w"], table["flow_2w"], table["inproc_1t"], table["inproc_2t"]

    def eff(one: float, two: float) -> float:
        return round(one / (2 * two), 3)

    def overhead(flow: float, local: float) -> float:
        return round((flow - local) / local, 3)

    headline = [
        {
            "metric": "tile stage parallel efficiency, 2 Ray workers",
            "value": eff(f1["tile_seconds"], f2["tile_seconds"]),
            "target": 0.85,
            "better": "higher",
            "unit": "ratio",
            "peer": None,
        },
        {
            "metric": "restart stage parallel efficiency, 2 Ray workers",
            "value": eff(f1["restart_seconds"], f2["restart_seconds"]),
            "target": 0.85,
            "better": "higher",
            "unit": "ratio",
            "peer": None,
        },
        {
            "metric": "orchestration overhead, whole flow 1 worker vs in-process 1 thread",
            "value": overhead(f1["total_seconds"], i1["total_seconds"]),
            "target": 0.10,
            "better": "lower",
            "unit": "fraction of in-process",
            "peer": f"in-process {i1['total_seconds']:.2f} s",
        },
        {
            "metric": "flow wall time, 2 workers (n=5000, k=600, all starts)",
            "value": f2["total_seconds"],
            "target": None,
            "better": "lower",
            "unit": "s",
            "peer": f"in-process 2 threads {i2['total_seconds']:.2f} s",
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
        },
        "results": table,
        "derived": {
            "tile_efficiency_2w": eff(f1["tile_seconds"], f2["tile_seconds"]),
            "restart_efficiency_2w": eff(f1["restart_seconds"], f2["restart_seconds"]),
            "inproc_tile_efficiency_2t": eff(i1["tile_seconds"], i2["tile_seconds"]),
            "inproc_restart_efficiency_2t": eff(i1["restart_seconds"], i2["restart_seconds"]),
            "overhead_total_1w": overhead(f1["total_seconds"], i1["total_seconds"]),
            "overhead_total_2w_vs_2t": overhead(f2["total_seconds"], i2["total_seconds"]),
            "overhead_tile_stage_1w": overhead(f1["tile_seconds"], i1["tile_seconds"]),
            "overhead_restart_stage_1w": overhead(f1["restart_seconds"], i1["restart_seconds"]),
        },
        "one_off_seconds": {"prefect_server_start": round(server_seconds, 2), "ray_init": round(ray_seconds, 2)},
        "results_identical": identical,
        "h": reference["h"],
        "prefect_api": api_url,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
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
