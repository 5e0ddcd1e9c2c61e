"""SISA training and unlearning (Bourtoule et al. 2021), the sharding baseline of SPEC section 5.

The training set is split into S class-stratified shards, each shard into R slices. Shard k's
model is trained slice by slice: at slice r it trains ``epochs_per_slice`` epochs on the union of
slices 1..r (SISA's incremental training) and a checkpoint is kept after every slice. Prediction is
a majority vote of the S shard models (ties go to the class with the larger summed softmax).

Unlearning retrains only the affected shards, each from the checkpoint before its first affected
slice. As for the block chain, every random draw of (shard k, slice r) depends only on
``(seed, k, r)`` and excluded ids are dropped after the batch order is drawn, so unlearning equals
SISA retraining from scratch without the ids bit for bit.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from obliviate.checks import is_whole
from obliviate.data import stratified_split
from obliviate.errors import ConfigError, named_choice
from obliviate.unlearning.chain import BlockData
from obliviate.unlearning.config import BlockTrainingConfig, ScheduleName, model_from_state, new_model, schedule_rate
from obliviate.unlearning.plan import check_numpy_seed, check_sample_ids
from obliviate.unlearning.records import DeletionError, UnlearningRecord
from obliviate.unlearning.trainer import (
    block_seed,
    check_data_fits,
    deterministic_torch,
    keep_mask,
    new_optimizer,
    snapshot_state,
    train_block,
)

_SISA_STREAM = 0x515A


@dataclass(frozen=True)
class SisaConfig:
    """S shards × R slices on top of a chain config's model, optimizer, schedule and seed.

    Attributes:
        base: model, optimizer, learning rate, batch size, seed and threads (its ``num_blocks``,
            ``local_epochs`` and ``accuracy_every`` are not used; the schedule runs over slices).
        num_shards: S.
        num_slices: R.
        epochs_per_slice: epochs over the cumulative data at every slice.
        schedule: learning-rate schedule over the R slices (constant by default: a decaying
            schedule over only a few slices reaches its floor while the shard is still undertrained;
            cosine over R = 4 left LeNet-5 shards near chance on MNIST 5k).
    """

    base: BlockTrainingConfig
    num_shards: int = 5
    num_slices: int = 4
    epochs_per_slice: int = 1
    schedule: ScheduleName = ScheduleName.CONSTANT

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", named_choice(ScheduleName, value=self.schedule, what="schedule"))
        for name in ("num_shards", "num_slices", "epochs_per_slice"):
            value = getattr(self, name)
            if not is_whole(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}.")
            object.__setattr__(self, name, int(value))  # numpy integers become plain ints (JSON)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["base"] = self.base.to_dict()
        out["schedule"] = self.schedule.value
        return out


@dataclass(frozen=True, eq=False)
class SisaEnsemble:
    """Shard plans and per-slice states of every shard; ``states[k][r]`` is after slice r (0 = init)."""

    config: SisaConfig
    slices: tuple[tuple[np.ndarray, ...], ...]  # slices[k][r-1]: sample ids of shard k, slice r
    states: tuple[tuple[tuple[dict[str, torch.Tensor], dict[str, Any]], ...], ...]
    data_fingerprint: str
    deleted_ids: frozenset[int] = frozenset()

    def shard_and_slice(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard 0-based, slice 1-based) of each sample id."""
        lookup = {}
        for k, shard in enumerate(self.slices):
            for r, ids_r in enumerate(shard, start=1):
                for i in ids_r.tolist():
                    lookup[i] = (k, r)
        pairs = np.asarray([lookup[int(i)] for i in ids], dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]

    def models(self) -> list[torch.nn.Module]:
        return [model_from_state(config=self.config.base, state=shard[-1][0]) for shard in self.states]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
        """Majority vote of the shard models (ties: larger summed softmax)."""
        votes = torch.zeros(len(x), self.config.base.num_classes, dtype=torch.float64)
        prob_sum = torch.zeros_like(votes)
        for model in self.models():
            model.eval()
            logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double()
            votes[torch.arange(len(x)), logits.argmax(1)] += 1
            prob_sum += logits.softmax(1)
        # Softmax sums are below S, so scaling them by 1/(S+1) only breaks ties between equal votes.
        return (votes + prob_sum / (len(self.states) + 1)).argmax(1)


def make_sisa_slices(
    labels: np.ndarray, *, num_shards: int, num_slices: int, seed: int
) -> tuple[tuple[np.ndarray, ...], ...]:
    """Split sample ids 0..n-1 into S shards of R class-stratified slices each (SISA; SPEC section 5).

    Slice sizes differ by at most one; the split depends only on ``labels`` and ``seed``.

    Args:
        labels: ``(n,)`` integer labels of the training set.
        num_shards: S >= 1.
        num_slices: R >= 1; S * R must be at most n.
        seed: the base config's seed, an integer >= 0.

    Returns:
        ``slices[k][r-1]``: the sorted sample ids of shard k (0-based), slice r (1-based).

    Raises:
        ConfigError: S or R not a positive integer, S * R > n, or a bad seed.
    """
    check_numpy_seed(seed)
    for name, value in (("num_shards", num_shards), ("num_slices", num_slices)):
        if not is_whole(value) or value < 1:
            raise ConfigError(f"{name} must be a positive integer; got {value!r}.")
    n = int(np.asarray(labels).shape[0])
    parts = num_shards * num_slices
    if parts > n:
        raise ConfigError(f"num_shards * num_slices must be at most n={n}; got {parts}.")
    base, extra = divmod(n, parts)
    sizes = tuple(base + (1 if i < extra else 0) for i in range(parts))
    split = stratified_split(labels, sizes=sizes, rng=np.random.default_rng((seed, _SISA_STREAM)))
    return tuple(tuple(np.sort(split[k * num_slices + r]) for r in range(num_slices)) for k in range(num_shards))


