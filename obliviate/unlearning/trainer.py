"""Block-sequenced training: DeepObliviate's training mode (SPEC section 4).

The training set is split once into B blocks (stratified by class, seeded, fixed order). Starting
from the initial model M_0, block i trains M_i = Train(M_{i-1}, B_i) for E local epochs, and a
:class:`Checkpoint` (parameters and buffers, optimizer state, schedule position, held-out
accuracy, identity of the config and data) is handed to a caller-supplied sink after every block.

Reproducibility contract (SPEC section 4, tested): the batch order and every other random draw of
block i depend only on ``(seed, i)``; the learning rate of block i depends only on the config and
i. Samples excluded from training (deleted ones) are dropped *after* block i's batch order is drawn
over the whole block, so a chain retrained with nothing excluded reproduces the stored chain bit
for bit, and retraining from M_{d-1} without X equals retraining from scratch without X.

Determinism on CPU: training runs with ``torch.use_deterministic_algorithms(True)`` and a fixed
number of intra-op threads (``BlockTrainingConfig.num_threads``, default 1), both restored
afterwards. Bit-identity is promised between runs with equal thread counts on the same machine
and torch build; a different thread count may change float summation order. One thread is also
the fastest setting on a shared 2-core machine (two threads measured 30x slower under contention).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from obliviate.data import ImageDataset, stratified_split
from obliviate.errors import ConfigError, ObliviateError
from obliviate.models import build_model, images_to_tensor

CHECKPOINT_FORMAT = "obliviate.checkpoint/1"
_PLAN_STREAM = 0xB10C  # separates the block-split stream from per-block training streams


class ChainMismatchError(ObliviateError, ValueError):
    """A checkpoint, data set or chain does not belong to the chain it is used with."""


class OptimizerName(str, Enum):
    """Optimizer carried across the whole chain."""

    SGD = "sgd"
    ADAM = "adam"


class ScheduleName(str, Enum):
    """Learning-rate schedule across blocks (the rate is constant inside a block)."""

    CONSTANT = "constant"
    STEP = "step"
    COSINE = "cosine"
    EXPONENTIAL = "exponential"


@dataclass(frozen=True)
class BlockTrainingConfig:
    """Everything that determines a chain of block checkpoints (SPEC section 4).

    Attributes:
        model: ``lenet5``, ``c3f2`` or ``resnet18`` (see :func:`obliviate.models.build_model`).
        num_classes: output classes.
        in_channels: input channels (1 for gray images).
        image_size: side of the square input images.
        levels: gray levels of the data (256 for 8-bit, 17 for scikit-learn digits).
        num_blocks: B, the number of blocks.
        local_epochs: E, epochs over each block before moving to the next.
        batch_size: mini-batch size inside a block.
        optimizer: ``sgd`` or ``adam``.
        learning_rate: base learning rate (block 1's rate).
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty.
        schedule: ``constant``, ``step``, ``cosine`` or ``exponential`` across blocks.
        step_every_blocks: for ``step``: the rate is multiplied by ``gamma`` every this many blocks.
        gamma: factor of ``step`` and per-block factor of ``exponential``.
        min_lr_fraction: for ``cosine``: the floor, as a fraction of ``learning_rate``.
        seed: initialisation seed, block-split seed and per-block randomness seed.
        num_threads: torch intra-op threads while training (bit-identity needs equal counts).
        accuracy_every: record held-out accuracy every this many blocks (and always at the last
            block); other checkpoints carry ``None``. Evaluating is not free on CPU, and only the
            last block's accuracy is used by the guardrail.
    """

    model: str = "lenet5"
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28
    levels: int = 256
    num_blocks: int = 50
    local_epochs: int = 2
    batch_size: int = 32
    optimizer: OptimizerName = OptimizerName.SGD
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: ScheduleName = ScheduleName.CONSTANT
    step_every_blocks: int = 10
    gamma: float = 0.5
    min_lr_fraction: float = 0.0
    seed: int = 0
    num_threads: int = 1
    accuracy_every: int = 1

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "optimizer", OptimizerName(self.optimizer))
            object.__setattr__(self, "schedule", ScheduleName(self.schedule))
        except ValueError as err:
            raise ConfigError(
                f"{err}: optimizer must be one of {[o.value for o in OptimizerName]} and schedule one "
                f"of {[s.value for s in ScheduleName]}."
            ) from None
        positive_ints = {
            "num_blocks": self.num_blocks,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "step_every_blocks": self.step_every_blocks,
            "num_threads": self.num_threads,
            "accuracy_every": self.accuracy_every,
            "num_classes": self.num_classes,
        }
        for name, value in positive_ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0; got {self.learning_rate!r}.")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1] (a decay factor); got {self.gamma!r}.")
        if not 0 <= self.min_lr_fraction <= 1:
            raise ConfigError(f"min_lr_fraction must be in [0, 1]; got {self.min_lr_fraction!r}.")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1); got {self.momentum!r}.")

    def learning_rate_at(self, block: int) -> float:
        """Learning rate used for block ``block`` (1-based): a pure function of config and block."""
        if not 1 <= block <= self.num_blocks:
            raise ConfigError(f"block must be in 1..{self.num_blocks}; got {block}.")
        return schedule_rate(
            schedule=self.schedule,
            base=self.learning_rate,
            position=block - 1,
            total=self.num_blocks,
            gamma=self.gamma,
            step_every=self.step_every_blocks,
            min_fraction=self.min_lr_fraction,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (enums as their values)."""
        out = asdict(self)
        out["optimizer"] = self.optimizer.value
        out["schedule"] = self.schedule.value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BlockTrainingConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown BlockTrainingConfig fields {sorted(unknown)}.")
        return cls(**values)

    @property
    def fingerprint(self) -> str:
        """SHA-256 (16 hex chars) of the canonical JSON of every field: the config's identity."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def schedule_rate(
    *,
    schedule: ScheduleName | str,
    base: float,
    position: int,
    total: int,
    gamma: float,
    step_every: int,
    min_fraction: float,
) -> float:
    """Learning rate at 0-based ``position`` of ``total`` steps of a schedule.

    ``constant``: base. ``step``: base * gamma ** (position // step_every). ``exponential``:
    base * gamma ** position. ``cosine``: from base down to base * min_fraction along half a cosine.
    """
    schedule = ScheduleName(schedule)
    if schedule is ScheduleName.CONSTANT:
        return float(base)
    if schedule is ScheduleName.STEP:
        return float(base * gamma ** (position // step_every))
    if schedule is ScheduleName.EXPONENTIAL:
        return float(base * gamma**position)
    floor = base * min_fraction
    progress = position / max(total - 1, 1)
    return float(floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """The fixed assignment of training-sample ids to blocks (block 1 first).

    Sample ids are global indices into the training set. This mapping is what a storage layer
    must keep next to the checkpoints to resolve a deletion request to blocks.
    """

    blocks: tuple[np.ndarray, ...]
    num_samples: int

    def __post_init__(self) -> None:
        every = np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.int64)
        if every.size != np.unique(every).size or (every.size and (every.min() < 0 or every.max() >= self.num_samples)):
            raise ConfigError("a BlockPlan must assign distinct sample ids in 0..num_samples-1 to its blocks.")
        block_of = np.full(self.num_samples, 0, dtype=np.int64)
        for number, ids in enumerate(self.blocks, start=1):
            block_of[ids] = number
        object.__setattr__(self, "_block_of", block_of)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_ids(self, block: int) -> np.ndarray:
        """Sample ids of block ``block`` (1-based), in their stored order."""
        return self.blocks[block - 1]

    def block_of(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """The 1-based block of each sample id (0 for ids held in no block)."""
        return self._block_of[np.asarray(ids, dtype=np.int64)]  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able mapping block -> sample ids."""
        return {"num_samples": self.num_samples, "blocks": [b.tolist() for b in self.blocks]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BlockPlan:
        return cls(
            blocks=tuple(np.asarray(b, dtype=np.int64) for b in values["blocks"]),
            num_samples=int(values["num_samples"]),
        )

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(str(self.num_samples).encode())
        for ids in self.blocks:
            digest.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()[:16]


def make_block_plan(labels: np.ndarray, *, num_blocks: int, seed: int) -> BlockPlan:
    """Split sample ids 0..n-1 into ``num_blocks`` class-stratified blocks (SPEC section 4).

    Block sizes differ by at most one; the split depends only on ``labels`` and ``seed``.
    """
    labels = np.asarray(labels)
    n = int(labels.shape[0])
    if not 1 <= num_blocks <= n:
        raise ConfigError(f"num_blocks must be in 1..n={n} (one sample per block at least); got {num_blocks}.")
    base, extra = divmod(n, num_blocks)
    sizes = tuple(base + (1 if i < extra else 0) for i in range(num_blocks))
    parts = stratified_split(labels, sizes=sizes, rng=np.random.default_rng((seed, _PLAN_STREAM)))
    return BlockPlan(blocks=tuple(np.sort(p) for p in parts), num_samples=n)


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """The state after block ``block_index`` (0 is the initial model M_0).

    Attributes:
        block_index: i, the number of blocks trained into this state.
        model_state: parameters and buffers (``state_dict``), detached CPU tensors.
        optimizer_state: the optimizer's ``state_dict`` after block i.
        schedule_position: blocks completed on the learning-rate schedule (the next block uses
            ``config.learning_rate_at(schedule_position + 1)``).
        heldout_accuracy: accuracy on the chain's held-out set, or ``None`` where not evaluated.
        config_fingerprint: :attr:`BlockTrainingConfig.fingerprint` of the chain.
        data_fingerprint: :attr:`BlockData.fingerprint` of the chain's data.
        origin: ``initial``, ``trained`` (also retrained) or ``stitched`` (DeepObliviate estimate).
        excluded_count: how many deleted ids the chain excluded when this state was produced.
    """

    block_index: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    schedule_position: int
    heldout_accuracy: float | None
    config_fingerprint: str
    data_fingerprint: str
    origin: str = "trained"
    excluded_count: int = 0

    def to_state(self) -> dict[str, Any]:
        """A dict of tensors plus JSON-able metadata, loadable with ``torch.load(weights_only=True)``.

        Layout: ``{"format", "tensors": {name: tensor}, "meta": {...}}``. Model entries are named
        ``model/<key>``; optimizer tensors ``optimizer/<param id>/<key>``; everything else
        (param groups, non-tensor optimizer state, block index, accuracy, fingerprints) is in
        ``meta`` and survives ``json.dumps``.
        """
        tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in self.model_state.items()}
        optimizer_scalars: dict[str, Any] = {}
        for param_id, entries in self.optimizer_state.get("state", {}).items():
            for key, value in entries.items():
                name = f"optimizer/{param_id}/{key}"
                if isinstance(value, torch.Tensor):
                    tensors[name] = value
                else:
                    optimizer_scalars[name] = value
        meta = {
            "block_index": self.block_index,
            "schedule_position": self.schedule_position,
            "heldout_accuracy": self.heldout_accuracy,
            "config_fingerprint": self.config_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "origin": self.origin,
            "excluded_count": self.excluded_count,
            "model_keys": list(self.model_state),
            "optimizer_param_groups": self.optimizer_state.get("param_groups", []),
            "optimizer_scalars": optimizer_scalars,
        }
        json.dumps(meta)  # fail here, not in the storage layer, if something is not JSON-able
        return {"format": CHECKPOINT_FORMAT, "tensors": tensors, "meta": meta}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Checkpoint:
        """Inverse of :meth:`to_state`."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ChainMismatchError(
                f"checkpoint format must be {CHECKPOINT_FORMAT!r}; got {state.get('format')!r}. "
                "Write checkpoints with Checkpoint.to_state()."
            )
        meta, tensors = state["meta"], state["tensors"]
        model_state = {k: tensors[f"model/{k}"] for k in meta["model_keys"]}
        opt_state: dict[int, dict[str, Any]] = {}
        items = [(k, v) for k, v in tensors.items() if k.startswith("optimizer/")]
        items += list(meta["optimizer_scalars"].items())
        for name, value in items:
            _, param_id, key = name.split("/", 2)
            opt_state.setdefault(int(param_id), {})[key] = value
        return cls(
            block_index=int(meta["block_index"]),
            model_state=model_state,
            optimizer_state={"state": dict(sorted(opt_state.items())), "param_groups": meta["optimizer_param_groups"]},
            schedule_position=int(meta["schedule_position"]),
            heldout_accuracy=meta["heldout_accuracy"],
            config_fingerprint=meta["config_fingerprint"],
            data_fingerprint=meta["data_fingerprint"],
            origin=meta["origin"],
            excluded_count=int(meta["excluded_count"]),
        )


CheckpointSink = Callable[[Checkpoint], None]


class InMemoryChainStore:
    """A checkpoint sink that keeps the newest checkpoint of every block index in memory.

    Pass it as ``sink=`` to :func:`train_chain` or an unlearning policy; the storage layer offers
    the same call signature for object storage.
    """

    def __init__(self) -> None:
        self._checkpoints: dict[int, Checkpoint] = {}

    def __call__(self, checkpoint: Checkpoint) -> None:
        self._checkpoints[checkpoint.block_index] = checkpoint

    def __len__(self) -> int:
        return len(self._checkpoints)

    def get(self, block_index: int) -> Checkpoint:
        if block_index not in self._checkpoints:
            raise KeyError(f"no checkpoint stored for block {block_index}; stored: {sorted(self._checkpoints)}.")
        return self._checkpoints[block_index]

    def block_indices(self) -> list[int]:
        return sorted(self._checkpoints)


@dataclass(frozen=True, eq=False)
class BlockData:
    """Training and held-out data as tensors, prepared once per chain.

    Attributes:
        train: the training set; sample ids are its row indices.
        heldout: the held-out set whose accuracy every checkpoint records (and the guardrail uses).
    """

    train: ImageDataset
    heldout: ImageDataset
    x_train: torch.Tensor = field(init=False, repr=False)
    y_train: torch.Tensor = field(init=False, repr=False)
    x_heldout: torch.Tensor = field(init=False, repr=False)
    y_heldout: torch.Tensor = field(init=False, repr=False)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        if self.train.levels != self.heldout.levels or self.train.image_shape != self.heldout.image_shape:
            raise ConfigError(
                f"train and held-out data must share levels and image shape; got {self.train.levels}/"
                f"{self.train.image_shape} and {self.heldout.levels}/{self.heldout.image_shape}."
            )
        object.__setattr__(self, "x_train", images_to_tensor(self.train.images, levels=self.train.levels))
        object.__setattr__(self, "y_train", torch.from_numpy(self.train.labels.copy()))
        object.__setattr__(self, "x_heldout", images_to_tensor(self.heldout.images, levels=self.heldout.levels))
        object.__setattr__(self, "y_heldout", torch.from_numpy(self.heldout.labels.copy()))
        digest = hashlib.sha256(f"{self.train.fingerprint}|{self.heldout.fingerprint}".encode())
        object.__setattr__(self, "fingerprint", digest.hexdigest()[:16])

    @property
    def num_train(self) -> int:
        return len(self.train)


@dataclass(frozen=True, eq=False)
class Chain:
    """The current chain: config, block plan, checkpoints M_0..M_B and the ids deleted so far.

    Immutable: unlearning returns a new :class:`Chain` that shares unchanged checkpoints.

    Raises:
        ChainMismatchError: a checkpoint from another config or data set, or the wrong count.
    """

    config: BlockTrainingConfig
    plan: BlockPlan
    data_fingerprint: str
    checkpoints: tuple[Checkpoint, ...]
    deleted_ids: frozenset[int] = frozenset()
    generation: int = 0

    def __post_init__(self) -> None:
        if self.plan.num_blocks != self.config.num_blocks:
            raise ChainMismatchError(
                f"block plan has {self.plan.num_blocks} blocks but config.num_blocks is {self.config.num_blocks}."
            )
        if len(self.checkpoints) != self.config.num_blocks + 1:
            raise ChainMismatchError(
                f"a chain needs checkpoints M_0..M_B ({self.config.num_blocks + 1}); got {len(self.checkpoints)}. "
                "Resume training with train_chain(resume_from=...) to complete it."
            )
        for position, checkpoint in enumerate(self.checkpoints):
            check_checkpoint(checkpoint, config=self.config, data_fingerprint=self.data_fingerprint)
            if checkpoint.block_index != position:
                raise ChainMismatchError(
                    f"checkpoint at position {position} holds block {checkpoint.block_index}; "
                    "checkpoints must be ordered M_0..M_B."
                )

    @property
    def final(self) -> Checkpoint:
        return self.checkpoints[-1]

    def model(self, block_index: int | None = None) -> nn.Module:
        """A fresh module holding M_i (the final model M_B by default)."""
        checkpoint = self.final if block_index is None else self.checkpoints[block_index]
        return model_from_state(self.config, checkpoint.model_state)

    def manifest(self) -> dict[str, Any]:
        """JSON-able description (no tensors): what the storage layer keeps next to checkpoints."""
        return {
            "config": self.config.to_dict(),
            "config_fingerprint": self.config.fingerprint,
            "plan": self.plan.to_dict(),
            "data_fingerprint": self.data_fingerprint,
            "deleted_ids": sorted(self.deleted_ids),
            "generation": self.generation,
            "checkpoints": [
                {"block_index": c.block_index, "origin": c.origin, "heldout_accuracy": c.heldout_accuracy}
                for c in self.checkpoints
            ],
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], *, load_checkpoint: Callable[[int], Checkpoint]) -> Chain:
        """Rebuild a chain from its manifest and a loader of stored checkpoints (by block index)."""
        config = BlockTrainingConfig.from_dict(manifest["config"])
        if config.fingerprint != manifest["config_fingerprint"]:
            raise ChainMismatchError(
                f"manifest config hashes to {config.fingerprint}, not the recorded {manifest['config_fingerprint']}."
            )
        return cls(
            config=config,
            plan=BlockPlan.from_dict(manifest["plan"]),
            data_fingerprint=manifest["data_fingerprint"],
            checkpoints=tuple(load_checkpoint(i) for i in range(config.num_blocks + 1)),
            deleted_ids=frozenset(int(i) for i in manifest["deleted_ids"]),
            generation=int(manifest["generation"]),
        )


def check_checkpoint(checkpoint: Checkpoint, *, config: BlockTrainingConfig, data_fingerprint: str) -> None:
    """Raise :class:`ChainMismatchError` unless ``checkpoint`` belongs to this config and data."""
    if checkpoint.config_fingerprint != config.fingerprint:
        raise ChainMismatchError(
            f"checkpoint of block {checkpoint.block_index} comes from config {checkpoint.config_fingerprint}, "
            f"but this chain's config is {config.fingerprint}: checkpoints of another model or config "
            "cannot be mixed into a chain. Use the chain that produced it, or retrain."
        )
    if checkpoint.data_fingerprint != data_fingerprint:
        raise ChainMismatchError(
            f"checkpoint of block {checkpoint.block_index} was trained on data {checkpoint.data_fingerprint}, "
            f"but this chain's data is {data_fingerprint}. Load the data set the chain was trained on."
        )


@contextlib.contextmanager
def deterministic_torch(num_threads: int) -> Iterator[None]:
    """Deterministic kernels and a fixed intra-op thread count inside the block; restored after."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn)
        torch.set_num_threads(previous_threads)


def block_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed that depends only on ``seed`` and the stream ids (e.g. the block index)."""
    return int(np.random.default_rng((seed, *stream)).integers(2**63 - 1))


def new_model(config: BlockTrainingConfig) -> nn.Module:
    return build_model(
        config.model,
        num_classes=config.num_classes,
        in_channels=config.in_channels,
        image_size=config.image_size,
        seed=config.seed,
    )


def model_from_state(config: BlockTrainingConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A module of the config's architecture holding ``state`` (copied in)."""
    model = new_model(config)
    model.load_state_dict(state)
    return model


def new_optimizer(model: nn.Module, config: BlockTrainingConfig) -> torch.optim.Optimizer:
    if config.optimizer is OptimizerName.SGD:
        return torch.optim.SGD(
            model.parameters(), lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def snapshot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes of ``x`` in eval mode (the module's mode is restored)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def heldout_accuracy(model: nn.Module, data: BlockData) -> float:
    return float((predict(model, data.x_heldout) == data.y_heldout).double().mean())


def train_block(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    block_ids: np.ndarray,
    keep: torch.Tensor,
    learning_rate: float,
    epochs: int,
    batch_size: int,
    seed: int,
) -> int:
    """E local epochs of mini-batch training on one block; returns the number of steps taken.

    The batch order of every epoch is a permutation of the *whole* block drawn from a generator
    seeded by ``seed``; ids with ``keep[id] == False`` are dropped afterwards, so exclusions never
    shift the randomness of other samples or blocks.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.from_numpy(np.asarray(block_ids, dtype=np.int64))
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    model.train()
    steps = 0
    with torch.random.fork_rng(devices=[]):
        # Layers that draw from the global generator (dropout) see a stream fixed by the seed too.
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = ids[torch.randperm(len(ids), generator=generator)]
            order = order[keep[order]]
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
                steps += 1
    return steps


def keep_mask(num_samples: int, excluded_ids: Sequence[int] | frozenset[int] | np.ndarray) -> torch.Tensor:
    keep = torch.ones(num_samples, dtype=torch.bool)
    excluded = np.fromiter((int(i) for i in excluded_ids), dtype=np.int64)
    if excluded.size:
        keep[torch.from_numpy(excluded)] = False
    return keep


def initial_checkpoint(config: BlockTrainingConfig, data: BlockData) -> Checkpoint:
    """M_0: the seeded initial model and a fresh optimizer state."""
    model = new_model(config)
    return Checkpoint(
        block_index=0,
        model_state=snapshot_state(model),
        optimizer_state=copy.deepcopy(new_optimizer(model, config).state_dict()),
        schedule_position=0,
        heldout_accuracy=None,
        config_fingerprint=config.fingerprint,
        data_fingerprint=data.fingerprint,
        origin="initial",
    )


@dataclass
class BlockTiming:
    """Time spent producing one checkpoint (training plus held-out evaluation).

    ``cpu_seconds`` is this process's CPU time (``time.process_time``); with one training thread it
    measures the work itself and is robust to other processes competing for a shared machine.
    """

    block_index: int
    seconds: float
    cpu_seconds: float
    steps: int


class BlockTrainer:
    """Trains blocks of one chain config on one data set, checkpoint by checkpoint.

    A thin stateful wrapper: it resumes a model and optimizer from any :class:`Checkpoint` and
    yields the next checkpoints; all randomness comes from ``(config.seed, block)``.
    """

    def __init__(self, *, config: BlockTrainingConfig, data: BlockData, plan: BlockPlan) -> None:
        if plan.num_blocks != config.num_blocks or plan.num_samples != data.num_train:
            raise ChainMismatchError(
                f"block plan ({plan.num_blocks} blocks over {plan.num_samples} samples) does not match config "
                f"num_blocks={config.num_blocks} and {data.num_train} training samples."
            )
        self.config, self.data, self.plan = config, data, plan

    def run(
        self,
        *,
        start: Checkpoint,
        last_block: int,
        excluded_ids: frozenset[int] | Sequence[int],
        timings: list[BlockTiming] | None = None,
    ) -> Iterator[Checkpoint]:
        """Yield checkpoints start.block_index+1 .. last_block, trained without ``excluded_ids``."""
        config = self.config
        check_checkpoint(start, config=config, data_fingerprint=self.data.fingerprint)
        if not start.block_index <= last_block <= config.num_blocks:
            raise ConfigError(f"last_block must be in {start.block_index}..{config.num_blocks}; got {last_block}.")
        keep = keep_mask(self.data.num_train, excluded_ids)
        excluded_count = int((~keep).sum())
        with deterministic_torch(config.num_threads):
            model = model_from_state(config, start.model_state)
            optimizer = new_optimizer(model, config)
            # Deep copy: Optimizer.load_state_dict may alias the stored tensors and update them in place.
            optimizer.load_state_dict(copy.deepcopy(start.optimizer_state))
            for block in range(start.block_index + 1, last_block + 1):
                began, began_cpu = time.perf_counter(), time.process_time()
                steps = train_block(
                    model,
                    optimizer,
                    x=self.data.x_train,
                    y=self.data.y_train,
                    block_ids=self.plan.block_ids(block),
                    keep=keep,
                    learning_rate=config.learning_rate_at(block),
                    epochs=config.local_epochs,
                    batch_size=config.batch_size,
                    seed=block_seed(config.seed, block),
                )
                evaluate = block % config.accuracy_every == 0 or block == config.num_blocks
                accuracy = heldout_accuracy(model, self.data) if evaluate else None
                checkpoint = Checkpoint(
                    block_index=block,
                    model_state=snapshot_state(model),
                    optimizer_state=copy.deepcopy(optimizer.state_dict()),
                    schedule_position=block,
                    heldout_accuracy=accuracy,
                    config_fingerprint=config.fingerprint,
                    data_fingerprint=self.data.fingerprint,
                    origin="trained",
                    excluded_count=excluded_count,
                )
                if timings is not None:
                    timings.append(
                        BlockTiming(block, time.perf_counter() - began, time.process_time() - began_cpu, steps)
                    )
                yield checkpoint


def train_chain(
    *,
    config: BlockTrainingConfig,
    data: BlockData,
    plan: BlockPlan | None = None,
    excluded_ids: frozenset[int] | Sequence[int] = frozenset(),
    sink: CheckpointSink | None = None,
    resume_from: Sequence[Checkpoint] = (),
    timings: list[BlockTiming] | None = None,
) -> Chain:
    """Train (or finish) a chain M_0..M_B and return it; every new checkpoint goes to ``sink``.

    Args:
        config: the chain's options.
        data: training and held-out data.
        plan: the block plan; by default :func:`make_block_plan` on the training labels.
        excluded_ids: training-sample ids never trained on (naive retraining without X uses this).
        sink: called with every new checkpoint, M_0 included, in block order.
        resume_from: stored checkpoints M_0..M_k of an interrupted chain (same config and data);
            training resumes after M_k and the result equals an uninterrupted run bit for bit.
        timings: if given, receives one :class:`BlockTiming` per trained block.

    Raises:
        ChainMismatchError: resumed checkpoints from another config or data, or out of order.
    """
    plan = plan or make_block_plan(data.train.labels, num_blocks=config.num_blocks, seed=config.seed)
    excluded = frozenset(int(i) for i in excluded_ids)
    trainer = BlockTrainer(config=config, data=data, plan=plan)
    checkpoints = list(resume_from)
    for position, checkpoint in enumerate(checkpoints):
        check_checkpoint(checkpoint, config=config, data_fingerprint=data.fingerprint)
        if checkpoint.block_index != position:
            raise ChainMismatchError(
                f"resume_from must hold M_0..M_k in order; position {position} holds block {checkpoint.block_index}."
            )
    if not checkpoints:
        checkpoints.append(initial_checkpoint(config, data))
        if sink is not None:
            sink(checkpoints[0])
    for checkpoint in trainer.run(
        start=checkpoints[-1], last_block=config.num_blocks, excluded_ids=excluded, timings=timings
    ):
        checkpoints.append(checkpoint)
        if sink is not None:
            sink(checkpoint)
    return Chain(
        config=config,
        plan=plan,
        data_fingerprint=data.fingerprint,
        checkpoints=tuple(checkpoints),
        deleted_ids=excluded,
    )


def state_difference_l1(
    a_after: dict[str, torch.Tensor],
    a_before: dict[str, torch.Tensor],
    b_after: dict[str, torch.Tensor],
    b_before: dict[str, torch.Tensor],
) -> float:
    """‖(a_after − a_before) − (b_after − b_before)‖_1 over every parameter and buffer (float64 sum)."""
    total = 0.0
    for key, value in a_after.items():
        diff = (value.double() - a_before[key].double()) - (b_after[key].double() - b_before[key].double())
        total += float(diff.abs().sum())
    return total


def state_l1(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖_1 over every parameter and buffer."""
    return float(sum(float((a[k].double() - b[k].double()).abs().sum()) for k in a))


def with_replaced(chain: Chain, *, checkpoints: Sequence[Checkpoint], deleted_ids: frozenset[int]) -> Chain:
    """A new chain whose checkpoints from ``checkpoints[0].block_index`` on are replaced."""
    first = checkpoints[0].block_index if checkpoints else len(chain.checkpoints)
    return replace(
        chain,
        checkpoints=tuple(chain.checkpoints[:first]) + tuple(checkpoints),
        deleted_ids=deleted_ids,
        generation=chain.generation + 1,
    )
