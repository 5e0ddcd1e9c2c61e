"""Deadline-aware batching, rollback, shards and probes (SPEC section 6): the pure rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from obliviate.errors import ConfigError
from obliviate.unlearning.batching import (
    COUNT,
    DAY_S,
    DEADLINE,
    NOW,
    WINDOW,
    BatchPolicy,
    amortised_fraction,
    expected_retrain_seconds,
    flush_decision,
    flush_time,
    late_requests,
    new_request,
    parse_duration,
)
from obliviate.unlearning.chain import BlockData, Chain
from obliviate.unlearning.probes import checker_pattern, per_sample_loss, square_pattern, stamp_pattern
from obliviate.unlearning.rollback import (
    ShardCheckpoints,
    advance_after_retrain,
    heldout_margin_points,
    paired_margin_points,
    plan_interim,
    saw_deleted,
    served_floor,
)
from obliviate.unlearning.shards import MEAN, VOTE, combine, make_shard_plan, predict_shards
from obliviate.unlearning.verification import stamp_trigger

# ----- batching ------------------------------------------------------------------------------------


def test_durations_parse_with_units_and_reject_nonsense() -> None:
    assert parse_duration("1h") == 3600.0
    assert parse_duration("30d") == 30 * DAY_S
    assert parse_duration("90") == 90.0
    assert parse_duration(0) == 0.0
    with pytest.raises(ConfigError, match="optional unit"):
        parse_duration("soon")


def _batch(policy: BatchPolicy, times: list[float]) -> list:
    return [new_request(request_id=f"r{i}", received_at=t, policy=policy) for i, t in enumerate(times)]


def test_batch_flushes_when_its_window_closes() -> None:
    policy = BatchPolicy(window_s=3600.0)
    batch = _batch(policy, [100.0, 500.0])
    assert flush_time(batch, policy=policy, expected_retrain_s=60.0) == (3700.0, WINDOW)
    assert not flush_decision(batch, now=3699.0, policy=policy, expected_retrain_s=60.0).due
    assert flush_decision(batch, now=3700.0, policy=policy, expected_retrain_s=60.0).due


def test_default_window_flushes_every_request_at_once() -> None:
    policy = BatchPolicy()
    decision = flush_decision(_batch(policy, [42.0]), now=42.0, policy=policy, expected_retrain_s=60.0)
    assert decision.due and decision.reason == WINDOW


def test_batch_flushes_when_it_holds_batch_max_requests() -> None:
    policy = BatchPolicy(window_s=DAY_S, batch_max=3)
    assert flush_time(_batch(policy, [0.0, 10.0]), policy=policy, expected_retrain_s=60.0)[1] == WINDOW
    assert flush_time(_batch(policy, [0.0, 10.0, 20.0]), policy=policy, expected_retrain_s=60.0) == (20.0, COUNT)


def test_batch_flushes_before_the_earliest_deadline_minus_retrain_and_margin() -> None:
    policy = BatchPolicy(window_s=7 * DAY_S, deadline_s=2 * DAY_S, margin_s=600.0)
    at, reason = flush_time(_batch(policy, [0.0, 5000.0]), policy=policy, expected_retrain_s=1000.0)
    assert reason == DEADLINE and at == 2 * DAY_S - 1000.0 - 600.0


def test_forced_flush_is_due_now() -> None:
    policy = BatchPolicy(window_s=DAY_S)
    decision = flush_decision(_batch(policy, [0.0]), now=5.0, policy=policy, expected_retrain_s=1.0, force=True)
    assert decision.due and decision.reason == NOW and decision.at == 5.0


def test_a_request_is_never_exact_after_its_deadline_under_the_rules() -> None:
    """Simulate Poisson arrivals; retrains take up to the expected time + margin: nothing is late."""
    rng = np.random.default_rng(0)
    policy = BatchPolicy(window_s=10 * DAY_S, deadline_s=3 * DAY_S, margin_s=3600.0)
    expected = 7200.0
    arrivals = np.cumsum(rng.exponential(DAY_S / 20, size=600))
    batch, late, flushed = [], [], 0
    for i, t in enumerate(arrivals):
        while batch:
            at, _ = flush_time(batch, policy=policy, expected_retrain_s=expected)
            if at > t:
                break
            exact_at = at + expected + rng.uniform(0, policy.margin_s)  # a retrain within expected + margin
            late += late_requests(batch, exact_at=exact_at)
            batch, flushed = [], flushed + 1
        batch.append(new_request(request_id=f"r{i}", received_at=float(t), policy=policy))
    assert flushed > 5 and late == []
    # and the rule does report a late request when a retrain overruns
    overrun = _batch(policy, [0.0])
    assert late_requests(overrun, exact_at=policy.deadline_s + 1.0) == ["r0"]


def test_expected_retrain_uses_recorded_block_times_from_the_first_affected_block() -> None:
    times = [1.0, 2.0, None, 4.0]
    assert expected_retrain_seconds(times, first_block=1) == pytest.approx(1 + 2 + 7 / 3 + 4)
    assert expected_retrain_seconds(times, first_block=4) == 4.0
    with pytest.raises(ConfigError, match="recorded block time"):
        expected_retrain_seconds([None, None])


def test_policy_rejects_a_deadline_inside_the_margin_and_amortised_cost_formula() -> None:
    with pytest.raises(ConfigError, match="must exceed margin_s"):
        BatchPolicy(deadline_s=10.0, margin_s=3600.0)
    assert amortised_fraction(first_affected_block=1, num_blocks=20, requests=20) == pytest.approx(1 / 20)
    assert amortised_fraction(first_affected_block=11, num_blocks=20, requests=1) == pytest.approx(0.5)


# ----- rollback ------------------------------------------------------------------------------------

ACC = (0.1, 0.5, 0.8, 0.9, 0.95)  # M_0..M_4


def test_single_chain_serves_m_d_minus_1_when_it_meets_the_floor() -> None:
    plan = plan_interim(shards=[ShardCheckpoints(0, ACC, 4)], affected={0: 4}, served_floor=0.85, shard_floor=0.0)
    assert plan.served == {0: 3} and not plan.flush_now and plan.accuracy == 0.9


def test_rollback_below_the_floor_flushes_now_and_never_serves_a_block_that_saw_the_ids() -> None:
    plan = plan_interim(shards=[ShardCheckpoints(0, ACC, 4)], affected={0: 2}, served_floor=0.85, shard_floor=0.0)
    assert plan.flush_now and plan.served == {0: 1}
    assert saw_deleted(served=plan.served, affected={0: 2}, retrained_through={}) == []
    # a deletion in block 1 leaves only M_0: the shard leaves, nothing can be served, flush now
    first = plan_interim(shards=[ShardCheckpoints(0, ACC, 4)], affected={0: 1}, served_floor=0.5, shard_floor=0.0)
    assert first.flush_now and first.served == {0: None}
    # the invariant checker itself catches a served block that saw the ids
    assert saw_deleted(served={0: 3}, affected={0: 2}, retrained_through={0: 2}) == [0]
    assert saw_deleted(served={0: 3}, affected={0: 2}, retrained_through={0: 3}) == []


def test_affected_shards_roll_back_or_leave_the_vote_and_retrained_blocks_bring_them_back() -> None:
    shards = [ShardCheckpoints(k, ACC, 4) for k in range(3)]
    plan = plan_interim(
        shards=shards,
        affected={0: 4, 1: 2},
        served_floor=0.8,
        shard_floor=0.7,
        ensemble_accuracy=lambda served: 0.9 if sum(v is not None for v in served.values()) >= 2 else 0.5,
    )
    assert plan.served == {0: 3, 1: None, 2: 4}
    assert plan.left_vote == (1,) and not plan.flush_now
    assert advance_after_retrain(served=plan.served, shard=1, retrained_block=2) == {0: 3, 1: 2, 2: 4}
    # a shard already rolled back further stays there
    again = plan_interim(shards=[ShardCheckpoints(0, ACC, 2)], affected={0: 4}, served_floor=0.0, shard_floor=0.0)
    assert again.served == {0: 2}


def test_served_floor_keeps_a_margin_for_heldout_vs_test_noise() -> None:
    assert served_floor(pre_deletion_accuracy=0.95, floor_points=2.0, margin_points=1.0) == pytest.approx(0.94)
    assert served_floor(pre_deletion_accuracy=0.95, floor_points=2.0) == pytest.approx(0.93)
    with pytest.raises(ConfigError, match="margin"):
        served_floor(pre_deletion_accuracy=0.95, floor_points=1.0, margin_points=2.0)
    # one standard error of a difference of two 500-sample accuracies; never more than the floor
    assert heldout_margin_points(accuracy=0.96, heldout_size=500, floor_points=2.0) == pytest.approx(1.24, abs=0.01)
    assert heldout_margin_points(accuracy=0.80, heldout_size=500, floor_points=2.0) == 2.0
    with pytest.raises(ConfigError):
        heldout_margin_points(accuracy=1.5, heldout_size=500, floor_points=2.0)


def test_an_interim_below_the_floor_is_never_published_and_the_batch_flushes() -> None:
    below = plan_interim(shards=[ShardCheckpoints(0, ACC, 4)], affected={0: 2}, served_floor=0.85, shard_floor=0.0)
    assert below.flush_now and not below.publish
    meets = plan_interim(shards=[ShardCheckpoints(0, ACC, 4)], affected={0: 4}, served_floor=0.85, shard_floor=0.0)
    assert meets.publish and not meets.flush_now and meets.accuracy is not None and meets.accuracy >= 0.85


def _ensemble(weights: dict[int, dict[int | None, float]]):
    """Held-out accuracy of a vote: the mean of the voting shards' per-block accuracies (a stand-in rule)."""

    def accuracy(served) -> float:
        values = [weights[k][b] for k, b in served.items() if b is not None]
        return sum(values) / len(values)

    return accuracy


