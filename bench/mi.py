"""Benchmark: MI pairs per second of our tile function vs sklearn's per-pair mutual_info_score.

Same MNIST 5k images, same run; 256 and 32 levels; 1 and 2 numba threads.
Run: .venv/bin/python bench/mi.py   ->  bench/results/mi.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numba
import numpy as np
from sklearn.metrics import mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import headline, machine, write_result

from obliviate.data import load_dataset
from obliviate.reduction.mi import mi_tile, prepare_images, quantize

PAIRS_60K = 60_000 * 59_999 / 2


def sklearn_rate(codes: np.ndarray, pairs: np.ndarray) -> float:
    t0 = time.perf_counter()
    for i, j in pairs:
        mutual_info_score(codes[i], codes[j])
    return len(pairs) / (time.perf_counter() - t0)


def tile_rate(prepared, *, rows: int, cols: int, repeats: int = 3) -> float:
    row_idx, col_idx = np.arange(rows), np.arange(rows, rows + cols)
    mi_tile(prepared, rows=row_idx[:4], cols=col_idx[:4])  # compile outside the clock
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        mi_tile(prepared, rows=row_idx, cols=col_idx)
        best = min(best, time.perf_counter() - t0)
    return rows * cols / best


def main() -> None:
    started = machine()
    images = load_dataset("mnist5k").flat
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(images), size=(300, 2))
    runs = []
    for bins in (256, 32):
        prepared = prepare_images(images, bins=bins)
        peer = sklearn_rate(quantize(images, bins=bins), pairs)
        for threads in (1, 2):
            numba.set_num_threads(threads)
            ours = tile_rate(prepared, rows=1000, cols=4000)
            runs.append(
                {
                    "bins": bins,
                    "threads": threads,
                    "pairs_per_second": ours,
                    "sklearn_pairs_per_second": peer,
                    "speedup_vs_sklearn": ours / peer,
                    "projected_minutes_n60000": PAIRS_60K / ours / 60,
                }
            )
            print(f"bins={bins:3d} threads={threads}: {ours:,.0f} pairs/s  sklearn {peer:,.0f}  x{ours / peer:,.0f}")
    two = {r["bins"]: r for r in runs if r["threads"] == 2}
    headlines = [
        headline(
            "pairs/s exact 256 levels, 2 threads",
            two[256]["pairs_per_second"],
            target=1.5e6,
            better="higher",
            unit="pairs/s",
            peer="sklearn mutual_info_score per pair",
        ),
        headline(
            "speed-up over sklearn, 256 levels, 2 threads",
            two[256]["speedup_vs_sklearn"],
            target=3000,
            better="higher",
            unit="x",
            peer="sklearn mutual_info_score per pair",
        ),
        headline(
            "pairs/s 32 levels, 2 threads",
            two[32]["pairs_per_second"],
            target=2.5e6,
            better="higher",
            unit="pairs/s",
            peer="sklearn mutual_info_score per pair",
        ),
        headline(
            "projected n=60,000 exact matrix here",
            two[256]["projected_minutes_n60000"],
            target=20,
            better="lower",
            unit="minutes",
            peer="none (projection from measured rate)",
        ),
    ]
    path = write_result(
        "mi",
        headlines=headlines,
        data={"runs": runs, "tile": [1000, 4000], "sklearn_pairs": len(pairs)},
        started=started,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
