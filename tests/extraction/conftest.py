"""Shared fixtures of the extraction-audit tests: a small real MNIST slice and a tiny target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from obliviate.data import load_dataset, stratified_split
from obliviate.extraction.substitute import TrainConfig, train_classifier


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # CI has 2 shared cores; one intra-op thread avoids oversubscription with Ray workers.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mnist():
    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def split(mnist):
    """Stratified (train 300, pool 120, test 100) indices of real MNIST."""
    return stratified_split(mnist.labels, sizes=(300, 120, 100), rng=np.random.default_rng(7))


@pytest.fixture(scope="session")
def target_model(mnist, split):
    train_idx = split[0]
    return train_classifier(
        images=mnist.images[train_idx], labels=mnist.labels[train_idx], config=TrainConfig(steps=60), seed=3
    )


@pytest.fixture(scope="session")
def pool_images(mnist, split):
    return mnist.images[split[1]]