def test_a_weak_rolled_back_shard_leaves_the_vote_when_it_lowers_the_ensemble() -> None:
    shards = [ShardCheckpoints(k, ACC, 4) for k in range(4)]

    def acc(served) -> float:  # shard 1 at M_1 drags the vote down; shard 0 at M_3 still helps it
        if served.get(1) is not None:
            return 0.80
        return 0.95 if served.get(0) is not None else 0.94

    plan = plan_interim(shards=shards, affected={0: 4, 1: 2}, served_floor=0.92, shard_floor=0.0, ensemble_accuracy=acc)
    assert plan.served == {0: 3, 1: None, 2: 4, 3: 4}
    assert plan.left_vote == (1,) and plan.publish and not plan.flush_now and plan.accuracy == 0.95
    # the published vote never holds a block that saw the ids
    assert saw_deleted(served=plan.served, affected={0: 4, 1: 2}, retrained_through={}) == []


def test_when_no_vote_meets_the_floor_nothing_is_published_and_the_batch_flushes_now() -> None:
    shards = [ShardCheckpoints(k, ACC, 4) for k in range(2)]
    acc = _ensemble({k: dict(enumerate(ACC)) for k in range(2)})
    plan = plan_interim(shards=shards, affected={0: 2, 1: 2}, served_floor=0.9, shard_floor=0.0, ensemble_accuracy=acc)
    assert plan.flush_now and not plan.publish
    assert saw_deleted(served=plan.served, affected={0: 2, 1: 2}, retrained_through={}) == []
    # one unaffected shard that meets the floor alone is served (the affected shard leaves the vote)
    alone = plan_interim(shards=shards, affected={0: 2}, served_floor=0.9, shard_floor=0.0, ensemble_accuracy=acc)
    assert alone.served == {0: None, 1: 4} and alone.publish and alone.left_vote == (0,)


