"""S = 2 shards on 2 workers vs S = 1: wall time to exact, measured as a real parallel run (issue 11).

Part of ``bench/deletion_stream.py`` (it calls :func:`measure`), runnable alone too:
``nice -n 5 ./.venv/bin/python bench/deletion_parallel.py``. It takes ``/work/bench.lock`` itself
(``fcntl.flock``) for the timed part only.

Setup: a fresh ``file://`` store, a local Ray runtime with 2 CPUs, two ChainWorker actors (the
service's own worker class, ``actors/chains.py``), each with 1 torch thread; S = 1 runs on the first. The S = 1 run and the
two shard runs of S = 2 (disjoint class-stratified shards, as ``train --shards 2`` makes them) are
trained first (not timed); a shard has B/2 blocks, so its blocks hold as many samples as those of
S = 1 (``train --shards 2 --blocks B/2``). Then, interleaved (S = 1 first on even repetitions, S = 2 first on odd),
the same batch of deletion requests (20 requests of 1-10 uniform ids, a one-day window at 20/day)
is unlearned exactly: by the S = 1 run on one actor, and by the two shard runs at once on two
actors (each shard gets the ids it holds). The wall time from the call to the last published
version is the time to exact (storage I/O included). No rollback is served here, so each retrain
evaluates held-out accuracy at its last block only (``ChainWorker._retrain_exact``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from obliviate.data import load_dataset
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.service import RunSpec, plan_run
from obliviate.unlearning.shards import make_shard_plan

LOCK = Path("/work/bench.lock")


@contextlib.contextmanager
def bench_lock(path: Path = LOCK) -> Iterator[float]:
    """Hold the machine-wide bench lock (if the file exists); yields the seconds spent waiting."""
    if not path.exists():
        yield 0.0
        return
    began = time.perf_counter()
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - began
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _specs(config: BlockTrainingConfig) -> tuple[RunSpec, list[RunSpec]]:
    dataset = load_dataset("mnist5k")
    base = plan_run(
        run_id="par-s1",
        dataset=dataset,
        source="mnist5k",
        train_size=4000,
        heldout_size=500,
        split_seed=0,
        config=config,
    )
    train = np.asarray(base.train_ids, dtype=np.int64)
    plan = make_shard_plan(dataset.labels[train], num_shards=2, seed=base.split_seed)
    # B/2 blocks per shard: a shard block holds as many samples as a block of S = 1 (as in deletion_stream)
    shard_config = replace(config, num_blocks=config.num_blocks // 2)
    shards = [
        replace(
            base,
            run_id=f"par-s2-s{k}of2",
            train_ids=tuple(int(i) for i in train[plan.shards[k]]),
            config=shard_config,
        )
        for k in range(2)
    ]
    return base, shards


def _batch(train_ids: tuple[int, ...], rng: np.random.Generator, requests: int = 20) -> list[int]:
    ids: set[int] = set()
    for _ in range(requests):
        ids.update(int(i) for i in rng.choice(np.asarray(train_ids), size=int(rng.integers(1, 11)), replace=False))
    return sorted(ids)


def measure(config: BlockTrainingConfig, *, repetitions: int = 5, seed: int = 0) -> dict[str, Any]:
    """Interleaved wall time to exact of S = 1 (1 actor) and S = 2 (2 actors in parallel)."""
    import ray

    from actors.chains import ChainWorker

    base, shards = _specs(config)
    rng = np.random.default_rng((seed, 0xD15))
    batches = []
    done: set[int] = set()
    for _ in range(repetitions):
        ids = _batch(tuple(i for i in base.train_ids if i not in done), rng)
        done.update(ids)
        batches.append(ids)
    out: dict[str, Any] = {"repetitions": [], "config": config.to_dict(), "load_average_before": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="obliviate-par-") as tmp:
        url = f"file://{tmp}/store"
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            actor = ray.remote(ChainWorker).options(num_cpus=1)
            # two actors for two CPUs (a third num_cpus=1 actor would never be scheduled); S = 1 uses the first
            wa, wb = (actor.remote(url, threads=1) for _ in range(2))
            w1 = wa
            began = time.perf_counter()
            ray.get(w1.train.remote(base.to_dict()))
            out["train_wall_s_S1"] = time.perf_counter() - began
            began = time.perf_counter()
            ray.get([w.train.remote(s.to_dict()) for w, s in zip((wa, wb), shards, strict=True)])
            out["train_wall_s_S2_two_workers"] = time.perf_counter() - began
            with bench_lock() as waited:
                out["lock_wait_s"] = waited
                out["load_average_timed_start"] = list(os.getloadavg())
                for r, ids in enumerate(batches):
                    rep: dict[str, Any] = {"ids": len(ids)}
                    for which in ("S1", "S2") if r % 2 == 0 else ("S2", "S1"):
                        began = time.perf_counter()
                        if which == "S1":
                            audits = [ray.get(w1.unlearn.remote(base.run_id, {f"batch{r}": ids}))]
                        else:
                            calls = []
                            for w, s in zip((wa, wb), shards, strict=True):
                                held = sorted(set(ids) & set(s.train_ids))
                                if held:
                                    calls.append(w.unlearn.remote(s.run_id, {f"batch{r}": held}))
                            audits = ray.get(calls)
                        rep[f"wall_s_{which}"] = time.perf_counter() - began
                        rep[f"first_affected_{which}"] = [a.get("first_affected_block") for a in audits]
                        rep[f"retrain_s_{which}"] = [a.get("retrain_seconds") for a in audits]
                        rep[f"status_{which}"] = [a.get("status") for a in audits]
                    rep["ratio"] = rep["wall_s_S2"] / rep["wall_s_S1"]
                    out["repetitions"].append(rep)
                    print(
                        f"parallel rep {r}: S1 {rep['wall_s_S1']:.1f} s, S2 {rep['wall_s_S2']:.1f} s", file=sys.stderr
                    )
                out["load_average_timed_end"] = list(os.getloadavg())
        finally:
            ray.shutdown()
    out["ratio_median"] = statistics.median(r["ratio"] for r in out["repetitions"])
    return out


if __name__ == "__main__":
    import json

    from bench.deletion_stream import CONFIG

    print(json.dumps(measure(CONFIG), indent=2))
