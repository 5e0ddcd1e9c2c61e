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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from obliviate.errors import ConfigError
from obliviate.unlearning.chain import (
    BlockData,
    Chain,
    ChainMismatchError,
    Checkpoint,
    CheckpointSink,
    check_checkpoint,
)
from obliviate.unlearning.config import BlockTrainingConfig, OptimizerName, model_from_state, new_model
from obliviate.unlearning.plan import BlockPlan, check_sample_ids, make_block_plan


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


def new_optimizer(model: nn.Module, *, config: BlockTrainingConfig) -> torch.optim.Optimizer:
    """The optimizer carried across the whole chain (SPEC section 4): SGD with momentum or Adam.

    Args:
        model: the module whose parameters it updates.
        config: optimizer, base learning rate, momentum and weight decay (the per-block rate is set by
            :func:`train_block`).

    Returns:
        a fresh optimizer with empty state.
    """
    if config.optimizer is OptimizerName.SGD:
        return torch.optim.SGD(
            model.parameters(), lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def snapshot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the module's parameters and buffers, for a checkpoint.

    Args:
        model: the module.

    Returns:
        its ``state_dict`` with every tensor detached and cloned (later training does not change it).
    """
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def predict(model: nn.Module, *, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes of ``x`` in eval mode (the module's mode is restored)."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def heldout_accuracy(model: nn.Module, *, data: BlockData) -> float:
    """Accuracy of ``model`` on the chain's held-out set, as every checkpoint records it (SPEC section 4).

    Args:
        model: the classifier (evaluated in eval mode; its mode is restored).
        data: the chain's data; its held-out part is used.

    Returns:
        the share of held-out samples classified correctly, in ``[0, 1]``.
    """
    return float((predict(model, x=data.x_heldout) == data.y_heldout).double().mean())


def train_block(
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer,
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


def keep_mask(num_samples: int, *, excluded_ids: Sequence[int] | frozenset[int] | np.ndarray) -> torch.Tensor:
    """Which training samples a chain trains on: everything but the excluded (deleted) ids (SPEC section 4).

    Args:
        num_samples: n, the size of the training set.
        excluded_ids: sample ids never trained on (repeats allowed).

    Returns:
        a ``(n,)`` bool tensor, False at the excluded ids.

    Raises:
        ConfigError: an excluded id that is not an integer in ``0 .. n-1`` (a negative one would wrap to
            the last rows and leave out the wrong sample).
    """
    keep = torch.ones(num_samples, dtype=torch.bool)
    excluded = check_sample_ids(excluded_ids, num_samples=num_samples).ravel()
    if excluded.size:
        keep[torch.from_numpy(excluded)] = False
    return keep


def initial_checkpoint(config: BlockTrainingConfig, *, data: BlockData) -> Checkpoint:
    """M_0: the seeded initial model and a fresh optimizer state."""
    model = new_model(config)
    return Checkpoint(
        block_index=0,
        model_state=snapshot_state(model),
        optimizer_state=copy.deepcopy(new_optimizer(model, config=config).state_dict()),
        schedule_position=0,
        heldout_accuracy=None,
        config_fingerprint=config.fingerprint,
        data_fingerprint=data.fingerprint,
        origin="initial",
    )


def warm_up(*, config: BlockTrainingConfig, data: BlockData, steps: int = 2) -> float:
    """A few throwaway training steps and one evaluation, so a fresh process pays its one-off costs now.

    The first training step of a process is slow: torch initialises its kernels, autograd and
    the optimizer's code paths on first use (about a second on a loaded 2-core machine). A
    pooled worker calls this once while idle (issue 14), so the first real unlearning it runs
    costs what later ones cost. Nothing here touches the chain's models or any global random
    state (the throwaway model is seeded by ``config.seed``), so results stay bit-identical.

    Returns:
        the seconds it took.
    """
    began = time.perf_counter()
    with deterministic_torch(config.num_threads):
        model = new_model(config)
        optimizer = new_optimizer(model, config=config)
        ids = np.arange(min(data.num_train, config.batch_size * steps), dtype=np.int64)
        train_block(
            model,
            optimizer=optimizer,
            x=data.x_train,
            y=data.y_train,
            block_ids=ids,
            keep=keep_mask(data.num_train, excluded_ids=()),
            learning_rate=config.learning_rate,
            epochs=1,
            batch_size=config.batch_size,
            seed=config.seed,
        )
        heldout_accuracy(model, data=data)
        copy.deepcopy(optimizer.state_dict())
    return time.perf_counter() - began


@dataclass
class BlockTiming:
    """Time spent producing one checkpoint (training plus held-out evaluation).

    ``cpu_seconds`` is this process's CPU time (``time.process_time``); with one training thread it
    measures the work itself and is robust to other processes competing for a shared machine.
    ``evaluation_cpu_seconds`` is the part of it spent on held-out evaluation (0 where the block
    was not evaluated).
    """

    block_index: int
    seconds: float
    cpu_seconds: float
    steps: int
    evaluation_cpu_seconds: float = 0.0


def check_data_fits(config: BlockTrainingConfig, *, data: BlockData) -> None:
    """Check that ``data`` is what the config's model takes: image size, gray levels, one channel, labels.

    One min/max over the labels; called once when a trainer is built, never per block.

    Raises:
        ChainMismatchError: images of another size or levels than the config's, a config with more than one
            input channel (the images are gray), or labels outside ``0 .. config.num_classes-1``.
    """
    side = data.train.image_shape[0]
    if config.image_size != side or config.levels != data.train.levels:
        raise ChainMismatchError(
            f"rule: the config's image_size and levels must be the data's; got image_size={config.image_size}, "
            f"levels={config.levels} for {side}x{side} images with {data.train.levels} levels. Set "
            f"image_size={side}, levels={data.train.levels}."
        )
    if config.in_channels != 1:
        raise ChainMismatchError(
            f"rule: the data's images are gray (one channel), so in_channels must be 1; got {config.in_channels}."
        )
    for what, labels in (("training", data.train.labels), ("held-out", data.heldout.labels)):
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= config.num_classes):
            raise ChainMismatchError(
                f"rule: labels must be class indices 0..{config.num_classes - 1} (num_classes={config.num_classes}); "
                f"the {what} labels span {int(labels.min())}..{int(labels.max())}. Set num_classes="
                f"{int(labels.max()) + 1} or higher."
            )


class BlockTrainer:
    """Trains blocks of one chain config on one data set, checkpoint by checkpoint.

    A thin stateful wrapper: it resumes a model and optimizer from any :class:`Checkpoint` and
    yields the next checkpoints; all randomness comes from ``(config.seed, block)``.
    """

    def __init__(self, *, config: BlockTrainingConfig, data: BlockData, plan: BlockPlan) -> None:
        check_data_fits(config, data=data)
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
        evaluate: Callable[[int], bool] | None = None,
    ) -> Iterator[Checkpoint]:
        """Yield checkpoints start.block_index+1 .. last_block, trained without ``excluded_ids``.

        ``evaluate(block)`` says which checkpoints record held-out accuracy (default: every
        ``config.accuracy_every``-th block); the chain's last block M_B always does.
        """
        wanted = evaluate or (lambda block: block % config.accuracy_every == 0)
        config = self.config
        check_checkpoint(start, config=config, data_fingerprint=self.data.fingerprint)
        if not start.block_index <= last_block <= config.num_blocks:
            raise ConfigError(f"last_block must be in {start.block_index}..{config.num_blocks}; got {last_block}.")
        keep = keep_mask(self.data.num_train, excluded_ids=excluded_ids)
        excluded_count = int((~keep).sum())
        with deterministic_torch(config.num_threads):
            model = model_from_state(config=config, state=start.model_state)
            optimizer = new_optimizer(model, config=config)
            # Deep copy: Optimizer.load_state_dict may alias the stored tensors and update them in place.
            optimizer.load_state_dict(copy.deepcopy(start.optimizer_state))
            for block in range(start.block_index + 1, last_block + 1):
                began, began_cpu = time.perf_counter(), time.process_time()
                steps = train_block(
                    model,
                    optimizer=optimizer,
                    x=self.data.x_train,
                    y=self.data.y_train,
                    block_ids=self.plan.block_ids(block),
                    keep=keep,
                    learning_rate=config.learning_rate_at(block),
                    epochs=config.local_epochs,
                    batch_size=config.batch_size,
                    seed=block_seed(config.seed, block),
                )
                evaluated = block == config.num_blocks or wanted(block)
                trained_cpu = time.process_time()
                accuracy = heldout_accuracy(model, data=self.data) if evaluated else None
                evaluation_cpu = time.process_time() - trained_cpu
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
                        BlockTiming(
                            block, time.perf_counter() - began, time.process_time() - began_cpu, steps, evaluation_cpu
                        )
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
    evaluate: Callable[[int], bool] | None = None,
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
        evaluate: which new checkpoints record held-out accuracy (block -> bool; default every
            ``config.accuracy_every``-th; M_B always). Evaluation does not change training.

    Raises:
        ChainMismatchError: resumed checkpoints from another config or data, or out of order; data that does
            not fit the config (image size, levels, labels outside 0..num_classes-1).
        ConfigError: an excluded id that is not an integer in ``0 .. n-1``.
    """
    check_data_fits(config, data=data)
    plan = plan or make_block_plan(data.train.labels, num_blocks=config.num_blocks, seed=config.seed)
    excluded = frozenset(check_sample_ids(excluded_ids, num_samples=data.num_train).tolist())
    trainer = BlockTrainer(config=config, data=data, plan=plan)
    checkpoints = list(resume_from)
    for position, checkpoint in enumerate(checkpoints):
        check_checkpoint(checkpoint, config=config, data_fingerprint=data.fingerprint)
        if checkpoint.block_index != position:
            raise ChainMismatchError(
                f"resume_from must hold M_0..M_k in order; position {position} holds block {checkpoint.block_index}."
            )
    if not checkpoints:
        checkpoints.append(initial_checkpoint(config, data=data))
        if sink is not None:
            sink(checkpoints[0])
    for checkpoint in trainer.run(
        start=checkpoints[-1], last_block=config.num_blocks, excluded_ids=excluded, timings=timings, evaluate=evaluate
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