# ----- shards --------------------------------------------------------------------------------------


def test_shard_plan_is_disjoint_stratified_and_locates_ids() -> None:
    labels = np.repeat(np.arange(10), 40)
    plan = make_shard_plan(labels, num_shards=4, seed=1)
    assert sorted(np.concatenate(plan.shards).tolist()) == list(range(400))
    for shard in plan.shards:
        assert np.bincount(labels[shard], minlength=10).tolist() == [10] * 10
    located = plan.locate([plan.shards[2][5], plan.shards[2][1], plan.shards[0][0]])
    assert sorted(located) == [0, 2] and located[2].tolist() == [1, 5]
    assert make_shard_plan(labels, num_shards=4, seed=1).to_dict() == plan.to_dict()


def test_shards_vote_deterministically_with_stated_tie_breaks() -> None:
    a = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    b = torch.tensor([[0.5, 0.5, 0.0], [0.6, 0.3, 0.1]], dtype=torch.float64)
    c = torch.tensor([[0.1, 0.2, 0.7], [0.1, 0.1, 0.8]], dtype=torch.float64)
    assert combine([a, b], rule=MEAN).tolist() == [0, 0]  # exact tie -> lowest class
    assert combine([a, b, c], rule=VOTE).tolist() == [0, 2]  # row 0: 0 wins tie (0.5,0.5 argmax 0 twice)
    assert combine([b, a], rule=MEAN).tolist() == combine([a, b], rule=MEAN).tolist()  # order-free
    with pytest.raises(ConfigError, match="no shard is in the vote"):
        combine([])


