"""SPEC section 3: every query is counted, refused past the budget, and logged; the log reaches each cell's record."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from actors import extraction
from obliviate.extraction.target import BudgetExceeded, OutputMode


class Zeros:
    """A backend that answers class 0 for every image."""

    image_size = 4

    def predict(self, images: np.ndarray, *, output: OutputMode) -> np.ndarray:
        return np.zeros(len(images), np.int64)


class Cell:
    def to_dict(self) -> dict:
        return {"budget": 5}


@pytest.fixture
def worker(monkeypatch):
    monkeypatch.setattr(extraction, "open_backend", lambda target, **_: (Zeros(), {"num_classes": 3}))
    images = np.arange(7 * 16, dtype=np.uint8).reshape(7, 4, 4)
    return extraction.AuditWorker(
        target="t.pt", pool=None, test_images=images, test_labels=np.zeros(7), oracle_test_labels=np.zeros(7)
    ), images


def _cell(worker):
    return worker.run_cell(selector="random", budget=5, seed=0, train=None, eps=(0.3,), iterative=False)


def test_each_cell_record_holds_its_query_log_with_a_refused_batch(worker, monkeypatch):
    audit_worker, images = worker

    def run_cell(*, attacker, **_):
        attacker.query(images[:3])
        with pytest.raises(BudgetExceeded):  # 3 + 4 > 5: refused, nothing answered, but logged
            attacker.query(images[3:7])
        attacker.query(images[3:5])
        return Cell()

    monkeypatch.setattr(extraction, "run_cell", run_cell)
    record = _cell(audit_worker)
    digest = [hashlib.sha256(b.tobytes()).hexdigest()[:16] for b in (images[:3], images[3:7], images[3:5])]
    assert record["queries"] == [
        {"digest": digest[0], "size": 3, "refused": False},
        {"digest": digest[1], "size": 4, "refused": True},
        {"digest": digest[2], "size": 2, "refused": False},
    ]
    assert (record["query_calls"], record["queries_used"], record["target_output"]) == (3, 5, "labels")


def test_a_cell_ended_by_a_refusal_names_its_queries(worker, monkeypatch):
    audit_worker, images = worker

    def run_cell(*, attacker, **_):
        attacker.query(images[:3])
        attacker.query(images[3:6])  # past the budget of 5
        return Cell()

    monkeypatch.setattr(extraction, "run_cell", run_cell)
    with pytest.raises(BudgetExceeded) as refused:
        _cell(audit_worker)
    said = str(refused.value)
    assert "query budget is 5 images and 3 are used" in said
    assert "Cell basic/random k=5 seed=0" in said
    assert f"['{hashlib.sha256(images[3:6].tobytes()).hexdigest()[:16]}', 3, True]" in said
