"""HeldoutJudge: accuracy and paired margin of served combinations, from real modules (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from obliviate.errors import ConfigError
from obliviate.unlearning.judge import HeldoutJudge
from obliviate.unlearning.rollback import ShardCheckpoints, paired_margin_points, plan_interim


class Fixed(nn.Module):
    """Answers class ``answers[i]`` for input row i (its first feature is the row index)."""

    def __init__(self, answers: list[int], classes: int = 3) -> None:
        super().__init__()
        self.logits = torch.full((len(answers), classes), -5.0)
        self.logits[torch.arange(len(answers)), torch.tensor(answers)] = 5.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()]


X = torch.arange(8, dtype=torch.float32).reshape(8, 1)
Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def test_accuracy_and_margin_follow_the_vote_and_the_reference_and_load_each_checkpoint_once() -> None:
    right, wrong_two = Y.tolist(), [1, 2] + Y.tolist()[2:]
    loads: list[tuple[int, int]] = []
    checkpoints = {(0, 1): Fixed(wrong_two), (1, 1): Fixed(wrong_two)}

    def load(shard: int, block: int) -> nn.Module:
        loads.append((shard, block))
        return checkpoints[(shard, block)]

    judge = HeldoutJudge(x=X, y=Y, reference=[Fixed(right), Fixed(right)], load=load)
    assert judge.reference_accuracy == 1.0 and judge.reference_shard_accuracy(1) == 1.0
    assert loads == []  # nothing loaded until a judgement needs it
    assert judge.accuracy({0: 1, 1: 1}) == pytest.approx(6 / 8)
    expected = paired_margin_points(reference=np.asarray(right), candidate=np.asarray(wrong_two))
    assert judge.margin({0: 1, 1: 1}) == pytest.approx(expected) and expected > 0
    assert judge.accuracy({0: 1, 1: None}) == pytest.approx(6 / 8) and judge.accuracy({0: None, 1: None}) == 0.0
    assert sorted(loads) == [(0, 1), (1, 1)]  # each checkpoint evaluated once


def test_plan_interim_with_the_judge_drops_a_harmful_shard_and_refuses_a_group_below_floor_plus_margin() -> None:
    right = Y.tolist()
    rolled = [(c + 1) % 3 for c in right]  # shard 0's rollback target is always wrong
    judge = HeldoutJudge(
        x=X,
        y=Y,
        reference=[Fixed(right), Fixed(right)],
        load=lambda k, b: Fixed(rolled) if (k, b) == (0, 1) else Fixed(right),
    )
    shards = [ShardCheckpoints(k, (None, 0.9, 1.0), 2) for k in range(2)]
    plan = plan_interim(
        shards=shards,
        affected={0: 2},
        served_floor=judge.reference_accuracy - 0.02,
        shard_floor=0.0,
        ensemble_accuracy=judge.accuracy,
        margin_of=judge.margin,
    )
    # with shard 0's M_1 voting, ties between its wrong class and the right one go to the lower class
    assert judge.accuracy({0: 1, 1: 2}) < 1.0
    assert plan.publish and plan.served == {0: None, 1: 2} and plan.left_vote == (0,)
    refused = plan_interim(
        shards=[shards[0], ShardCheckpoints(1, (None, 0.9, 1.0), None)],  # shard 1 is out of the vote already
        affected={0: 2},
        served_floor=judge.reference_accuracy - 0.02,
        shard_floor=0.0,
        ensemble_accuracy=judge.accuracy,
        margin_of=judge.margin,
    )
    assert not refused.publish and refused.flush_now


def test_a_judge_needs_a_reference_and_a_held_out_set() -> None:
    with pytest.raises(ConfigError, match="reference model"):
        HeldoutJudge(x=X, y=Y, reference=[], load=lambda k, b: Fixed(Y.tolist()))
