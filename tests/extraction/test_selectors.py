"""Selectors return k distinct pool indices; jacobian augmentation doubles the set; budgets hold."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from obliviate.errors import ConfigError
from obliviate.extraction.selectors import (
    SELECTORS,
    Pool,
    acquire,
    augmentation_round,
    check_indices,
    image_entropy,
    selector,
)
from obliviate.extraction.substitute import TrainConfig
from obliviate.extraction.target import LocalTorchBackend, Target

LABEL_FREE = sorted(name for name, spec in SELECTORS.items() if not spec.needs_target)
TINY = TrainConfig(steps=15)


@pytest.fixture(scope="module")
def pool(pool_images):
    return Pool(pool_images, drmi_starts=8)


@pytest.mark.parametrize("name", LABEL_FREE)
@pytest.mark.parametrize("k", [1, 7, 40])
def test_label_free_selectors_return_k_distinct_pool_indices(name, k, pool):
    idx = SELECTORS[name].fn(pool, k=k, rng=np.random.default_rng(0))
    idx = np.asarray(idx)
    assert idx.shape == (k,)
    assert len(np.unique(idx)) == k
    assert idx.min() >= 0 and idx.max() < pool.n


@pytest.mark.parametrize("name", ["random", "drmi", "kcenter", "cluster_centers"])
def test_seeded_selectors_repeat_under_the_same_seed(name, pool):
    a = SELECTORS[name].fn(pool, k=12, rng=np.random.default_rng(5))
    b = SELECTORS[name].fn(pool, k=12, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


def test_acquire_spends_exactly_the_budget_on_the_chosen_images(pool, target_model):
    target = Target(LocalTorchBackend(target_model), budget=25)
    got = acquire("random", pool=pool, k=25, rng=np.random.default_rng(1), target=target)
    assert target.used == got.queries == 25 and len(target.log) == 1
    np.testing.assert_array_equal(got.images, pool.images[got.pool_indices])
    np.testing.assert_array_equal(got.labels, Target(LocalTorchBackend(target_model), budget=None).query(got.images))
    with pytest.raises(ConfigError, match="budget k must be in"):
        acquire("random", pool=pool, k=pool.n + 1, rng=np.random.default_rng(1), target=target)


def test_jacobian_round_doubles_the_set_and_its_queries(pool, target_model):
    target = Target(LocalTorchBackend(target_model), budget=40)
    seed_images = pool.images[:10]
    labels = target.query(seed_images)
    images, labels = augmentation_round(train=TINY, images=seed_images, labels=labels, target=target, seed=0)
    assert len(images) == len(labels) == 20 and target.used == 20
    images2, _labels2 = augmentation_round(train=TINY, images=images, labels=labels, target=target, seed=0)
    assert len(images2) == 40 and target.used == 40
    np.testing.assert_array_equal(images2[:20], images)
    # Each new image is its parent moved by lambda = 0.1 per pixel (25.5 gray levels, rounded), clipped.
    step = np.abs(images2[20:].astype(int) - images.astype(int))
    assert step.max() <= 26 and (step > 0).mean() > 0.5


def test_jacobian_selector_spends_exactly_k_queries(pool, target_model):
    target = Target(LocalTorchBackend(target_model), budget=50)
    got = acquire("jacobian", pool=pool, k=50, rng=np.random.default_rng(2), target=target, train=TINY)
    assert target.used == got.queries == 50 == len(got.images)
    # 50 = ceil(50 / 4) = 13 seed images, doubled to 26, then 24 of the 26 augmentations.
    assert (got.pool_indices >= 0).sum() == 13
    assert [r.size for r in target.log] == [13, 13, 24]


def test_two_round_jacobian_uses_a_quarter_of_the_budget_as_seed_set(pool, target_model):
    target = Target(LocalTorchBackend(target_model), budget=100)
    got = acquire("jacobian_r2", pool=pool, k=100, rng=np.random.default_rng(2), target=target, train=TINY)
    assert target.used == 100 and [r.size for r in target.log] == [25, 25, 50]
    assert (got.pool_indices >= 0).sum() == 25


def test_adding_a_selector_is_one_function(pool, target_model):
    @selector("first_k_test_only")
    def first_k(pool, *, k, rng):
        """The first k images."""
        return np.arange(k)

    try:
        target = Target(LocalTorchBackend(target_model), budget=5)
        got = acquire("first_k_test_only", pool=pool, k=5, rng=np.random.default_rng(0), target=target)
        np.testing.assert_array_equal(got.pool_indices, np.arange(5))
        assert SELECTORS["first_k_test_only"].summary == "The first k images."
    finally:
        del SELECTORS["first_k_test_only"]


def test_a_selector_breaking_its_contract_is_caught():
    with pytest.raises(ConfigError, match="distinct"):
        check_indices(np.array([1, 1, 2]), k=3, n=10, name="bad")
    with pytest.raises(ConfigError, match="0..9"):
        check_indices(np.array([1, 2, 10]), k=3, n=10, name="bad")


def test_image_entropy_is_the_entropy_mi_uses(pool_images):
    h = image_entropy(pool_images[:5])
    for img, value in zip(pool_images[:5], h):
        assert value == pytest.approx(mutual_info_score(img.ravel(), img.ravel()), rel=1e-9)


def test_faithful_drmi_prefers_low_entropy_images(pool):
    """The SPEC's failure mode, visible on real MNIST: raw-MI DRMI buys below-average entropy."""
    idx = SELECTORS["drmi"].fn(pool, k=30, rng=np.random.default_rng(0))
    h = image_entropy(pool.images)
    assert h[idx].mean() < h.mean()
