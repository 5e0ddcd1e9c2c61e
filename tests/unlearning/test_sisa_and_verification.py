"""SISA baseline and the verification figures (SPEC section 5: baselines, metrics, backdoor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from obliviate.unlearning.chain import BlockData, Chain
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.plan import make_block_plan
from obliviate.unlearning.records import DeletionError
from obliviate.unlearning.sisa import SisaConfig, train_sisa, unlearn_sisa
from obliviate.unlearning.trainer import predict
from obliviate.unlearning.verification import (
    attack_success_rate,
    choose_backdoor_ids,
    consistency,
    poison,
    stamp_trigger,
    verify,
)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sisa_setup(adam_config: BlockTrainingConfig, digits_data: BlockData):
    config = SisaConfig(base=adam_config, num_shards=3, num_slices=3, epochs_per_slice=3)
    return config, train_sisa(config, data=digits_data)


def test_sisa_unlearning_retrains_only_affected_shards_and_equals_sisa_from_scratch(sisa_setup, digits_data) -> None:
    config, ensemble = sisa_setup
    ids = [int(ensemble.slices[1][1][0]), int(ensemble.slices[1][2][3])]  # shard 1, slices 2 and 3
    new, record = unlearn_sisa(ensemble, ids=ids, data=digits_data)
    assert record.blocks_retrained == (1,) and "shard 1 slices 2..3" in record.stop_reason
    assert new.states[0] is ensemble.states[0] and new.states[2] is ensemble.states[2]
    assert new.states[1][1] is ensemble.states[1][1]  # the state after slice 1 is reused
    scratch = train_sisa(config, data=digits_data, excluded_ids=ids)
    for k in range(config.num_shards):
        assert _equal(new.states[k][-1][0], scratch.states[k][-1][0])
    accuracy = consistency(a=new.predict(digits_data.x_heldout), b=digits_data.y_heldout)
    assert accuracy > 0.4  # three shards of 200 digits each still vote far above chance (0.1)
    with pytest.raises(DeletionError, match="already deleted"):
        unlearn_sisa(new, ids=ids, data=digits_data)
    with pytest.raises(DeletionError, match="empty set"):
        unlearn_sisa(new, ids=[], data=digits_data)


def test_sisa_vote_is_the_majority_of_shard_predictions(sisa_setup, digits_data) -> None:
    _, ensemble = sisa_setup
    x = digits_data.x_heldout
    per_shard = torch.stack([predict(m, x=x) for m in ensemble.models()])
    voted = ensemble.predict(x)
    for i in range(len(x)):
        counts = torch.bincount(per_shard[:, i], minlength=10)
        assert counts[voted[i]] == counts.max()


def test_trigger_is_a_white_corner_patch() -> None:
    images = np.zeros((2, 8, 8), dtype=np.uint8)
    stamped = stamp_trigger(images, levels=17, size=3)
    assert (stamped[:, -3:, -3:] == 16).all() and stamped[:, :5, :].sum() == 0 and stamped[:, :, :5].sum() == 0
    assert images.sum() == 0  # a copy, not in place


def test_backdoor_ids_are_spread_over_blocks_and_outside_the_target(digits_data: BlockData) -> None:
    labels = digits_data.train.labels
    plan = make_block_plan(labels, num_blocks=12, seed=3)
    ids = choose_backdoor_ids(
        labels, plan=plan, count=30, target_class=0, first_block=1, last_block=12, rng=np.random.default_rng(1)
    )
    assert ids.size == np.unique(ids).size == 30
    assert (labels[ids] != 0).all()
    per_block = np.bincount(plan.block_of(ids), minlength=13)[1:]
    assert per_block.min() >= 2 and per_block.max() <= 3
    poisoned, backdoor = poison(digits_data.train, plan=plan, ids=ids, target_class=0)
    assert (poisoned.labels[ids] == 0).all() and (poisoned.images[ids][:, -3:, -3:] == 16).all()
    untouched = np.setdiff1d(np.arange(len(labels)), ids)
    assert np.array_equal(poisoned.images[untouched], digits_data.train.images[untouched])
    assert backdoor.placement()["blocks_touched"] == 12


def test_attack_success_rate_counts_triggered_non_target_inputs(digits_data: BlockData) -> None:
    test = digits_data.heldout

    def always_target(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), dtype=torch.long)

    def reads_trigger(x: torch.Tensor) -> torch.Tensor:  # predicts 0 exactly when the corner is white
        return torch.where(x[:, 0, -3:, -3:].amin(dim=(1, 2)) >= 1.0, 0, 1)

    assert attack_success_rate(always_target, test=test, target_class=0) == 1.0
    assert attack_success_rate(reads_trigger, test=test, target_class=0) == 1.0
    assert attack_success_rate(lambda x: torch.ones(len(x), dtype=torch.long), test=test, target_class=0) == 0.0


def test_verify_reports_figures_next_to_their_noise_floor(adam_chain: Chain, digits_data: BlockData) -> None:
    original = adam_chain.model()
    earlier = adam_chain.model(6)
    x, y = digits_data.x_heldout, digits_data.y_heldout
    figures = verify(
        unlearned=lambda v: predict(original, x=v),
        naive=lambda v: predict(original, x=v),
        original=lambda v: predict(earlier, x=v),
        x_test=x,
        y_test=y,
        unlearned_state=adam_chain.final.model_state,
        naive_state=adam_chain.final.model_state,
        original_state=adam_chain.checkpoints[6].model_state,
    )
    assert figures.consistency_with_naive == 1.0 and figures.l1_to_naive == 0.0
    assert figures.original_consistency_with_naive < 1.0 and figures.original_l1_to_naive > 0.0
    assert figures.accuracy == pytest.approx(adam_chain.final.heldout_accuracy)
