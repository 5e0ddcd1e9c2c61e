"""The classifiers' fast evaluation path computes what the training path computes (obliviate/models.py)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from obliviate.models import MaxPool2x2, build_model


@pytest.mark.parametrize("shape", [(7, 3, 28, 28), (5, 2, 9, 11), (4, 6, 2, 3)])
def test_fast_pooling_equals_max_pool2d_bit_for_bit(shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(shape, generator=generator))  # ReLU: many exact ties at 0
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        fast = MaxPool2x2()(x)
    expected = functional.max_pool2d(x, 2)
    assert fast.shape == expected.shape
    assert torch.equal(fast.nan_to_num(-1.0), expected.nan_to_num(-1.0))
    assert torch.equal(fast.isnan(), expected.isnan())


def test_training_pooling_keeps_max_pool2d_gradients_on_ties():
    # a blank background through ReLU(positive bias) ties every window: max_pool2d routes the whole
    # gradient to one input, torch.maximum would split it (and change replayed training)
    x = torch.full((2, 3, 8, 8), 0.25, requires_grad=True)
    grad = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    MaxPool2x2()(x).backward(grad)
    ours = x.grad.clone()
    x.grad = None
    functional.max_pool2d(x, 2).backward(grad)
    assert torch.equal(ours, x.grad)


@pytest.mark.parametrize("name", ["lenet5", "c3f2"])
def test_evaluation_and_training_forward_agree(name):
    model = build_model(name, seed=3).eval()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model(x)
    slow = model(x.requires_grad_())
    assert torch.equal(fast, slow.detach())
