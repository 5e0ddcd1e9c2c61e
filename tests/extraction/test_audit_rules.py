"""Rules of the extraction audit's CLI and report that need no Prefect server: the split a target
declares, the grid's options, the headline, the pool's labels, the report's files."""

from __future__ import annotations

import json

import numpy as np

from obliviate.data import load_dataset
from obliviate.extraction.audit import draw_split


def test_target_train_on_mnist5k_keeps_the_benchs_split_and_only_it_is_called_so(tmp_path, capsys):
    """`target train --data mnist5k` trained on 1,666 images (a third of 5,000) while steal.md said
    "(the bench's split)", whose target trains on 2,000: the default now draws the bench's split."""
    from flows.audit import _pool_and_test
    from flows.cli import main
    from obliviate.extraction.target import load_checkpoint

    checkpoint = tmp_path / "t.pt"
    assert main(["target", "train", "--data", "mnist5k", "--out", str(checkpoint), "--steps", "1", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["train_size"] == 2000
    meta = load_checkpoint(str(checkpoint))[1]
    data = load_dataset("mnist5k")
    bench = draw_split(data.labels, train_size=2000, pool_size=2000, test_size=1000, seed=3)  # bench/extraction.py
    assert meta["train_indices"] == sorted(bench[0].tolist())
    pool, test, said = _pool_and_test(
        data, meta, exclude=meta["train_indices"], pool_size=2000, test_size=1000, split_seed=None
    )
    assert np.array_equal(pool, bench[1]) and np.array_equal(test, bench[2])
    assert said == "draw_split(seed=3, train_size=2000) (the bench's split 3)"
    # The same draw with a smaller pool and test set is the target's split, not the bench's.
    _, _, said = _pool_and_test(
        data, meta, exclude=meta["train_indices"], pool_size=200, test_size=100, split_seed=None
    )
    assert said == "draw_split(seed=3, train_size=2000)"
