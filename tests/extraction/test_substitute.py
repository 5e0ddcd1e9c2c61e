"""Substitute training and the audit's metrics."""

from __future__ import annotations

import pytest
import torch

from obliviate.extraction.audit import markdown_report, run_cell, seed_reference, summarize
from obliviate.extraction.selectors import Pool
from obliviate.extraction.substitute import (
    TrainConfig,
    accuracy,
    fgsm,
    predict_labels,
    train_classifier,
    transferability,
)
from obliviate.extraction.target import LocalTorchBackend, Target
from obliviate.models import images_to_tensor


def test_training_is_seeded_and_leaves_global_rng_alone(mnist, split):
    idx = split[1][:40]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_classifier(images=mnist.images[idx], labels=mnist.labels[idx], config=TrainConfig(steps=5), seed=9)
    after = torch.rand(1)
    b = train_classifier(images=mnist.images[idx], labels=mnist.labels[idx], config=TrainConfig(steps=5), seed=9)
    assert torch.equal(before, after)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_training_learns_from_queried_labels(mnist, split, target_model):
    # target_model (conftest) is train_classifier on 300 real images for 60 steps.
    test_idx = split[2]
    assert (
        accuracy(predicted=predict_labels(target_model, images=mnist.images[test_idx]), truth=mnist.labels[test_idx])
        > 0.5
    )


@pytest.mark.parametrize("iterative", [False, True])
def test_fgsm_stays_in_the_eps_ball_and_the_unit_box(target_model, pool_images, iterative):
    x = images_to_tensor(pool_images[:16])
    y = torch.as_tensor(predict_labels(target_model, images=pool_images[:16]))
    adv = fgsm(target_model, x=x, y=y, eps=0.2, iterative=iterative)
    assert adv.shape == x.shape
    assert float((adv - x).abs().max()) <= 0.2 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((adv - x).abs().mean()) > 0.01
    # White-box FGSM on the model itself lowers its accuracy on its own labels.
    assert (target_model(adv).argmax(1) == y).float().mean() < 1.0


def test_transferability_counts_only_inputs_the_target_gets_right(target_model, mnist, split):
    test_idx = split[2]
    images, labels = mnist.images[test_idx], mnist.labels[test_idx]
    oracle = Target(LocalTorchBackend(target_model), budget=None)
    # Crafted on the target itself at eps=0 nothing changes: no transfer.
    assert transferability(target_model, target_predict=oracle.query, images=images, labels=labels, eps=0.0) == 0.0
    rate = transferability(target_model, target_predict=oracle.query, images=images, labels=labels, eps=0.3)
    assert 0.5 < rate <= 1.0


def test_a_cell_spends_its_budget_and_reports_what_it_bought(target_model, mnist, split):
    pool = Pool(mnist.images[split[1]], drmi_starts=4)
    test_images, test_labels = mnist.images[split[2]], mnist.labels[split[2]]
    cells = []
    for sel in ("random", "drmi"):
        attacker = Target(LocalTorchBackend(target_model), budget=30)
        oracle = Target(LocalTorchBackend(target_model), budget=None)
        cell = run_cell(
            selector=sel,
            budget=30,
            seed=0,
            pool=pool,
            attacker=attacker,
            oracle=oracle,
            test_images=test_images,
            test_labels=test_labels,
            train=TrainConfig(steps=20),
            eps=(0.1, 0.3),
        )
        assert attacker.used == cell.queries == 30
        assert sum(cell.class_histogram) == 30 and len(cell.class_histogram) == 10
        assert set(cell.transfer) == {"0.1", "0.3"}
        assert 0.0 <= cell.agreement <= 1.0 and cell.mean_entropy > 0
        cells.append(cell)
    rows = summarize(cells)
    assert [r.selector for r in rows] == ["random", "drmi"]
    report = markdown_report(rows, pool_histogram=[12] * 10, pool_entropy=1.1)
    assert "| pool | 120 |" in report and "seed DRMI acc %" in report
    assert seed_reference(600) == (96.49, 71.98) and seed_reference(30) == (None, None)
