"""verify's replay compares all the state block training carries, and M_0 with the recipe's seeded M_0 (SPEC 4, 6).

Before, only the model of each replayed block was compared and M_0 was never checked, so two chains
that trained on deleted ids passed every check: (a) the clean M'_3 carrying the original M_3's Adam
moments, blocks 4.. trained from it; (b) a chain whose M_0 is a model that trained on them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io

import numpy as np
import pytest
import torch

from obliviate.data import load_dataset, stratified_split
from obliviate.unlearning.chain import BlockData, Chain, Checkpoint
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.exact import unlearn_exact
from obliviate.unlearning.lineage import FAILED, INCONCLUSIVE, PASSED, VerifyReport, lineage_manifest, verify_replay
from obliviate.unlearning.trainer import BlockTrainer, train_chain

BLOCKS = list(range(1, 7))


@pytest.fixture(scope="module")
def setup() -> tuple[BlockData, Chain, Chain, frozenset[int]]:
    dataset = load_dataset("digits")
    train, heldout = stratified_split(dataset.labels, sizes=(240, 100), rng=np.random.default_rng(0))
    data = BlockData(train=dataset.subset(train), heldout=dataset.subset(heldout))
    config = BlockTrainingConfig(
        model="lenet5",
        image_size=8,
        levels=17,
        num_blocks=6,
        local_epochs=1,
        batch_size=16,
        optimizer="adam",
        learning_rate=0.005,
        seed=3,
    )
    chain = train_chain(config=config, data=data)
    deleted = frozenset(int(i) for i in chain.plan.block_ids(3)[:5])
    clean = unlearn_exact(chain, ids=sorted(deleted), data=data).chain
    return data, chain, clean, deleted


def _stored(checkpoint: Checkpoint) -> tuple[Checkpoint, str]:
    """The checkpoint as verify reads it from a store (torch.save of to_state, loaded back) and its sha256."""
    buffer = io.BytesIO()
    torch.save(checkpoint.to_state(), buffer)
    raw = buffer.getvalue()
    loaded = Checkpoint.from_state(torch.load(io.BytesIO(raw), weights_only=True))
    return loaded, hashlib.sha256(raw).hexdigest()


def _verify(
    chain: Chain, data: BlockData, deleted: frozenset[int], checkpoints: dict[int, Checkpoint], **changes
) -> VerifyReport:
    stored = {i: _stored(c) for i, c in checkpoints.items()}
    sha = {i: digest for i, (_, digest) in stored.items()}
    lineage = lineage_manifest(config=chain.config, plan=chain.plan, deleted_ids=deleted, checkpoint_sha256=sha)
    lineage = {**lineage, **changes}
    return verify_replay(
        config=chain.config,
        plan=chain.plan,
        deleted_ids=deleted,
        data=data,
        lineage=lineage,
        checkpoints={i: c for i, (c, _) in stored.items()},
        stored_sha256=sha,
        unreadable={},
        applied_ids=sorted(deleted),
        blocks=BLOCKS,
    )


def test_a_clean_exact_chain_read_back_from_storage_passes(setup) -> None:
    data, _chain, clean, deleted = setup
    report = _verify(clean, data, deleted, dict(enumerate(clean.checkpoints)))
    assert report.status == PASSED, report.problems
    assert report.bit_identical == {b: True for b in BLOCKS}
    assert report.initial_model_seeded is True and report.as_dict()["initial_model_seeded"] is True


def _dirty_moments_chain(setup) -> dict[int, Checkpoint]:
    """Clean M'_0..M'_3, but M'_3 carries the original M_3's Adam moments (trained on the deleted ids)."""
    data, chain, clean, deleted = setup
    m3 = dataclasses.replace(clean.checkpoints[3], optimizer_state=copy.deepcopy(chain.checkpoints[3].optimizer_state))
    tail = BlockTrainer(config=chain.config, data=data, plan=chain.plan).run(
        start=m3, last_block=6, excluded_ids=deleted
    )
    checkpoints = {i: clean.checkpoints[i] for i in range(3)}
    checkpoints[3] = m3
    checkpoints.update({c.block_index: c for c in tail})
    return checkpoints


def test_optimizer_moments_that_saw_the_deleted_ids_fail_verify(setup) -> None:
    data, _chain, clean, deleted = setup
    checkpoints = _dirty_moments_chain(setup)
    # the forgery is real: its final model is not the exact result
    assert not torch.equal(
        checkpoints[6].model_state["features.0.weight"], clean.final.model_state["features.0.weight"]
    )
    report = _verify(clean, data, deleted, checkpoints)
    assert report.status == FAILED, report.problems
    assert report.bit_identical == {1: True, 2: True, 3: False, 4: True, 5: True, 6: True}
    assert len(report.problems) == 1
    assert "optimizer state of block 3 differs from replay" in report.problems[0]
    assert "optimizer/0/exp_avg" in report.problems[0] and "model of block" not in report.problems[0]


def test_another_machine_makes_an_optimizer_mismatch_inconclusive(setup) -> None:
    data, _, clean, deleted = setup
    environment = {"torch_version": "0.0-other", "cpu_capability": "AVX2", "machine": "x86_64", "num_threads": 1}
    report = _verify(clean, data, deleted, _dirty_moments_chain(setup), environment=environment)
    assert report.status == INCONCLUSIVE
    assert "optimizer state of block 3 differs from replay" in report.problems[0]
    assert "torch_version" in report.problems[0]


def test_a_schedule_position_that_replay_does_not_give_fails_verify(setup) -> None:
    data, _, clean, deleted = setup
    checkpoints = dict(enumerate(clean.checkpoints))
    checkpoints[4] = dataclasses.replace(checkpoints[4], schedule_position=2)
    report = _verify(clean, data, deleted, checkpoints)
    assert report.status == FAILED and report.bit_identical[4] is False
    assert "schedule position of block 4 differs from replay (stored 2, replayed 4)" in report.problems[0]


def test_a_chain_not_started_from_the_seeded_initial_model_fails_verify(setup) -> None:
    data, chain, clean, deleted = setup
    m0 = dataclasses.replace(
        chain.checkpoints[0], model_state={k: v.clone() for k, v in chain.checkpoints[3].model_state.items()}
    )
    tail = BlockTrainer(config=chain.config, data=data, plan=chain.plan).run(
        start=m0, last_block=6, excluded_ids=deleted
    )
    checkpoints = {0: m0, **{c.block_index: c for c in tail}}
    report = _verify(clean, data, deleted, checkpoints)
    assert report.status == FAILED, report.problems
    assert all(report.bit_identical.values())  # every block replays bit for bit from the bad start
    assert report.initial_model_seeded is False
    assert len(report.problems) == 1
    assert report.problems[0].startswith("M_0 is not the seeded initial model of this recipe (lenet5, seed 3)")
    assert "model differs from a fresh initialisation" in report.problems[0]


def test_the_initial_model_is_checked_whatever_blocks_are_replayed(setup) -> None:
    """verify --blocks 5 replays block 5 only; M_0 (one model initialisation) is checked all the same."""
    data, _chain, clean, deleted = setup
    checkpoints = dict(enumerate(clean.checkpoints))
    state = copy.deepcopy(clean.checkpoints[1].optimizer_state)  # a fresh model with stepped Adam moments
    checkpoints[0] = dataclasses.replace(checkpoints[0], optimizer_state=state)
    stored = {i: _stored(c) for i, c in checkpoints.items()}
    sha = {i: digest for i, (_, digest) in stored.items()}
    report = verify_replay(
        config=clean.config,
        plan=clean.plan,
        deleted_ids=deleted,
        data=data,
        lineage=lineage_manifest(config=clean.config, plan=clean.plan, deleted_ids=deleted, checkpoint_sha256=sha),
        checkpoints={i: c for i, (c, _) in stored.items()},
        stored_sha256=sha,
        unreadable={},
        applied_ids=sorted(deleted),
        blocks=[5],
    )
    assert report.status == FAILED and report.bit_identical == {5: True}
    assert "M_0 is not the seeded initial model" in report.problems[0]
    assert "optimizer state differs from a fresh initialisation" in report.problems[0]


def test_the_report_words_say_what_was_checked() -> None:
    from flows.verify import _markdown, _verdict, initial_model_words

    result = {
        "run_id": "r",
        "version": 2,
        "status": "failed",
        "applied_requests": ["q"],
        "applied_ids": 1,
        "blocks_replayed": [1],
        "bit_identical": {"1": True},
        "lineage": "recorded",
        "problems": ["M_0 is not the seeded initial model of this recipe (lenet5, seed 3): ..."],
        "environment_differences": [],
        "initial_model_seeded": False,
    }
    assert initial_model_words(result) == "; M_0 is NOT the seeded initial model (below)"
    assert "1/1 replayed blocks bit-identical; M_0 is NOT the seeded initial model (below); M_0 is not" in _verdict(
        result
    )
    markdown = _markdown(result)
    assert "- M_0: NOT the seeded initial model of this recipe" in markdown
    assert "- bit-identical (model, optimizer state, schedule position): 1/1" in markdown
    assert "- requests applied: 1 (1 id)" in markdown
    assert "- requests applied: 1 (3 ids)" in _markdown({**result, "applied_ids": 3})
    assert initial_model_words({**result, "initial_model_seeded": True}) == "; M_0 is the seeded initial model"
    assert initial_model_words({**result, "initial_model_seeded": None}) == ""
