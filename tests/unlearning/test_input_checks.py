"""Bad inputs to the unlearning API fail at the entrance with an error that names the rule and the value."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from obliviate.data import stratified_split
from obliviate.errors import ConfigError
from obliviate.unlearning.chain import BlockData, ChainMismatchError
from obliviate.unlearning.config import BlockTrainingConfig, new_model, schedule_rate
from obliviate.unlearning.exact import validate_deletion
from obliviate.unlearning.plan import BlockPlan, make_block_plan
from obliviate.unlearning.policies import unlearn
from obliviate.unlearning.probes import per_sample_loss
from obliviate.unlearning.records import DeletionError
from obliviate.unlearning.sisa import SisaConfig, make_sisa_slices, train_sisa
from obliviate.unlearning.trainer import keep_mask, train_chain
from obliviate.unlearning.verification import choose_backdoor_ids, stamp_trigger


def _tiny_config(**overrides: object) -> BlockTrainingConfig:
    values: dict[str, object] = {"image_size": 8, "levels": 17, "num_blocks": 2, "local_epochs": 1, "batch_size": 64}
    values.update(overrides)
    return BlockTrainingConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("ids", [[-1], [5], [True], [1.5]])
def test_keep_mask_refuses_ids_outside_the_training_set(ids: list[object]) -> None:
    with pytest.raises(ConfigError, match=r"rule: sample ids must be"):
        keep_mask(5, excluded_ids=ids)  # type: ignore[arg-type]
    assert keep_mask(5, excluded_ids=[4, 4]).tolist() == [True, True, True, True, False]


@pytest.mark.parametrize("ids", [[-1], [1000]])
def test_train_chain_refuses_bad_excluded_ids_before_training(ids: list[int], digits_data: BlockData) -> None:
    seen = []
    with pytest.raises(ConfigError, match=rf"must be in 0..599 .*unknown: \[{ids[0]}\]"):
        train_chain(config=_tiny_config(), data=digits_data, excluded_ids=ids, sink=seen.append)
    assert seen == []


def test_train_sisa_refuses_bad_excluded_ids(digits_data: BlockData) -> None:
    config = SisaConfig(base=_tiny_config(), num_shards=2, num_slices=2)
    with pytest.raises(ConfigError, match=r"unknown: \[999\]"):
        train_sisa(config, data=digits_data, excluded_ids=[999])


def test_plan_block_numbers_start_at_one_and_ids_do_not_wrap() -> None:
    plan = make_block_plan(np.arange(20) % 2, num_blocks=4, seed=0)
    with pytest.raises(ConfigError, match=r"blocks are numbered 1..4 \(block 1 first\); got 0"):
        plan.block_ids(0)
    with pytest.raises(ConfigError, match=r"got 5"):
        plan.block_ids(5)
    with pytest.raises(ConfigError, match=r"unknown: \[-1\]"):
        plan.block_of([-1])
    with pytest.raises(ConfigError, match=r"unknown: \[20\]"):
        plan.block_of(np.array([3, 20]))
    assert plan.block_of(plan.block_ids(4)).tolist() == [4] * 5
    assert int(plan.block_of(np.int64(0))) >= 1


def test_validate_deletion_keeps_its_rule_for_bad_ids() -> None:
    adam_chain = SimpleNamespace(plan=SimpleNamespace(num_samples=600), deleted_ids=frozenset())
    with pytest.raises(DeletionError, match=r"must be in 0..599 .*unknown: \[-1\]\. Nothing changed\."):
        validate_deletion(adam_chain, ids=[-1, 2])
    with pytest.raises(DeletionError, match=r"must be integers .*Nothing changed\."):
        validate_deletion(adam_chain, ids=[2.0])


def test_a_plan_must_cover_every_sample_id() -> None:
    blocks = (np.arange(50), np.arange(50, 100), np.arange(100, 150), np.arange(150, 190))
    with pytest.raises(
        ConfigError, match=r"every sample id 0..199 in exactly one block.* 10 ids are in no block, e.g\. \[190"
    ):
        BlockPlan(blocks=blocks, num_samples=200)
    assert BlockPlan(blocks=blocks, num_samples=190).block_of([189]).tolist() == [4]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"num_classes": 5}, r"labels must be class indices 0..4 .*span 0..9\. Set num_classes=10"),
        ({"image_size": 28}, r"image_size=28, levels=17 for 8x8 images with 17 levels\. Set image_size=8"),
        ({"levels": 256}, r"Set image_size=8, levels=17"),
        ({"in_channels": 3}, r"in_channels must be 1; got 3"),
    ],
)
def test_training_refuses_data_that_does_not_fit_the_config(
    overrides: dict[str, object], fragment: str, digits_data: BlockData
) -> None:
    seen = []
    with pytest.raises(ChainMismatchError, match=fragment):
        train_chain(config=_tiny_config(**overrides), data=digits_data, sink=seen.append)
    assert seen == []
    with pytest.raises(ChainMismatchError, match=fragment):
        train_sisa(SisaConfig(base=_tiny_config(**overrides), num_shards=2, num_slices=2), data=digits_data)


def test_per_sample_loss_refuses_labels_outside_the_model() -> None:
    model = new_model(_tiny_config(num_classes=10))
    x = torch.zeros(3, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"class indices 0..9 .*got labels 12..12"):
        per_sample_loss(model, x=x, y=torch.full((3,), 12))
    assert per_sample_loss(model, x=x, y=torch.tensor([0, 9, 3])).shape == (3,)


@pytest.mark.parametrize("size", [0, -2, 9, 2.5])
def test_stamp_trigger_refuses_a_size_that_does_not_fit(size: object) -> None:
    images = np.zeros((2, 8, 8), np.uint8)
    with pytest.raises(ConfigError, match=rf"trigger size must be a whole number in 1..8 .*got {size!r}"):
        stamp_trigger(images, levels=17, size=size)  # type: ignore[arg-type]
    assert int((stamp_trigger(images, levels=17, size=8) == 16).sum()) == 128


def test_choose_backdoor_ids_refuses_a_target_class_the_labels_lack() -> None:
    labels = np.arange(40) % 4
    plan = make_block_plan(labels, num_blocks=4, seed=0)
    with pytest.raises(ConfigError, match=r"target_class must be one of the data's classes 0..3; got 99"):
        choose_backdoor_ids(
            labels, plan=plan, count=4, target_class=99, first_block=1, last_block=4, rng=np.random.default_rng(0)
        )


@pytest.mark.parametrize("rng", [0, None])
def test_randomness_must_be_a_numpy_generator(rng: object) -> None:
    labels = np.arange(40) % 4
    expected = rf"rng must be a numpy.random.Generator \(np.random.default_rng\(seed\)\); got {type(rng).__name__}"
    with pytest.raises(ConfigError, match=expected):
        stratified_split(labels, sizes=(10, 10), rng=rng)  # type: ignore[arg-type]
    plan = make_block_plan(labels, num_blocks=4, seed=0)
    with pytest.raises(ConfigError, match=expected):
        choose_backdoor_ids(labels, plan=plan, count=4, target_class=0, first_block=1, last_block=4, rng=rng)  # type: ignore[arg-type]


def test_plan_and_slice_seeds_must_be_non_negative_integers() -> None:
    labels = np.arange(40) % 4
    with pytest.raises(ConfigError, match=r"seed must be an integer >= 0 .*got -1"):
        make_block_plan(labels, num_blocks=4, seed=-1)
    with pytest.raises(ConfigError, match=r"seed must be an integer >= 0 .*got -1"):
        make_sisa_slices(labels, num_shards=2, num_slices=2, seed=-1)


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"policy must be one of \['exact', 'deepobliviate'\]; got 'fast'"):
        unlearn(None, ids=[1], data=None, policy="fast")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"schedule must be one of \['constant', 'step', 'cosine', 'exponential'\]"):
        SisaConfig(base=_tiny_config(), schedule="linear")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"schedule must be one of .*got 'linear'"):
        schedule_rate(schedule="linear", base=1.0, position=0, total=2, gamma=0.5, step_every=1, min_fraction=0.0)


def test_counts_accept_numpy_integers_and_refuse_bools() -> None:
    config = _tiny_config(seed=np.int64(3), num_blocks=np.int64(2))
    assert config.seed == 3 and type(config.seed) is int and type(config.num_blocks) is int
    assert config.fingerprint == _tiny_config(seed=3).fingerprint
    sisa = SisaConfig(base=config, num_shards=np.int64(2))
    assert sisa.num_shards == 2 and type(sisa.num_shards) is int
    with pytest.raises(ConfigError, match=r"num_shards must be a positive integer; got True"):
        SisaConfig(base=config, num_shards=True)


def test_zero_counts_fail_with_the_rule_not_a_zero_division() -> None:
    with pytest.raises(ConfigError, match=r"num_shards must be a positive integer; got 0"):
        make_sisa_slices(np.arange(40) % 4, num_shards=0, num_slices=2, seed=0)
    with pytest.raises(ConfigError, match=r"step_every must be a whole number of steps >= 1 .*got 0"):
        schedule_rate(schedule="step", base=1.0, position=3, total=5, gamma=0.5, step_every=0, min_fraction=0.0)


def test_power_law_fit_refuses_non_finite_deltas() -> None:
    from obliviate.unlearning.deepobliviate import fit_power_law

    for bad in ([1.0, float("nan"), 0.5, 0.3], [1.0, 0.5, float("inf"), 0.2]):
        with pytest.raises(ConfigError, match="needs finite Δ values"):
            fit_power_law(bad)  # it returned a = b = nan with r2 = 1.0
    with pytest.raises(ConfigError, match="a flat sequence"):
        fit_power_law([[1.0, 0.5, 0.2]])
    assert fit_power_law([1.0, 0.5, 0.3, 0.25]).r2 > 0.9  # a finite decay still fits


def test_consistency_refuses_vectors_of_different_shapes_or_none() -> None:
    import torch

    from obliviate.unlearning.verification import consistency

    for a, b in (
        (torch.zeros(3), torch.zeros(4)),
        (torch.zeros(0), torch.zeros(0)),
        (torch.zeros(3, 1), torch.zeros(3)),
    ):
        with pytest.raises(ConfigError, match="non-empty prediction vectors of one length"):
            consistency(a=a, b=b)
    assert consistency(a=torch.tensor([1, 2, 3]), b=torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)
