"""`train --shards S` plans S ordinary runs on disjoint stratified shards (issue 11)."""

from __future__ import annotations

import numpy as np

from flows.train import run_spec, shard_run_ids
from obliviate.data import load_dataset


def test_shards_are_disjoint_stratified_cover_the_split_and_share_the_heldout_set(tiny_run) -> None:
    whole = run_spec(run_id="g", **tiny_run(split_seed=0))
    parts = [run_spec(run_id="g", shards=2, shard=k, **tiny_run(split_seed=0)) for k in range(2)]
    assert [p["run_id"] for p in parts] == shard_run_ids("g", 2) == ["g-s0of2", "g-s1of2"]
    assert not set(parts[0]["train_ids"]) & set(parts[1]["train_ids"])
    assert sorted(parts[0]["train_ids"] + parts[1]["train_ids"]) == sorted(whole["train_ids"])
    assert parts[0]["heldout_ids"] == parts[1]["heldout_ids"] == whole["heldout_ids"]
    labels = load_dataset("digits").labels
    counts = [np.bincount(labels[p["train_ids"]], minlength=10) for p in parts]
    assert np.abs(counts[0] - counts[1]).max() <= 1
