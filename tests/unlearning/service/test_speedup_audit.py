"""The speed-up `forget` prints compares like with like: this retrain against a full retrain at its own pace.

It divided the chain's training time, measured once when the run was trained, by the retrain time
measured now: two identical retrains of every block printed "2.61x slower" and "1.32x faster", and a
retrain of block 3 alone of 3 printed "13.64x faster" (theoretical 3.0).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.train import run_spec
from flows.verify import chain_of
from storage import ObjectStore


def test_the_speedup_is_this_retrains_own_pace_over_all_blocks_not_a_clock_from_training(tmp_path: Path, tiny_run):
    url = f"file://{tmp_path / 'store'}"
    ObjectStore(url).ensure_container()
    worker = ChainWorker(url)
    spec = run_spec(run_id="s-run", **tiny_run(split_seed=0))  # 400 training samples, 4 blocks of 100
    worker.train(spec)
    plan = chain_of(url, "s-run").plan
    sizes = [len(plan.block_ids(b)) for b in range(1, 5)]
    last = int(plan.block_ids(4)[0])  # a training position of block 4
    late = worker.unlearn("s-run", {"req-late": [int(spec["train_ids"][last])]})  # block 4 alone
    assert late["blocks_retrained"] == [4] and late["theoretical_speedup"] == 4.0
    expected = (sum(sizes) - 1) / (sizes[3] - 1)  # samples of all blocks / those retrained, after the deletion
    assert late["speedup_vs_full_retrain"] == pytest.approx(expected)
    assert late["full_retrain_estimate_seconds"] == pytest.approx(late["retrain_seconds"] * expected)
    assert "estimate" in late["speedup_basis"] and "not timed" in late["speedup_basis"]
    early = int(plan.block_ids(1)[0])
    every = worker.unlearn("s-run", {"req-early": [int(spec["train_ids"][early])]})  # block 1: every block again
    assert every["blocks_retrained"] == [1, 2, 3, 4]
    assert every["speedup_vs_full_retrain"] == pytest.approx(1.0)  # a full retrain is no faster than itself
