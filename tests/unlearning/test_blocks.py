"""Block-sequenced training (SPEC section 4): plan, schedules, reproducibility, checkpoints, resume."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from obliviate.errors import ConfigError
from obliviate.unlearning.chain import (
    BlockData,
    Chain,
    ChainMismatchError,
    Checkpoint,
    InMemoryChainStore,
    state_difference_l1,
)
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.plan import make_block_plan
from obliviate.unlearning.trainer import train_chain


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_plan_is_stratified_disjoint_complete_and_seeded(digits_data: BlockData) -> None:
    labels = digits_data.train.labels
    plan = make_block_plan(labels, num_blocks=12, seed=3)
    every = np.concatenate(plan.blocks)
    assert sorted(every.tolist()) == list(range(len(labels)))
    assert {len(b) for b in plan.blocks} == {50}
    for ids in plan.blocks:  # 10 classes over 50 samples: each class 3..7 times (stratified, not random)
        counts = np.bincount(labels[ids], minlength=10)
        assert counts.min() >= 3 and counts.max() <= 7
    again = make_block_plan(labels, num_blocks=12, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(plan.blocks, again.blocks, strict=True))
    other = make_block_plan(labels, num_blocks=12, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(plan.blocks, other.blocks, strict=True))
    assert plan.block_of(plan.block_ids(7)).tolist() == [7] * 50


def test_schedules_give_documented_rates() -> None:
    base = {"num_blocks": 10, "learning_rate": 0.1}
    assert [BlockTrainingConfig(**base).learning_rate_at(i) for i in (1, 10)] == [0.1, 0.1]
    step = BlockTrainingConfig(**base, schedule="step", step_every_blocks=4, gamma=0.5)
    assert [step.learning_rate_at(i) for i in (1, 4, 5, 9)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    exponential = BlockTrainingConfig(**base, schedule="exponential", gamma=0.9)
    assert exponential.learning_rate_at(3) == pytest.approx(0.1 * 0.81)
    cosine = BlockTrainingConfig(**base, schedule="cosine", min_lr_fraction=0.1)
    assert cosine.learning_rate_at(1) == pytest.approx(0.1)
    assert cosine.learning_rate_at(10) == pytest.approx(0.01)
    assert cosine.learning_rate_at(5) == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 4 / 9)))


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("num_blocks", 0, "num_blocks must be a positive integer"),
        ("optimizer", "rmsprop", "optimizer must be one of"),
        ("schedule", "linear", "schedule must be one of ['constant'"),  # it named the optimizer too
        ("seed", -1, "seed must be an integer >= 0"),
        ("gamma", 1.5, "gamma must be in (0, 1]"),
        ("learning_rate", 0.0, "learning_rate must be > 0"),
    ],
)
def test_config_rejects_bad_options(field: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        BlockTrainingConfig(**{field: value})


def test_config_fingerprint_changes_with_every_field_and_round_trips() -> None:
    config = BlockTrainingConfig()
    assert BlockTrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert replace(config, seed=1).fingerprint != config.fingerprint
    assert replace(config, schedule="cosine").fingerprint != config.fingerprint


@pytest.mark.parametrize("chain_name", ["adam_chain", "sgd_chain"])
def test_retraining_with_nothing_deleted_reproduces_the_chain_and_delta_is_zero(
    chain_name: str, digits_data: BlockData, request: pytest.FixtureRequest
) -> None:
    chain: Chain = request.getfixturevalue(chain_name)
    again = train_chain(config=chain.config, data=digits_data)
    for i in range(1, chain.config.num_blocks + 1):
        assert _equal(again.checkpoints[i].model_state, chain.checkpoints[i].model_state)
        delta = state_difference_l1(
            a_after=chain.checkpoints[i].model_state,
            a_before=chain.checkpoints[i - 1].model_state,
            b_after=again.checkpoints[i].model_state,
            b_before=again.checkpoints[i - 1].model_state,
        )
        assert delta == 0.0
        assert again.checkpoints[i].heldout_accuracy == chain.checkpoints[i].heldout_accuracy
    assert chain.final.heldout_accuracy > 0.5  # the tiny set-up really learns


def test_evaluating_fewer_blocks_changes_no_weights_and_m_b_is_always_evaluated(
    adam_chain: Chain, digits_data: BlockData
) -> None:
    quiet = train_chain(config=adam_chain.config, data=digits_data, evaluate=lambda block: block == 2)
    num_blocks = adam_chain.config.num_blocks
    assert [i for i, c in enumerate(quiet.checkpoints) if i and c.heldout_accuracy is not None] == [2, num_blocks]
    assert quiet.final.heldout_accuracy == adam_chain.final.heldout_accuracy
    for ours, full in zip(quiet.checkpoints, adam_chain.checkpoints, strict=True):
        assert _equal(ours.model_state, full.model_state)


def test_chain_learns_and_records_checkpoint_contents(adam_chain: Chain) -> None:
    final = adam_chain.final
    assert final.block_index == adam_chain.config.num_blocks == final.schedule_position
    assert final.config_fingerprint == adam_chain.config.fingerprint
    assert final.optimizer_state["state"], "Adam moments must be stored with every checkpoint"
    assert adam_chain.checkpoints[0].origin == "initial" and final.origin == "trained"
    assert not _equal(adam_chain.checkpoints[0].model_state, final.model_state)


@pytest.mark.parametrize("chain_name", ["adam_chain", "sgd_chain"])
def test_resume_from_stored_checkpoints_matches_uninterrupted_chain(
    chain_name: str, digits_data: BlockData, request: pytest.FixtureRequest
) -> None:
    chain: Chain = request.getfixturevalue(chain_name)
    stored = []
    for checkpoint in chain.checkpoints[:5]:  # through storage: bytes, weights_only load
        buffer = io.BytesIO()
        torch.save(checkpoint.to_state(), buffer)
        buffer.seek(0)
        stored.append(Checkpoint.from_state(torch.load(buffer, weights_only=True)))
    resumed = train_chain(config=chain.config, data=digits_data, resume_from=stored)
    assert _equal(resumed.final.model_state, chain.final.model_state)
    # Resuming must not have mutated the stored optimizer state in place.
    assert _equal(stored[4].optimizer_state["state"][0], chain.checkpoints[4].optimizer_state["state"][0])


def test_checkpoint_state_is_tensors_plus_json_metadata(sgd_chain: Chain) -> None:
    state = sgd_chain.checkpoints[3].to_state()
    assert all(isinstance(v, torch.Tensor) for v in state["tensors"].values())
    meta = json.loads(json.dumps(state["meta"]))
    assert meta["block_index"] == 3 and meta["config_fingerprint"] == sgd_chain.config.fingerprint
    back = Checkpoint.from_state(state)
    assert _equal(back.model_state, sgd_chain.checkpoints[3].model_state)
    assert back.optimizer_state["param_groups"] == sgd_chain.checkpoints[3].optimizer_state["param_groups"]


def test_sink_gets_every_checkpoint_and_chain_rebuilds_from_manifest(sgd_config, digits_data: BlockData) -> None:
    store = InMemoryChainStore()
    seen: list[int] = []
    chain = train_chain(config=sgd_config, data=digits_data, sink=lambda c: (seen.append(c.block_index), store(c)))
    assert seen == list(range(sgd_config.num_blocks + 1))
    manifest = json.loads(json.dumps(chain.manifest()))
    rebuilt = Chain.from_manifest(manifest, load_checkpoint=store.get)
    assert rebuilt.plan.fingerprint == chain.plan.fingerprint
    assert _equal(rebuilt.final.model_state, chain.final.model_state)


def test_checkpoint_from_another_config_or_data_is_rejected(adam_chain: Chain, sgd_chain: Chain) -> None:
    foreign = list(adam_chain.checkpoints)
    foreign[4] = replace(sgd_chain.checkpoints[4])
    with pytest.raises(ChainMismatchError, match="another model or config") as info:
        replace(adam_chain, checkpoints=tuple(foreign))
    assert sgd_chain.config.fingerprint in str(info.value)
    other_data = list(adam_chain.checkpoints)
    other_data[2] = replace(adam_chain.checkpoints[2], data_fingerprint="0" * 16)
    with pytest.raises(ChainMismatchError, match="trained on data 0000000000000000"):
        replace(adam_chain, checkpoints=tuple(other_data))
    with pytest.raises(ChainMismatchError, match="another model or config"):
        train_chain(config=adam_chain.config, data=_data_of(adam_chain), resume_from=sgd_chain.checkpoints[:3])


def _data_of(chain: Chain) -> BlockData:
    from obliviate.data import load_dataset, stratified_split

    dataset = load_dataset("digits")
    train_idx, heldout_idx = stratified_split(dataset.labels, sizes=(600, 300), rng=np.random.default_rng(0))
    return BlockData(train=dataset.subset(train_idx), heldout=dataset.subset(heldout_idx))
