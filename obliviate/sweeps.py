"""Trials for the trade-off sweeps users choose between (issue 7), as pure functions.

* :func:`unlearning_trial`: for one (B, ε), train a block chain, delete seeded samples, and set
  DeepObliviate's speed-up over naive retraining against its consistency with the naive model
  (SPEC section 5), next to the noise floor (the original model's consistency with naive).
* :func:`reduction_trial`: for one (k, bins), select k queries by DRMI at that MI resolution, query
  a target, train a substitute, and report its accuracy and agreement (SPEC section 3).
* :func:`pareto_front`: the trials no other trial beats on every objective.

The sweep machinery (Ray Tune, storage) lives in ``flows/tune.py``; these functions only compute.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from obliviate.errors import ConfigError
from obliviate.extraction.selectors import image_entropy
from obliviate.extraction.substitute import TrainConfig, accuracy, agreement, predict_labels, train_classifier
from obliviate.extraction.target import Backend, Target
from obliviate.reduction.drmi import Aggregate, drmi_reduce
from obliviate.reduction.mi import mi_matrix
from obliviate.unlearning.chain import BlockData
from obliviate.unlearning.config import BlockTrainingConfig
from obliviate.unlearning.deepobliviate import DeepObliviateOptions, unlearn_deepobliviate
from obliviate.unlearning.trainer import predict, train_chain
from obliviate.unlearning.verification import consistency


def unlearning_trial(
    *,
    num_blocks: int,
    epsilon: float,
    config: BlockTrainingConfig,
    data: BlockData,
    num_deleted: int,
    seed: int,
) -> dict[str, Any]:
    """One (B, ε) point: DeepObliviate's speed-up and consistency against naive retraining.

    Args:
        num_blocks: B.
        epsilon: ε of the stop rule.
        config: every other training setting (its ``num_blocks`` is replaced by B).
        data: training and held-out data.
        num_deleted: samples deleted, drawn at seeded random positions.
        seed: draws the deleted ids.

    Returns:
        speed-up (naive CPU time / unlearning CPU time), consistency with naive, the noise floor,
        accuracies, whether the stop rule fired and whether the guardrail fell back.
    """
    if num_deleted < 1 or num_deleted >= data.train.images.shape[0]:
        raise ConfigError(f"num_deleted must be in 1..n_train-1; got {num_deleted}.")
    chain_config = replace(config, num_blocks=num_blocks)
    chain = train_chain(config=chain_config, data=data)
    ids = np.sort(np.random.default_rng(seed).choice(data.train.images.shape[0], size=num_deleted, replace=False))

    cpu0 = time.process_time()
    naive = train_chain(config=chain_config, data=data, plan=chain.plan, excluded_ids=frozenset(int(i) for i in ids))
    naive_cpu = time.process_time() - cpu0

    cpu0 = time.process_time()
    result = unlearn_deepobliviate(chain, ids=ids, data=data, options=DeepObliviateOptions(epsilon=epsilon))
    unlearn_cpu = time.process_time() - cpu0

    x, y = data.x_heldout, data.y_heldout
    naive_pred = predict(naive.model(), x=x)
    unlearned_pred = predict(result.chain.model(), x=x)
    original_pred = predict(chain.model(), x=x)
    record = result.record
    return {
        "num_blocks": num_blocks,
        "epsilon": epsilon,
        "num_deleted": num_deleted,
        "first_affected_block": record.first_affected_block,
        "speedup": naive_cpu / unlearn_cpu if unlearn_cpu > 0 else float("inf"),
        "consistency": consistency(a=unlearned_pred, b=naive_pred),
        "noise_floor_consistency": consistency(a=original_pred, b=naive_pred),
        "accuracy": _accuracy(unlearned_pred, y),
        "naive_accuracy": _accuracy(naive_pred, y),
        "chance_accuracy": 1.0 / chain_config.num_classes,
        "blocks_retrained": len(record.blocks_retrained),
        "stopped_early": record.stop_block is not None,
        "stop_reason": record.stop_reason,
        "guardrail_fell_back": bool(record.guardrail is not None and not record.guardrail.passed_first),
        "naive_cpu_seconds": naive_cpu,
        "unlearn_cpu_seconds": unlearn_cpu,
    }


def reduction_trial(
    *,
    k: int,
    bins: int,
    pool_images: np.ndarray,
    levels: int,
    backend: Backend,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    train: TrainConfig,
    num_starts: int | None,
    seed: int,
    num_classes: int = 10,
    aggregate: Aggregate | str = Aggregate.SUM,
) -> dict[str, Any]:
    """One (k, bins) point: substitute accuracy and agreement after k DRMI-chosen label queries.

    Args:
        k: queries bought (the DRMI subset size).
        bins: MI resolution of the reduction (SPEC section 1).
        pool_images: the attacker's unlabeled pool.
        levels: gray levels of the images.
        backend: the target model; the attacker sees it through a budget of exactly k labels.
        test_images: held-out images for accuracy and agreement.
        test_labels: their true labels.
        train: substitute training.
        num_starts: seeded DRMI restarts (``None``: one per pool image).
        seed: seeds the starts and the substitute.
        num_classes: classes of the task.
        aggregate: greedy initialisation's fold (SPEC section 2; ``reduce --aggregate``).
    """
    rng = np.random.default_rng(seed)
    matrix = mi_matrix(pool_images, levels=levels, bins=bins)
    reduction = drmi_reduce(matrix, k=k, num_starts=num_starts, rng=rng, aggregate=aggregate)
    attacker = Target(backend, budget=k)
    bought = pool_images[reduction.subset]
    labels = attacker.query(bought)
    substitute = train_classifier(
        images=bought, labels=labels, config=train, seed=seed, num_classes=num_classes, levels=levels
    )
    predicted = predict_labels(substitute, images=test_images, levels=levels)
    target_labels = Target(backend, budget=None).query(test_images)
    return {
        "k": k,
        "bins": bins,
        "queries": attacker.used,
        "h": reduction.h,
        "accuracy": accuracy(predicted=predicted, truth=test_labels),
        "agreement": agreement(substitute_labels=predicted, target_labels=target_labels),
        "mean_entropy": float(image_entropy(bought, levels=levels).mean()),
        "class_histogram": np.bincount(labels, minlength=num_classes).tolist(),
    }


def pareto_front(points: Sequence[dict[str, Any]], *, maximize: Sequence[str]) -> list[int]:
    """Indices of the points that no other point matches or beats on every objective and beats on one."""
    values = np.array([[float(p[m]) for m in maximize] for p in points], dtype=np.float64)
    front = []
    for i, row in enumerate(values):
        dominated = np.any(np.all(values >= row, axis=1) & np.any(values > row, axis=1))
        if not dominated:
            front.append(i)
    return front


def _accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    return float((predicted == truth).float().mean())
