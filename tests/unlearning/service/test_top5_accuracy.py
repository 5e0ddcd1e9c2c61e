"""Top-5 accuracy (SPEC section 5, Metrics: "top-1 / top-5 accuracy") was computed nowhere.

Now :func:`obliviate.unlearning.verification.verify` gives it from logits, serve --verify records it
next to the top-1 figures, and forget's words for a settled request say it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.chains import ChainWorker
from flows.cli.forget import _run_outcome
from flows.train import run_spec
from obliviate.errors import ConfigError
from obliviate.unlearning.verification import _top_k_accuracy, verify
from storage import ObjectStore


def _logits(true_rank: list[int], *, classes: int = 7) -> torch.Tensor:
    """One row per input: class 0 (the label) placed at rank ``r`` (0 = highest score) among ``classes`` classes."""
    rows = []
    for rank in true_rank:
        order = [c for c in range(1, classes)]
        order.insert(rank, 0)  # order[i] is the class with the i-th highest score
        row = torch.empty(classes)
        row[torch.tensor(order)] = torch.arange(classes, 0, -1, dtype=torch.float32)
        rows.append(row)
    return torch.stack(rows)


def test_top5_accuracy_of_hand_made_logits() -> None:
    y = torch.zeros(4, dtype=torch.long)
    unlearned = _logits([0, 4, 5, 6])  # top-1: 1 of 4; top-5: 2 of 4 (rank 4 is the fifth)
    naive = _logits([0, 1, 2, 3])  # top-1: 1 of 4; top-5: 4 of 4
    original = _logits([6, 6, 6, 6])  # never in the top 5
    figures = verify(
        unlearned=lambda x: unlearned, naive=lambda x: naive, original=lambda x: original, x_test=y, y_test=y
    )
    assert figures.accuracy == 0.25 and figures.naive_accuracy == 0.25 and figures.original_accuracy == 0.0
    assert figures.top5_accuracy == 0.5
    assert figures.naive_top5_accuracy == 1.0
    assert figures.original_top5_accuracy == 0.0
    assert figures.consistency_with_naive == 1.0  # predictions are the argmax: 0, 1, 1, 1 for both
    # predictors that give classes (an ensemble's vote) have no top-5
    classes = verify(unlearned=lambda x: y, naive=lambda x: y, original=lambda x: y, x_test=y, y_test=y)
    assert classes.accuracy == 1.0 and classes.top5_accuracy is None


def test_top_k_accuracy_rules() -> None:
    logits = _logits([1, 2], classes=3)
    y = torch.zeros(2, dtype=torch.long)
    assert _top_k_accuracy(logits, y, k=1) == 0.0
    assert _top_k_accuracy(logits, y, k=2) == 0.5
    assert _top_k_accuracy(logits, y, k=5) == 1.0  # k above the class count: every class counts
    with pytest.raises(ConfigError, match=r"k must be a whole number >= 1; got 0"):
        _top_k_accuracy(logits, y, k=0)
    with pytest.raises(ConfigError, match=r"got logits \(2, 3\) and labels \(3,\)"):
        _top_k_accuracy(logits, torch.zeros(3, dtype=torch.long))


def test_serve_verify_records_top5_and_forget_says_it(tmp_path: Path, tiny_run) -> None:
    url = f"file://{tmp_path / 'store'}"
    ObjectStore(url).ensure_container()
    worker = ChainWorker(url)
    spec = run_spec(run_id="t5", **tiny_run(split_seed=0))
    worker.train(spec)
    audit = worker.unlearn("t5", {"req-1": [int(spec["train_ids"][i]) for i in (150, 390)]}, verify=True)
    check = audit["verification"]
    for key in ("heldout_top5_accuracy", "previous_heldout_top5_accuracy", "naive_heldout_top5_accuracy"):
        assert 0.0 <= check[key] <= 1.0, (key, check)
    assert check["naive_heldout_top5_accuracy"] >= check["naive_heldout_accuracy"]
    assert check["bit_identical_to_naive"] and check["heldout_top5_accuracy"] == check["naive_heldout_top5_accuracy"]
    words = _run_outcome("t5", audit)
    assert (
        f"held-out top-5 accuracy {100 * check['previous_heldout_top5_accuracy']:.1f} % -> "
        f"{100 * check['heldout_top5_accuracy']:.1f} % (naive retrain {100 * check['naive_heldout_top5_accuracy']:.1f} %)"
    ) in words
