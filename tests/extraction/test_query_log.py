"""SPEC section 3: every query is counted, refused past the budget, and logged; the log reaches each cell's record.

The worker runs a real cell against a real (tiny, untrained) checkpoint target. No built-in selector asks past its
budget, so the cells use a selector registered the way a user adds one (``obliviate.extraction.selectors.selector``)
that does: it buys 3 images, asks for 4 more (refused), then buys 2.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from actors.extraction import AuditWorker
from obliviate.extraction.selectors import SELECTORS, Acquisition, selector
from obliviate.extraction.substitute import TrainConfig
from obliviate.extraction.target import BudgetExceeded, save_checkpoint
from obliviate.models import build_model

SIDE = 8
CLASSES = 3


@pytest.fixture
def pool_images():
    return np.random.default_rng(5).integers(0, 256, size=(7, SIDE, SIDE), dtype=np.uint8)


@pytest.fixture(params=["labels", "probabilities"])
def worker(request, tmp_path, pool_images):
    """An audit worker whose attacker asks for labels or for class probabilities (SPEC section 3's switch)."""
    from obliviate.extraction.selectors import Pool

    path = tmp_path / "target.pt"
    model = build_model("lenet5", num_classes=CLASSES, image_size=SIDE, seed=0)
    save_checkpoint(path, model=model, arch="lenet5", meta={"num_classes": CLASSES, "image_size": SIDE})
    test_images = np.random.default_rng(6).integers(0, 256, size=(4, SIDE, SIDE), dtype=np.uint8)
    return AuditWorker(
        target=str(path),
        pool=Pool(pool_images),
        test_images=test_images,
        test_labels=np.zeros(4, np.int64),
        oracle_test_labels=np.zeros(4, np.int64),
        output=request.param,
    )


@pytest.fixture
def overspending_selector():
    """Registers ``test-overspend`` for one test: 3 images, then 4 (past a budget of 5), then whatever ``after`` says."""
    plan = {"after": (3, 5)}  # pool slice bought once the 4 were refused; None: let the refusal end the cell

    @selector("test-overspend", needs_target=True)
    def overspend(pool, *, k, rng, target, train):
        """Asks past its budget."""
        first = target.query(pool.images[:3])
        if plan["after"] is None:
            target.query(pool.images[3:6])  # 3 + 3 > 5: the refusal ends the cell
        with pytest.raises(BudgetExceeded):  # 3 + 4 > 5: refused, nothing answered, but logged
            target.query(pool.images[3:7])
        lo, hi = plan["after"]
        second = target.query(pool.images[lo:hi])
        bought = np.r_[np.arange(3), np.arange(lo, hi)]
        return Acquisition(pool.images[bought], np.r_[first, second], bought, target.used)

    yield plan
    SELECTORS.pop("test-overspend")


def _cell(worker):
    return worker.run_cell(
        selector="test-overspend",
        budget=5,
        seed=0,
        train=TrainConfig(steps=1, batch_size=4),
        eps=(0.3,),
        iterative=False,
    )


def _digest(images: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes()).hexdigest()[:16]


def test_each_cell_record_holds_its_query_log_with_a_refused_batch(worker, overspending_selector, pool_images):
    record = _cell(worker)
    output = worker.output.value  # each batch says what it bought: an auditor reads one entry without the cell's
    assert record["queries"] == [
        {"digest": _digest(pool_images[:3]), "size": 3, "refused": False, "output": output},
        {"digest": _digest(pool_images[3:7]), "size": 4, "refused": True, "output": output},
        {"digest": _digest(pool_images[3:5]), "size": 2, "refused": False, "output": output},
    ]
    assert (record["query_calls"], record["queries_used"], record["target_output"]) == (3, 5, output)
    assert record["selector"] == "test-overspend" and sum(record["class_histogram"]) == 5  # the cell ran to its end


def test_a_cell_ended_by_a_refusal_names_its_queries(worker, overspending_selector, pool_images):
    overspending_selector["after"] = None
    with pytest.raises(BudgetExceeded) as refused:
        _cell(worker)
    said = str(refused.value)
    assert "query budget is 5 images and 3 are used" in said
    assert "Cell basic/test-overspend k=5 seed=0" in said
    output = worker.output.value
    assert "its queries (digest, size, refused, output)" in said
    assert (
        f"['{_digest(pool_images[:3])}', 3, False, '{output}'], ['{_digest(pool_images[3:6])}', 3, True, '{output}']]"
        in said
    )
