"""Benchmark: partitioned vs exact DRMI reduction, by default at n = 5,000, k = 600 (SPEC section 2 switch).

Exact: the full MI matrix and every start vertex. Partitioned: m seeded random parts, each
reduced to its share of 2k, then the union reduced to k, every start vertex at each stage.
Both measured in the same run, in this process (no Ray); H of the partitioned subset is evaluated
on the full matrix, so the pool's whole matrix must fit in memory.
Run: .venv/bin/python bench/partitioned.py   ->  bench/results/partitioned.json
     .venv/bin/python bench/partitioned.py --data digits --parts 2 4 --seeds 1 --out /tmp/p.json
Options: --data (built-in name or .npz, default mnist5k), --parts (m values, default 2 4 8),
--seeds (per m, default 3), --k (default 600), --out (default bench/results/partitioned.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, headline, machine

from obliviate.data import load_dataset
from obliviate.reduction.drmi import drmi_reduce, subset_cost
from obliviate.reduction.mi import mi_matrix
from obliviate.reduction.partitioned import partitioned_reduce

K = 600
PARTS = (2, 4, 8)
SEEDS = 3


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's options; unknown arguments are refused (argparse exits 2 and names them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", default="mnist5k", help="pool: a built-in name or an .npz file (default: %(default)s)"
    )
    parser.add_argument(
        "--parts",
        type=_positive_int,
        nargs="+",
        default=list(PARTS),
        metavar="M",
        help="numbers of parts m to try (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds", type=_positive_int, default=SEEDS, help="seeded partitions per m (default: %(default)s)"
    )
    parser.add_argument("--k", type=_positive_int, default=K, help="subset size (default: %(default)s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "partitioned.json",
        help="result file (default: bench/results/partitioned.json)",
    )
    return parser.parse_args(argv)


def _write(path: Path, *, headlines: list[dict], data: dict, started: dict) -> Path:
    """The result file, in bench/_common.write_result's format, at ``path``."""
    started = dict(started)
    started["load_average_at_end"] = list(os.getloadavg())
    payload = {"headline": headlines, "machine": started, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, **data}, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parts_tried = sorted(set(args.parts))
    k = args.k
    started = machine()
    data = load_dataset(args.data)
    mi_matrix(data.images[:20])  # compile outside the clock
    t0 = time.perf_counter()
    matrix = mi_matrix(data.images)
    exact = drmi_reduce(matrix, k=k)
    exact_seconds = time.perf_counter() - t0
    print(f"exact: H = {exact.h:.3f} in {exact_seconds:.1f} s")
    runs = []
    for parts in parts_tried:
        for seed in range(args.seeds):
            result = partitioned_reduce(data.images, k=k, parts=parts, rng=np.random.default_rng(seed), oversample=2.0)
            h_full = subset_cost(matrix, subset=result.subset)
            runs.append(
                {
                    "parts": parts,
                    "seed": seed,
                    "h": h_full,
                    "h_ratio": h_full / exact.h,
                    "seconds": result.seconds,
                    "time_ratio": result.seconds / exact_seconds,
                    "pairs_computed": result.pairs_computed,
                    "pair_ratio": result.pairs_computed / (len(data) * (len(data) - 1) / 2),
                    "shared_with_exact": int(np.intersect1d(result.subset, exact.subset).size),
                }
            )
            print(
                f"m={parts} seed={seed}: H ratio {h_full / exact.h:.5f}, time ratio {result.seconds / exact_seconds:.2f}"
            )
    worst = max(r["h_ratio"] for r in runs)
    middle = 4 if 4 in parts_tried else parts_tried[len(parts_tried) // 2]
    m4 = [r for r in runs if r["parts"] == middle]
    seeds = f"{args.seeds} seed{'' if args.seeds == 1 else 's'}"
    headlines = [
        headline(
            f"worst H ratio partitioned/exact (m in {','.join(map(str, parts_tried))}; {seeds})",
            worst,
            target=1.05,
            better="lower",
            unit="ratio",
            peer="exact reduction, same run",
        ),
        headline(
            f"wall-time ratio partitioned/exact, m={middle} (mean)",
            float(np.mean([r["time_ratio"] for r in m4])),
            target=None,
            better="lower",
            unit="ratio",
            peer="exact reduction, same run",
        ),
        headline(
            f"MI pairs computed partitioned/exact, m={middle}",
            float(np.mean([r["pair_ratio"] for r in m4])),
            target=None,
            better="lower",
            unit="ratio",
            peer="exact reduction, same run",
        ),
    ]
    path = _write(
        args.out,
        headlines=headlines,
        data={
            "n": len(data),
            "data": args.data,
            "k": k,
            "oversample": 2.0,
            "exact_h": exact.h,
            "exact_seconds": exact_seconds,
            "runs": runs,
        },
        started=started,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
