"""Benchmark: DRMI restarts (greedy + one-hot replacement) at n = 5,000.

Milliseconds per restart at k = 50 and 600 on one thread, and all 5,000 restarts on 2 threads,
next to a plain-numpy implementation of the same algorithm measured in the same run.
Run: .venv/bin/python bench/restarts.py   ->  bench/results/restarts.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import headline, machine, write_result

from obliviate.data import load_dataset
from obliviate.reduction.drmi import drmi_reduce, run_restarts
from obliviate.reduction.mi import mi_matrix


def numpy_restart(matrix: np.ndarray, start: int, k: int) -> float:
    """The same greedy + replacement written with numpy vector operations (the peer)."""
    n = matrix.shape[0]
    in_set = np.zeros(n, dtype=bool)
    score = matrix[start].astype(np.float64)
    in_set[start] = True
    members = [start]
    for _ in range(1, k):
        pick = int(np.argmin(np.where(in_set, np.inf, score)))
        members.append(pick)
        in_set[pick] = True
        score += matrix[pick]
    diag = np.diagonal(matrix).astype(np.float64)
    h = float((score[members] - diag[members]).sum() / 2)
    while True:
        inner = np.where(in_set, score - diag, -np.inf)
        p = int(np.argmax(inner))
        gain = np.where(in_set, np.inf, score - matrix[p])
        q = int(np.argmin(gain))
        if gain[q] >= inner[p]:
            return h
        h += gain[q] - inner[p]
        score += matrix[q].astype(np.float64) - matrix[p]
        in_set[p], in_set[q] = False, True


def main() -> None:
    started = machine()
    data = load_dataset("mnist5k")
    matrix = mi_matrix(data.images)
    run_restarts(matrix[:50, :50], k=5, starts=[0])  # compile outside the clock
    sample = np.random.default_rng(0).choice(len(data), size=200, replace=False)
    per_restart = {}
    numba.set_num_threads(1)
    for k in (50, 600):
        t0 = time.perf_counter()
        records = run_restarts(matrix, k=k, starts=sample)
        ours = (time.perf_counter() - t0) / len(sample) * 1000
        t0 = time.perf_counter()
        peer_h = [numpy_restart(matrix, int(s), k) for s in sample[:10]]
        peer = (time.perf_counter() - t0) / 10 * 1000
        assert np.allclose(peer_h, [r.h for r in records[:10]], rtol=1e-9), "peer and ours disagree"
        per_restart[k] = {
            "ms_per_restart_1_thread": ours,
            "numpy_peer_ms_per_restart": peer,
            "speedup": peer / ours,
            "mean_swaps": float(np.mean([r.swaps for r in records])),
        }
        print(f"k={k}: {ours:.3f} ms/restart (numpy peer {peer:.2f} ms)")
    numba.set_num_threads(2)
    t0 = time.perf_counter()
    result = drmi_reduce(matrix, k=600)
    all_seconds = time.perf_counter() - t0
    print(f"all 5,000 restarts at k=600 on 2 threads: {all_seconds:.2f} s, H = {result.h:.3f}")
    headlines = [
        headline(
            "ms per restart, n=5000, k=600, 1 thread",
            per_restart[600]["ms_per_restart_1_thread"],
            target=3.0,
            better="lower",
            unit="ms",
            peer="plain numpy restart",
        ),
        headline(
            "ms per restart, n=5000, k=50, 1 thread",
            per_restart[50]["ms_per_restart_1_thread"],
            target=None,
            better="lower",
            unit="ms",
            peer="plain numpy restart",
        ),
        headline(
            "all 5,000 restarts, k=600, 2 threads",
            all_seconds,
            target=10.0,
            better="lower",
            unit="s",
            peer="plain numpy restart x 5000 / 2 (projected)",
        ),
    ]
    data_out = {
        "n": len(data),
        "per_restart": {str(k): v for k, v in per_restart.items()},
        "all_restarts_2_threads_seconds": all_seconds,
        "numpy_peer_all_restarts_projected_seconds": per_restart[600]["numpy_peer_ms_per_restart"] * 5000 / 2 / 1000,
        "best_h_k600": result.h,
        "best_start": result.best_start,
        "class_histogram_k600": np.bincount(data.labels[result.subset], minlength=10).tolist(),
    }
    path = write_result("restarts", headlines=headlines, data=data_out, started=started)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