def _train_shard(
    config: SisaConfig,
    data: BlockData,
    *,
    shard: int,
    slices: tuple[np.ndarray, ...],
    start_slice: int,
    start_state: tuple[dict[str, torch.Tensor], dict[str, Any]],
    keep: torch.Tensor,
) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """States after slices start_slice+1 .. R, training on the cumulative slices each time."""
    base = config.base
    out = []
    with deterministic_torch(base.num_threads):
        model = model_from_state(config=base, state=start_state[0])
        optimizer = new_optimizer(model, config=base)
        optimizer.load_state_dict(copy.deepcopy(start_state[1]))
        for r in range(start_slice + 1, config.num_slices + 1):
            train_block(
                model,
                optimizer=optimizer,
                x=data.x_train,
                y=data.y_train,
                block_ids=np.concatenate(slices[:r]),
                keep=keep,
                learning_rate=schedule_rate(
                    schedule=config.schedule,
                    base=base.learning_rate,
                    position=r - 1,
                    total=config.num_slices,
                    gamma=base.gamma,
                    step_every=base.step_every_blocks,
                    min_fraction=base.min_lr_fraction,
                ),
                epochs=config.epochs_per_slice,
                batch_size=base.batch_size,
                seed=block_seed(base.seed, _SISA_STREAM, shard, r),
            )
            out.append((snapshot_state(model), copy.deepcopy(optimizer.state_dict())))
    return out


def train_sisa(config: SisaConfig, *, data: BlockData, excluded_ids: Iterable[int] = ()) -> SisaEnsemble:
    """Train all S shard models from scratch (without ``excluded_ids``).

    Raises:
        ConfigError: an excluded id that is not an integer in ``0 .. n-1``.
        ChainMismatchError: data that does not fit ``config.base`` (image size, levels, labels).
    """
    check_data_fits(config.base, data=data)
    slices = make_sisa_slices(
        data.train.labels, num_shards=config.num_shards, num_slices=config.num_slices, seed=config.base.seed
    )
    excluded = frozenset(check_sample_ids(list(excluded_ids), num_samples=data.num_train).tolist())
    keep = keep_mask(data.num_train, excluded_ids=excluded)
    states = []
    for k in range(config.num_shards):
        init_model = new_model(config.base)
        init = (snapshot_state(init_model), copy.deepcopy(new_optimizer(init_model, config=config.base).state_dict()))
        states.append(
            (init, *_train_shard(config, data, shard=k, slices=slices[k], start_slice=0, start_state=init, keep=keep))
        )
    return SisaEnsemble(config, slices, tuple(states), data.fingerprint, excluded)


def unlearn_sisa(
    ensemble: SisaEnsemble, *, ids: Iterable[int], data: BlockData
) -> tuple[SisaEnsemble, UnlearningRecord]:
    """Retrain every affected shard from its first affected slice without ``ids``.

    Raises:
        DeletionError: empty, duplicate, unknown or already deleted ids (nothing changes).
    """
    began, began_cpu = time.perf_counter(), time.process_time()
    values = _validate(ensemble, ids)
    if data.fingerprint != ensemble.data_fingerprint:
        raise ConfigError(
            f"data fingerprint {data.fingerprint} differs from the ensemble's {ensemble.data_fingerprint}; "
            "pass the data it was trained on."
        )
    shards, slices = ensemble.shard_and_slice(values)
    excluded = frozenset(ensemble.deleted_ids | set(values.tolist()))
    keep = keep_mask(data.num_train, excluded_ids=excluded)
    states = list(ensemble.states)
    retrained = []
    for k in sorted(set(shards.tolist())):
        first = int(slices[shards == k].min())
        tail = _train_shard(
            ensemble.config,
            data,
            shard=k,
            slices=ensemble.slices[k],
            start_slice=first - 1,
            start_state=states[k][first - 1],
            keep=keep,
        )
        states[k] = tuple(states[k][:first]) + tuple(tail)
        retrained.append(f"shard {k} slices {first}..{ensemble.config.num_slices}")
    new = replace(ensemble, states=tuple(states), deleted_ids=excluded)
    elapsed = time.perf_counter() - began
    record = UnlearningRecord(
        policy="sisa",
        deleted_ids=tuple(values.tolist()),
        first_affected_block=int(slices.min()),
        last_affected_block=int(slices.max()),
        blocks_retrained=tuple(sorted(set(shards.tolist()))),
        stop_reason="; ".join(retrained),
        retrain_seconds=elapsed,
        overhead_seconds=0.0,
        wall_time_seconds=elapsed,
        cpu_seconds=time.process_time() - began_cpu,
        options=ensemble.config.to_dict(),
    )
    return new, record


def _validate(ensemble: SisaEnsemble, ids: Iterable[int]) -> np.ndarray:
    raw = list(ids)
    if not raw:
        raise DeletionError("rule: a deletion must name at least one sample id; got an empty set. Nothing changed.")
    n = sum(len(s) for shard in ensemble.slices for s in shard)
    values = check_sample_ids(raw, num_samples=n, error=DeletionError, tail="Nothing changed.")
    unique, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        raise DeletionError(
            f"rule: each sample id may appear once per request; duplicated: {unique[counts > 1][:10].tolist()}."
        )
    already = sorted(set(unique.tolist()) & ensemble.deleted_ids)
    if already:
        raise DeletionError(f"rule: a sample can be deleted once; already deleted: {already[:10]}.")
    return unique
