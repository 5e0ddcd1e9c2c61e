"""Checkpoints and chains: the stored states M_0..M_B of a block-sequenced run (SPEC section 4).

A :class:`Checkpoint` holds the state after one block (parameters and buffers, optimizer state,
schedule position, held-out accuracy, identity of the config and data); a :class:`Chain` is the
ordered list of them for one config and one :class:`BlockData`. Checkpoints reach storage through a
caller-supplied :data:`CheckpointSink`, so nothing here writes files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from obliviate.data import ImageDataset
from obliviate.errors import ConfigError, ObliviateError
from obliviate.models import images_to_tensor
from obliviate.unlearning.config import BlockTrainingConfig, model_from_state
from obliviate.unlearning.plan import BlockPlan

CHECKPOINT_FORMAT = "obliviate.checkpoint/1"


class ChainMismatchError(ObliviateError, ValueError):
    """A checkpoint, data set or chain does not belong to the chain it is used with."""


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
        return model_from_state(config=self.config, state=checkpoint.model_state)

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


def state_difference_l1(
    *,
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


def state_l1(*, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
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
