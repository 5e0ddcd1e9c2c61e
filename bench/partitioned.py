"""Benchmark: partitioned vs exact DRMI reduction at n = 5,000, k = 600 (SPEC section 2 switch).

Exact: the full MI matrix and every start vertex. Partitioned: m seeded random parts, each
reduced to its share of 2k, then the union reduced to k, every start vertex at each stage.
Both measured in the same run; H of the partitioned subset is evaluated on the full matrix.
Run: .venv/bin/python bench/partitioned.py   ->  bench/results/partitioned.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import headline, machine, write_result

from obliviate.data import load_dataset
from obliviate.reduction.drmi import drmi_reduce, subset_cost
from obliviate.reduction.mi import mi_matrix
from obliviate.reduction.partitioned import partitioned_reduce

K = 600


def main() -> None:
    started = machine()
    data = load_dataset("mnist5k")
    mi_matrix(data.images[:20])  # compile outside the clock
    t0 = time.perf_counter()
    matrix = mi_matrix(data.images)
    exact = drmi_reduce(matrix, k=K)
    exact_seconds = time.perf_counter() - t0
    print(f"exact: H = {exact.h:.3f} in {exact_seconds:.1f} s")
    runs = []
    for parts in (2, 4, 8):
        for seed in (0, 1, 2):
            result = partitioned_reduce(data.images, k=K, parts=parts, rng=np.random.default_rng(seed), oversample=2.0)
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
    m4 = [r for r in runs if r["parts"] == 4]
    headlines = [
        headline(
            "worst H ratio partitioned/exact (m in 2,4,8; 3 seeds)",
            worst,
            target=1.05,
            better="lower",
            unit="ratio",
            peer="exact reduction, same run",
        ),
        headline(
            "wall-time ratio partitioned/exact, m=4 (mean)",
            float(np.mean([r["time_ratio"] for r in m4])),
            target=None,
            better="lower",
            unit="ratio",
            peer="exact reduction, same run",
        ),
        headline(
            "MI pairs computed partitioned/exact, m=4",
            float(np.mean([r["pair_ratio"] for r in m4])),
            target=None,
            better="lower",
            unit="ratio",
            peer="exact reduction, same run",
        ),
    ]
    path = write_result(
        "partitioned",
        headlines=headlines,
        data={
            "n": len(data),
            "k": K,
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
