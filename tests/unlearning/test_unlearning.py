"""Unlearning policies (SPEC section 5): exact, DeepObliviate with its guardrail, bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from obliviate.unlearning.chain import BlockData, Chain, ChainMismatchError, InMemoryChainStore
from obliviate.unlearning.deepobliviate import DeepObliviateOptions, stitch_state, unlearn_deepobliviate
from obliviate.unlearning.exact import unlearn_exact
from obliviate.unlearning.policies import unlearn
from obliviate.unlearning.records import DeletionError
from obliviate.unlearning.trainer import train_chain

# A rule that fires as soon as the residual memory has started to fall (fit a > 0, Δ_τ < Δ_1):
# the slope rule with a huge ε. It makes stitching happen deterministically on the tiny set-up.
EAGER = DeepObliviateOptions(stop_rule="slope", epsilon=1e12)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ids(chain: Chain, *blocks: int, per_block: int = 1) -> list[int]:
    return [int(i) for b in blocks for i in chain.plan.block_ids(b)[:per_block]]


@pytest.mark.parametrize("chain_name", ["adam_chain", "sgd_chain"])
def test_exact_equals_naive_retraining_bit_for_bit(chain_name, digits_data: BlockData, request) -> None:
    chain: Chain = request.getfixturevalue(chain_name)
    ids = _ids(chain, 4, 7, per_block=3)
    result = unlearn_exact(chain, ids=ids, data=digits_data)
    naive = train_chain(config=chain.config, data=digits_data, excluded_ids=ids)
    for i in range(chain.config.num_blocks + 1):
        assert _equal(result.chain.checkpoints[i].model_state, naive.checkpoints[i].model_state), f"block {i}"
    record = result.record
    assert (record.first_affected_block, record.last_affected_block) == (4, 7)
    assert record.blocks_retrained == tuple(range(4, chain.config.num_blocks + 1))
    assert result.chain.checkpoints[3] is chain.checkpoints[3]  # resumed from the stored M_{d-1}
    assert not _equal(result.chain.final.model_state, chain.final.model_state)
    assert result.chain.deleted_ids == frozenset(ids) and result.chain.generation == 1
    assert record.cpu_seconds > 0 and record.wall_time_seconds > 0


def test_second_deletion_works_from_the_current_chain(adam_chain: Chain, digits_data: BlockData) -> None:
    first, second = _ids(adam_chain, 6), _ids(adam_chain, 3, 9)
    after_first = unlearn(adam_chain, ids=first, data=digits_data).chain
    after_second = unlearn(after_first, ids=second, data=digits_data).chain
    naive = train_chain(config=adam_chain.config, data=digits_data, excluded_ids=first + second)
    assert _equal(after_second.final.model_state, naive.final.model_state)
    assert after_second.deleted_ids == frozenset(first + second) and after_second.generation == 2
    with pytest.raises(DeletionError, match=rf"already deleted: \[{first[0]}\]"):
        unlearn(after_second, ids=first, data=digits_data)


def test_deepobliviate_says_why_its_rule_did_not_stop(adam_chain: Chain, digits_data: BlockData) -> None:
    """With any ε it said "never fell below eps=1e9" where the rule could not be tried at all."""
    num_blocks = adam_chain.config.num_blocks
    late = unlearn_deepobliviate(
        adam_chain, ids=_ids(adam_chain, num_blocks - 1), data=digits_data, options=DeepObliviateOptions(epsilon=1e9)
    )
    assert late.record.stop_block is None and late.record.stop_reason.startswith(
        f"too few blocks follow the last affected block {num_blocks - 1} to apply stop rule residual_ratio "
        "(it needs 5 Δ points before the last block)"
    )
    # with ε this large the rule stops at the first block it can fire at; if it never can, it says why
    early = unlearn_deepobliviate(
        adam_chain, ids=_ids(adam_chain, 1), data=digits_data, options=DeepObliviateOptions(epsilon=1e9)
    )
    assert "never fell below" not in early.record.stop_reason, early.record.stop_reason


def test_deepobliviate_without_early_stop_equals_exact(adam_chain: Chain, digits_data: BlockData) -> None:
    ids = _ids(adam_chain, 5)
    never = DeepObliviateOptions(epsilon=1e-12)
    result = unlearn_deepobliviate(adam_chain, ids=ids, data=digits_data, options=never)
    exact = unlearn_exact(adam_chain, ids=ids, data=digits_data)
    assert result.record.stop_block is None and "never fell below" in result.record.stop_reason
    assert result.record.guardrail.outcome == "not_needed"
    assert _equal(result.chain.final.model_state, exact.chain.final.model_state)
    assert len(result.record.delta_series) == adam_chain.config.num_blocks - 5 + 1
    # Stitching at τ = B is the identity: M'_B + (M_B − M_B) = M'_B exactly.
    final = exact.chain.final.model_state
    assert _equal(
        stitch_state(
            retrained=final, original_final=adam_chain.final.model_state, original_at_stop=adam_chain.final.model_state
        ),
        final,
    )


def test_deepobliviate_stops_stitches_and_passes_guardrail(adam_chain: Chain, digits_data: BlockData) -> None:
    ids = _ids(adam_chain, 4)
    store = InMemoryChainStore()
    result = unlearn_deepobliviate(adam_chain, ids=ids, data=digits_data, options=EAGER, sink=store)
    record = result.record
    assert record.stop_block is not None and record.stop_block >= 4 + EAGER.min_points - 1
    assert len(record.delta_series) == record.stop_block - 4 + 1 and record.fit is not None
    if record.guardrail.outcome == "passed":
        j = record.stop_block
        expected = stitch_state(
            retrained=result.chain.checkpoints[j].model_state,
            original_final=adam_chain.final.model_state,
            original_at_stop=adam_chain.checkpoints[j].model_state,
        )
        assert _equal(result.chain.final.model_state, expected)
        assert result.chain.final.origin == "stitched" and result.chain.checkpoints[j].origin == "trained"
        attempt = record.guardrail.attempts[0]
        assert attempt.accuracy >= attempt.reference - 0.01 and attempt.accuracy == result.chain.final.heldout_accuracy
    else:  # a stitched model below tolerance must never be returned
        assert record.guardrail.outcome in ("passed_after_extension", "fallback_exact")
        assert not record.guardrail.attempts[0].passed
    assert result.chain.final.heldout_accuracy >= adam_chain.final.heldout_accuracy - 0.01 or (
        record.guardrail.outcome == "fallback_exact"
    )
    assert store.block_indices() == list(range(4, adam_chain.config.num_blocks + 1))


def test_never_stops_before_the_last_affected_block(adam_chain: Chain, digits_data: BlockData) -> None:
    ids = _ids(adam_chain, 2, 10)
    result = unlearn_deepobliviate(adam_chain, ids=ids, data=digits_data, options=EAGER)
    assert result.record.stop_block is None or result.record.stop_block >= 10
    assert min(result.record.blocks_retrained) == 2 and max(result.record.blocks_retrained) >= 10


def test_guardrail_rejects_a_broken_stitched_model_and_falls_back_to_exact(
    adam_chain: Chain, digits_data: BlockData
) -> None:
    # Corrupt the stored M_B (its recorded accuracy stays): every stitched model M'_j + (M_B − M_j)
    # inherits the damage, so the guardrail must refuse each one and end at the exact result.
    generator = torch.Generator().manual_seed(0)
    broken_state = {
        k: v + 5.0 * torch.randn(v.shape, generator=generator) for k, v in adam_chain.final.model_state.items()
    }
    broken = replace(
        adam_chain, checkpoints=adam_chain.checkpoints[:-1] + (replace(adam_chain.final, model_state=broken_state),)
    )
    ids = _ids(adam_chain, 4)
    result = unlearn_deepobliviate(broken, ids=ids, data=digits_data, options=EAGER)
    guardrail = result.record.guardrail
    assert result.record.stop_block is not None, "the eager rule must fire so that a stitched model is checked"
    assert guardrail.outcome == "fallback_exact"
    assert guardrail.attempts and not any(a.passed for a in guardrail.attempts)
    assert all(a.accuracy < a.reference - a.tolerance for a in guardrail.attempts)
    exact = unlearn_exact(adam_chain, ids=ids, data=digits_data)
    assert _equal(result.chain.final.model_state, exact.chain.final.model_state)
    assert result.record.blocks_retrained == tuple(range(4, adam_chain.config.num_blocks + 1))
    assert all(c.origin != "stitched" for c in result.chain.checkpoints)


@pytest.mark.parametrize(
    "ids, message",
    [
        ([], "at least one sample id; got an empty set"),
        ([3, 5, 3], r"once per request; duplicated: \[3\]"),
        ([-1, 2], r"must be in 0..599 .*unknown: \[-1\]"),
        ([600], r"unknown: \[600\]"),
        ([1.5], r"must be integers .*\[1.5\]"),
        (["7"], r"must be integers"),
    ],
)
def test_bad_deletion_requests_are_refused_and_change_nothing(
    adam_chain: Chain, digits_data: BlockData, ids, message: str
) -> None:
    before = [c.model_state for c in adam_chain.checkpoints]
    calls: list[int] = []
    for policy in ("exact", "deepobliviate"):
        with pytest.raises(DeletionError, match=message) as info:
            unlearn(adam_chain, ids=ids, data=digits_data, policy=policy, sink=lambda c: calls.append(c.block_index))
        assert "rule:" in str(info.value) and "Nothing changed" in str(info.value)
    assert calls == [] and adam_chain.deleted_ids == frozenset() and adam_chain.generation == 0
    assert all(a is b.model_state for a, b in zip(before, adam_chain.checkpoints, strict=True))


def test_data_of_another_set_is_refused(adam_chain: Chain, digits_data: BlockData) -> None:
    other = BlockData(train=digits_data.train, heldout=digits_data.heldout.subset(np.arange(100)))
    with pytest.raises(ChainMismatchError, match="fingerprint"):
        unlearn(adam_chain, ids=[1], data=other)


def test_unknown_policy_and_bad_options_are_refused(adam_chain: Chain, digits_data: BlockData) -> None:
    with pytest.raises(
        ValueError, match=r"policy must be one of \['exact', 'deepobliviate'\]; got 'forget_everything'"
    ):
        unlearn(adam_chain, ids=[1], data=digits_data, policy="forget_everything")
    with pytest.raises(ValueError, match="min_points must be an integer >= 3"):
        DeepObliviateOptions(min_points=2)
    with pytest.raises(ValueError, match="options apply to the deepobliviate policy only"):
        unlearn(adam_chain, ids=[1], data=digits_data, policy="exact", options=DeepObliviateOptions())


def test_second_deletion_after_deepobliviate_starts_from_its_chain(adam_chain: Chain, digits_data: BlockData) -> None:
    first = unlearn_deepobliviate(adam_chain, ids=_ids(adam_chain, 4), data=digits_data, options=EAGER).chain
    second = unlearn(first, ids=_ids(adam_chain, 10), data=digits_data)
    assert second.chain.checkpoints[9] is first.checkpoints[9]  # M_{d-1} of the current chain, not the original
    assert second.chain.deleted_ids == first.deleted_ids | {_ids(adam_chain, 10)[0]}
    expected = train_chain(
        config=adam_chain.config,
        data=digits_data,
        excluded_ids=sorted(second.chain.deleted_ids),
        resume_from=first.checkpoints[:10],
    )
    assert _equal(second.chain.final.model_state, expected.final.model_state)


def test_verify_names_stitched_checkpoints_as_estimates_not_tampering(
    adam_chain: Chain, digits_data: BlockData
) -> None:
    """Replaying a stitched block retrains the exact block, so verify read DeepObliviate's estimate as a forgery."""
    import hashlib
    import io

    from obliviate.unlearning.lineage import FAILED, lineage_manifest, verify_replay

    ids = _ids(adam_chain, 4)
    chain = unlearn_deepobliviate(adam_chain, ids=ids, data=digits_data, options=EAGER).chain
    stitched = [c.block_index for c in chain.checkpoints if c.origin == "stitched"]
    assert stitched, "EAGER must stitch on this set-up for the test to mean anything"

    def digest(checkpoint) -> str:
        buffer = io.BytesIO()
        torch.save(checkpoint.to_state(), buffer)
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    sha = {c.block_index: digest(c) for c in chain.checkpoints}
    report = verify_replay(
        config=chain.config,
        plan=chain.plan,
        deleted_ids=chain.deleted_ids,
        data=digits_data,
        lineage=lineage_manifest(
            config=chain.config, plan=chain.plan, deleted_ids=chain.deleted_ids, checkpoint_sha256=sha
        ),
        checkpoints=dict(enumerate(chain.checkpoints)),
        stored_sha256=sha,
        unreadable={},
        applied_ids=ids,
        blocks=list(range(1, chain.config.num_blocks + 1)),
    )
    assert report.status == FAILED
    assert report.blocks_not_replayed == stitched
    assert report.blocks_replayed == list(range(1, stitched[0])) and all(report.bit_identical.values())
    assert len(report.problems) == 1, report.problems
    assert f"M_{stitched[0]}..M_{stitched[-1]} are DeepObliviate estimates" in report.problems[0]
    assert "--policy exact" in report.problems[0]