def test_predict_shards_runs_real_models(adam_chain: Chain, digits_data: BlockData) -> None:
    models = [adam_chain.model(), adam_chain.model(adam_chain.config.num_blocks - 1)]
    first = predict_shards(models, x=digits_data.x_heldout)
    assert torch.equal(first, predict_shards(list(reversed(models)), x=digits_data.x_heldout))
    assert float((first == digits_data.y_heldout).double().mean()) > 0.5


# ----- probes --------------------------------------------------------------------------------------


def test_stamp_pattern_generalises_the_white_square_and_any_pattern() -> None:
    images = np.zeros((2, 8, 8), dtype=np.uint8)
    square = stamp_pattern(images, pattern=square_pattern(size=3, level=16), row=-3, col=-3, levels=17)
    assert np.array_equal(square, stamp_trigger(images, levels=17, size=3))
    checker = stamp_pattern(images, pattern=checker_pattern(size=2, level=9), row=1, col=2, levels=17)
    assert checker[0, 1, 2] == 9 and checker[0, 1, 3] == 0 and checker[0, 2, 3] == 9
    with pytest.raises(ConfigError, match="does not fit"):
        stamp_pattern(images, pattern=square_pattern(size=3, level=1), row=7, col=0, levels=17)


def test_per_sample_loss_matches_the_mean_loss(adam_chain: Chain, digits_data: BlockData) -> None:
    model = adam_chain.model()
    losses = per_sample_loss(model, x=digits_data.x_heldout, y=digits_data.y_heldout, batch_size=64)
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model.eval()(digits_data.x_heldout).double(), digits_data.y_heldout)
    assert losses.shape == (len(digits_data.y_heldout),) and float(losses.mean()) == pytest.approx(float(full))


def test_sharp_block_drops_are_named_and_healthy_chains_pass(adam_chain: Chain) -> None:
    from obliviate.unlearning.health import sharp_drops

    drops = sharp_drops([None, 0.5, 0.8, 0.6, 0.79, 0.9])
    assert [(d.block, round(d.drop, 2)) for d in drops] == [(3, 0.2)]
    assert (
        drops[0]
        .message()
        .startswith("block 3: held-out accuracy 60.0 % is 20.0 points below the best before it (80.0 %)")
    )
    healthy = [c.heldout_accuracy for c in adam_chain.checkpoints]
    assert sharp_drops(healthy, threshold=0.2) == []


# ----- lineage and replay (pure) -------------------------------------------------------------------


