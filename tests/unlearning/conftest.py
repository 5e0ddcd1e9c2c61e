"""Tiny real data and chains for the unlearning tests: scikit-learn digits (8x8), LeNet-5 at image_size=8."""

from __future__ import annotations

import numpy as np
import pytest

from obliviate.data import load_dataset, stratified_split
from obliviate.unlearning.chain import BlockData, Chain
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.trainer import train_chain


@pytest.fixture(scope="session")
def digits_data() -> BlockData:
    dataset = load_dataset("digits")
    train_idx, heldout_idx = stratified_split(dataset.labels, sizes=(600, 300), rng=np.random.default_rng(0))
    return BlockData(train=dataset.subset(train_idx), heldout=dataset.subset(heldout_idx))


@pytest.fixture(scope="session")
def adam_config() -> BlockTrainingConfig:
    return BlockTrainingConfig(
        model="lenet5",
        image_size=8,
        levels=17,
        num_blocks=12,
        local_epochs=3,
        batch_size=16,
        optimizer="adam",
        learning_rate=0.005,
        schedule="cosine",
        seed=3,
    )


@pytest.fixture(scope="session")
def sgd_config() -> BlockTrainingConfig:
    return BlockTrainingConfig(
        model="lenet5",
        image_size=8,
        levels=17,
        num_blocks=10,
        local_epochs=4,
        batch_size=16,
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.9,
        schedule="step",
        step_every_blocks=4,
        gamma=0.5,
        seed=5,
    )


@pytest.fixture(scope="session")
def adam_chain(adam_config: BlockTrainingConfig, digits_data: BlockData) -> Chain:
    return train_chain(config=adam_config, data=digits_data)


@pytest.fixture(scope="session")
def sgd_chain(sgd_config: BlockTrainingConfig, digits_data: BlockData) -> Chain:
    return train_chain(config=sgd_config, data=digits_data)
