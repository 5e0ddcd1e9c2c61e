"""Public extraction functions refuse bad input at their entrance, in the house's words (rule, value, fix).

Tiny random 8x8 images and 2-step training: each check fires before any real work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from obliviate.errors import ConfigError, DataError
from obliviate.extraction.attackers import AttackOptions, train_substitute
from obliviate.extraction.substitute import TrainConfig, accuracy, agreement, train_classifier
from obliviate.extraction.target import LocalTorchBackend, OutputMode, Target, TargetRequestError
from obliviate.models import build_model

TINY = AttackOptions(basic_steps=2, batch_size=8)


@pytest.fixture(scope="module")
def bought():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (30, 8, 8), dtype=np.uint8), np.arange(30) % 10


# -------------------- labels, images and seeds at the training entrance


@pytest.mark.parametrize("shift", [10, -1])
def test_train_substitute_refuses_labels_outside_the_classes(bought, shift):
    images, labels = bought
    with pytest.raises(DataError, match=r"labels must be class numbers 0\.\.9 \(num_classes=10\); got .*num_classes"):
        train_substitute("basic", images=images, labels=labels + shift, unlabeled=images[:0], options=TINY, seed=0)


def test_train_classifier_refuses_labels_outside_the_classes(bought):
    images, labels = bought
    with pytest.raises(DataError, match=r"0\.\.9 .*got 10, 11, 12"):
        train_classifier(images=images % 17, labels=labels + 10, config=TrainConfig(steps=2), seed=0, levels=17)


def test_fractional_labels_are_refused_not_truncated(bought):
    images, labels = bought
    with pytest.raises(DataError, match="whole class numbers .*truncated"):
        train_substitute("basic", images=images, labels=labels + 0.7, unlabeled=images[:0], options=TINY, seed=0)
    with pytest.raises(DataError, match="whole class numbers"):
        train_classifier(images=images, labels=labels + 0.5, config=TrainConfig(steps=2), seed=0)
    # whole numbers stored as floats still train, exactly as the int labels do
    a = train_classifier(images=images, labels=labels.astype(np.float64), config=TrainConfig(steps=2), seed=0)
    b = train_classifier(images=images, labels=labels, config=TrainConfig(steps=2), seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_train_substitute_refuses_flat_images_and_unlabeled_images_of_another_size(bought):
    images, labels = bought
    with pytest.raises(DataError, match=r"shape \(n, H, W\); got ndarray dtype uint8 shape \(30, 64\)"):
        train_substitute("basic", images=images.reshape(30, 64), labels=labels, unlabeled=images[:0], seed=0)
    with pytest.raises(DataError, match=r"must be a uint8 numpy array"):
        train_substitute("basic", images=images.astype(np.float32), labels=labels, unlabeled=images[:0], seed=0)
    with pytest.raises(DataError, match=r"unlabeled images must have the bought images' size 8x8; got 28x28"):
        train_substitute(
            "semi_supervised", images=images, labels=labels, unlabeled=np.zeros((10, 28, 28), np.uint8), seed=0
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, "image_size must be a whole number >= 1; got 0"),
        ({"num_classes": -1}, "num_classes must be a whole number >= 1; got -1"),
        ({"in_channels": 0}, "in_channels must be a whole number >= 1; got 0"),
        ({"image_size": 28.0}, "image_size must be a whole number >= 1; got 28.0"),
    ],
)
def test_build_model_refuses_sizes_below_one(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_model("c3f2", seed=0, **kwargs)


def test_unknown_architectures_are_refused_where_they_are_named():
    valid = "choose one of lenet5, c3f2, resnet18"
    with pytest.raises(ConfigError, match=f"unknown model 'vgg': {valid}"):
        AttackOptions(arch="vgg")
    with pytest.raises(ConfigError, match=f"unknown model 'vgg': {valid}"):
        TrainConfig(arch="vgg")
    with pytest.raises(ConfigError, match=f"unknown model 'vgg': {valid}"):
        build_model("vgg", seed=0)


@pytest.mark.parametrize(
    ("seed", "seen"), [(None, "NoneType"), (np.random.default_rng(0), "Generator"), (1.0, "float")]
)
def test_seeds_that_are_not_ints_are_refused(bought, seed, seen):
    images, labels = bought
    with pytest.raises(ConfigError, match=f"seed must be an int; got {seen}"):
        build_model("lenet5", seed=seed)
    with pytest.raises(ConfigError, match=f"seed must be an int; got {seen}"):
        train_substitute("basic", images=images, labels=labels, unlabeled=images[:0], options=TINY, seed=seed)
    with pytest.raises(ConfigError, match="seed must be a whole number >= 0; got -1"):
        train_substitute("basic", images=images, labels=labels, unlabeled=images[:0], options=TINY, seed=-1)


# -------------------- the target's entrance and answers


def test_a_query_batch_of_another_size_than_the_model_is_refused_before_it_counts():
    target = Target(LocalTorchBackend(build_model("lenet5", image_size=8, seed=0)), budget=10)
    with pytest.raises(ConfigError, match=r"takes 8x8 images; got a batch of 28x28"):
        target.query(np.zeros((2, 28, 28), np.uint8))
    assert target.used == 0 and not target.log
    assert target.query(np.zeros((2, 8, 8), np.uint8)).shape == (2,)


@pytest.mark.parametrize("budget", [2.5, True, "10"])
def test_target_refuses_a_budget_that_is_not_a_whole_number(budget):
    model = build_model("lenet5", image_size=8, seed=0)
    with pytest.raises(ConfigError, match="budget must be a non-negative whole number of queries"):
        Target(LocalTorchBackend(model), budget=budget)


class _NanBackend:
    def predict(self, images: np.ndarray, *, output: OutputMode) -> np.ndarray:
        answer = np.full((len(images), 10), 0.1, np.float32)
        answer[0, 3] = np.nan
        return answer


def test_target_refuses_nan_probabilities():
    target = Target(_NanBackend(), budget=None, output=OutputMode.PROBABILITIES)
    with pytest.raises(TargetRequestError, match=r"not finite numbers: got \[nan\]"):
        target.query(np.zeros((2, 8, 8), np.uint8))
    assert target.used == 0


# -------------------- metrics


@pytest.mark.parametrize(
    "share",
    [
        lambda a, b: accuracy(predicted=a, truth=b),
        lambda a, b: agreement(substitute_labels=a, target_labels=b),
    ],
    ids=["accuracy", "agreement"],
)
def test_metrics_refuse_mismatched_shapes_and_empty_inputs(share):
    assert share(np.array([0, 1, 2]), np.array([0, 1, 2])) == 1.0
    with pytest.raises(DataError, match=r"1-D arrays of the same length.*got shapes \(3, 1\) and \(3,\)"):
        share(np.array([[0], [1], [2]]), np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"got shapes \(3,\) and \(4,\)"):
        share(np.array([0, 1, 2]), np.array([0, 1, 2, 3]))
    with pytest.raises(DataError, match="empty: a share needs at least one input"):
        share(np.array([], np.int64), np.array([], np.int64))


# -------------------- attack options


def test_attack_options_refuse_negative_steps_per_image_and_tta():
    with pytest.raises(ConfigError, match="steps_per_image >= 0 and tta >= 0.*got -5"):
        AttackOptions(steps_per_image=-5)
    with pytest.raises(ConfigError, match="steps_per_image >= 0 and tta >= 0.*got 2.0, -1"):
        AttackOptions(tta=-1)
    assert AttackOptions(steps_per_image=0).supervised_steps(100) == 400


# -------------------- selectors


def _pool_and_target(images: np.ndarray, **pool_options):
    from obliviate.extraction.selectors import Pool

    return Pool(images, drmi_starts=4, **pool_options), Target(
        LocalTorchBackend(build_model("lenet5", image_size=8, seed=0)), budget=None
    )


def test_kcenter_on_a_pool_of_identical_images_returns_distinct_indices(bought):
    from obliviate.extraction.selectors import acquire

    pool, target = _pool_and_target(np.repeat(bought[0][:1], 12, axis=0))  # one image 12 times: features all 0
    got = acquire("kcenter", pool=pool, k=5, rng=np.random.default_rng(0), target=target)
    assert len(np.unique(got.pool_indices)) == 5 and got.queries == 5


def test_a_pool_refuses_zero_feature_dims_when_it_is_built(bought):
    from obliviate.extraction.selectors import Pool

    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="feature_dims must be a whole number >= 1"):
            Pool(bought[0], feature_dims=bad)


@pytest.mark.parametrize("name", ["drmi", "drmi_nmi", "drmi_coarse"])
def test_drmi_selectors_buy_the_whole_pool_at_k_equal_to_the_pool_size(bought, name):
    from obliviate.extraction.selectors import acquire

    pool, target = _pool_and_target(bought[0][:6])
    got = acquire(name, pool=pool, k=6, rng=np.random.default_rng(0), target=target)
    np.testing.assert_array_equal(np.sort(got.pool_indices), np.arange(6))


@pytest.mark.parametrize(("rng", "seen"), [(0, "int"), (None, "NoneType")])
def test_acquire_refuses_an_rng_that_is_not_a_generator(bought, rng, seen):
    from obliviate.extraction.selectors import Pool, acquire

    target = Target(LocalTorchBackend(build_model("lenet5", image_size=8, seed=0)), budget=None)
    message = rf"rng must be a numpy.random.Generator \(np.random.default_rng\(seed\)\); got {seen}"
    with pytest.raises(ConfigError, match=message):
        acquire("random", pool=Pool(bought[0]), k=5, rng=rng, target=target)


def test_acquire_refuses_a_budget_that_is_not_a_whole_number(bought):
    from obliviate.extraction.selectors import Pool, acquire

    target = Target(LocalTorchBackend(build_model("lenet5", image_size=8, seed=0)), budget=None)
    with pytest.raises(ConfigError, match="budget k must be a whole number >= 1; got float 5.0. Pass an int"):
        acquire("random", pool=Pool(bought[0]), k=5.0, rng=np.random.default_rng(0), target=target)


# -------------------- the headline's ranking


def test_ranking_no_cells_says_what_to_pass():
    from obliviate.extraction.headline import fewest_queries, strongest

    with pytest.raises(ConfigError, match=r"no cells to rank: .*got none\. Pass the cells of an audit"):
        fewest_queries([], level=0.9)
    with pytest.raises(ConfigError, match=r"no cells to rank: .*got none\. Pass the cells of an audit"):
        strongest([])
    cells = [{"selector": "random", "budget": 10, "agreement": 0.5}]
    with pytest.raises(ConfigError, match="no cells of selector 'drmi' to rank: the cells hold selectors random"):
        strongest(cells, selector="drmi")


# -------------------- round sizes and gray levels


@pytest.mark.parametrize(
    ("k", "rounds", "message"), [(10, 0, "rounds must be"), (0, 3, "k must be"), (2.0, 3, "k must be")]
)
def test_round_sizes_refuse_empty_rounds(k, rounds, message):
    from obliviate.extraction.active import round_sizes

    assert round_sizes(k=10, rounds=3) == [4, 3, 3]
    with pytest.raises(ConfigError, match=f"{message} a whole number >= 1; got {k if 'k' in message else rounds}"):
        round_sizes(k=k, rounds=rounds)


@pytest.mark.parametrize("levels", [1, 0])
def test_images_to_tensor_refuses_fewer_than_two_levels(levels):
    from obliviate.models import images_to_tensor

    with pytest.raises(ConfigError, match=f"levels must be >= 2 .*got {levels}"):
        images_to_tensor(np.zeros((1, 8, 8), np.uint8), levels=levels)