def test_replay_names_another_environment_as_inconclusive_not_failed(sgd_chain: Chain, digits_data: BlockData) -> None:
    import dataclasses
    import hashlib
    import io

    from obliviate.unlearning.lineage import FAILED, INCONCLUSIVE, PASSED, lineage_manifest, verify_replay

    def digest(checkpoint) -> str:
        buffer = io.BytesIO()
        torch.save(checkpoint.to_state(), buffer)
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    chain = sgd_chain
    sha = {c.block_index: digest(c) for c in chain.checkpoints}
    lineage = lineage_manifest(
        config=chain.config, plan=chain.plan, deleted_ids=chain.deleted_ids, checkpoint_sha256=sha
    )
    common = {
        "config": chain.config,
        "plan": chain.plan,
        "deleted_ids": chain.deleted_ids,
        "data": digits_data,
        "stored_sha256": sha,
        "unreadable": {},
        "applied_ids": [],
        "blocks": [3],
    }
    checkpoints = dict(enumerate(chain.checkpoints))
    assert verify_replay(lineage=lineage, checkpoints=checkpoints, **common).status == PASSED
    # a stored M_3 that re-training does not reproduce (its hash made consistent, as a forger would)
    state = {k: v.clone() for k, v in chain.checkpoints[3].model_state.items()}
    first = next(iter(state))
    state[first] = state[first] + 1e-6
    forged = dict(checkpoints)
    forged[3] = dataclasses.replace(chain.checkpoints[3], model_state=state)
    failed = verify_replay(lineage=lineage, checkpoints=forged, **common)
    assert failed.status == FAILED and failed.bit_identical == {3: False}
    assert "matching environment" in failed.problems[0]
    other = {**lineage, "environment": {**lineage["environment"], "torch_version": "0.0-other"}}
    unsure = verify_replay(lineage=other, checkpoints=forged, **common)
    assert unsure.status == INCONCLUSIVE and "torch_version" in unsure.problems[0]


def test_paired_margin_grows_with_disagreement_not_with_accuracy() -> None:
    reference = np.zeros(500, dtype=np.int64)
    close, far = reference.copy(), reference.copy()
    close[:10], far[:100] = 1, 1  # differ on 2 % and on 20 % of the held-out samples
    assert paired_margin_points(reference=reference, candidate=reference) == 0.0
    assert paired_margin_points(reference=reference, candidate=close, z=1.0) == pytest.approx(0.894, abs=0.001)
    assert paired_margin_points(reference=reference, candidate=far) == pytest.approx(8.485, abs=0.001)  # z = 3
    with pytest.raises(ConfigError, match="same held-out samples"):
        paired_margin_points(reference=reference, candidate=close[:10])


def test_an_interim_must_clear_the_floor_by_its_own_margin() -> None:
    # M_3 meets the bare floor (0.90 >= 0.85) but differs too much from the model it replaces to be vouched for
    plan = plan_interim(
        shards=[ShardCheckpoints(0, ACC, 4)],
        affected={0: 4},
        served_floor=0.85,
        shard_floor=0.0,
        margin_of=lambda served: 6.0,
    )
    assert not plan.publish and plan.flush_now and "margin 6.00" in plan.reason
    vouched = plan_interim(
        shards=[ShardCheckpoints(0, ACC, 4)],
        affected={0: 4},
        served_floor=0.85,
        shard_floor=0.0,
        margin_of=lambda s: 1.0,
    )
    assert vouched.publish and vouched.served == {0: 3}


def test_with_a_margin_the_vote_is_chosen_by_its_lower_bound() -> None:
    shards = [ShardCheckpoints(k, ACC, 4) for k in range(3)]

    def acc(served) -> float:  # keeping the rolled-back shard 0 scores higher on held-out data ...
        return 0.95 if served.get(0) is not None else 0.94

    def margin(served) -> float:  # ... but it makes the vote differ much more from the pre-deletion model
        return 4.0 if served.get(0) is not None else 1.0

    by_accuracy = plan_interim(
        shards=shards, affected={0: 2}, served_floor=0.90, shard_floor=0.0, ensemble_accuracy=acc
    )
    assert by_accuracy.served[0] == 1
    by_bound = plan_interim(
        shards=shards, affected={0: 2}, served_floor=0.90, shard_floor=0.0, ensemble_accuracy=acc, margin_of=margin
    )
    assert by_bound.served == {0: None, 1: 4, 2: 4} and by_bound.publish and by_bound.left_vote == (0,)
