"""A month of deletion requests (issue 11, SPEC section 6): batching, shards, rollback, against naive.

Setting: MNIST 5k, LeNet-5, 4,000 train / 500 validation (floors, rollback decisions) / 500 test
(every reported accuracy and attack success), B = 20 blocks, E = 5, batch 32, Adam 4e-3 constant:
a configuration that memorises a backdoor. The rate is chosen in the run from 1e-3 (the issue's,
attack success 0.80, under-trained at E = 5), 2e-3, 4e-3 and 8e-3: the best S=1 validation
accuracy among rates whose S=1 chain memorises the backdoor (``learning_rate_choice``). 100
training samples of global blocks 16-20 (recent data) get a 3x3 white corner trigger and label 0;
one request (day 10) deletes exactly them. Shards: S class-stratified shards of B/S blocks each,
so a shard block holds as many samples as a block of S = 1: shard k's block j holds its samples of
global blocks (j-1)S+1..jS (blocks are arrival order, so recent data is recent in every shard).
B blocks per shard (blocks of 1/S the size) trained 14 % more optimizer steps at S = 4 and cost
more accuracy; that plan is kept as a comparison row of the accuracy sweep.

What is trained for real (one torch thread, CPU seconds measured with ``time.process_time``):
* the chains of S = 1, 2, 4 on the poisoned set;
* each affected shard's exact retrain without the poisoned ids, and its naive retrain from scratch
  (bit-identity with exact is checked for every shard);
* the block tax: chain vs plain training (B = 1, same E) on clean data, 5 seeds, 1,000 held-out
  samples, for the CLI defaults (``DEFAULT_RECIPE``), the earlier CLI defaults, the bench config and two
  tried alternatives;
* SISA's own accuracy cost at this data size: S = 1, 2, 4 shards under plain training (B = 1), 5 seeds;
* a timed Ray run (``bench/deletion_parallel.py``): S = 2 on two ChainWorker actors vs S = 1 on one,
  with held-out accuracy at every block (the bench config) and only at the last block;
* block timing (``time_blocks``, under the bench lock): every chain trained 5 more times, the order
  of S rotating, each block's training and evaluation CPU seconds the median over the repetitions.

What is simulated (pure rules of :mod:`obliviate.unlearning.batching` / ``rollback`` in simulated
time): Poisson arrivals over 30 days at 20 and 100 per day, 1-10 ids each, uniform over the training
set or recent-heavy (80 % of ids from blocks 16-20); strategies naive per request, exact per request,
batched exact with windows 1 h, 1 d, 7 d; S = 1, 2, 4; with and without rollback. Retrain cost of
a batch = per shard (B/S - d + 1) block-trainings at the mean of that shard's per-block medians
(``time_blocks``), plus one held-out evaluation per retrain; shards run on 2 workers. With
rollback, an interim version is published only if its validation accuracy is within (floor -
margin) of the pre-deletion model, the margin judged per candidate from its disagreement with the
pre-deletion model (``paired_margin_points``, three standard errors of the difference of two
paired drop estimates; the vote is chosen by that lower bound); otherwise the batch flushes now
and the version served so far stays until the retrain lands (that request's forget time is its
retrain's end). Served accuracy and attack success come from the real checkpoints.
Approximations (stated in the JSON): the accuracy effect of the *random* deletions' data loss is
not modelled (every strategy ends at the same naive model); ids repeat across requests.

Run (one command, ~30 min from nothing on a quiet 2-core machine, 5 min from the cache; the timed
parts take /work/bench.lock themselves):
``nice -n 5 ./.venv/bin/python bench/deletion_stream.py --fresh`` (models are cached under
``$TMPDIR/obliviate-deletion-stream``; without ``--fresh`` the cache is reused).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from bench._common import RESULTS, headline, machine, write_result
from obliviate.data import load_dataset, stratified_split
from obliviate.models import images_to_tensor
from obliviate.unlearning.batching import DAY_S, BatchPolicy, flush_time, new_request
from obliviate.unlearning.chain import BlockData
from obliviate.unlearning.config import DEFAULT_RECIPE, BlockTrainingConfig
from obliviate.unlearning.exact import ChainRetrainer
from obliviate.unlearning.plan import BlockPlan, make_block_plan
from obliviate.unlearning.rollback import ShardCheckpoints, paired_margin_points, plan_interim, served_floor
from obliviate.unlearning.shards import make_shard_plan, shard_probabilities
from obliviate.unlearning.trainer import train_chain
from obliviate.unlearning.verification import choose_backdoor_ids, poison, stamp_trigger

B, E, SEED, TARGET = 20, 5, 0, 0
POISON_COUNT, POISON_BLOCKS = 100, (16, 20)
SHARDS = (1, 2, 4)
WORKERS = 2
FLOOR_POINTS = 2.0  # served accuracy may never fall more than this below the pre-deletion model (test)
INTERIM_LATENCY_S = 1.0  # acceptance -> interim published (assumed; the publish itself is timed separately)
CACHE = Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "obliviate-deletion-stream"
# A memorising configuration: Adam, constant rate. The issue's 1e-3 (attack success 0.80) under-trains
# at E = 5; the rate is the one of LEARNING_RATES with the best S=1 validation accuracy among those
# whose S=1 chain memorises the backdoor (learning_rate_choice measures it, and the run checks it).
# A cosine decay at 3e-3 looked tax-free on 3 seeds x 500 test samples but was not on 5 seeds x
# 1,000 (1.0 point vs 0.9) and stopped memorising as it decayed further, so it is a block-tax row only.
LEARNING_RATES = (1e-3, 2e-3, 4e-3, 8e-3)
MEMORISES = 0.5  # S=1 attack success on triggered test inputs that counts as memorising the backdoor
CONFIG = BlockTrainingConfig(
    num_blocks=B, local_epochs=E, optimizer="adam", learning_rate=4e-3, batch_size=32, seed=SEED, accuracy_every=1
)


# ----- real training ------------------------------------------------------------------------------


def _data() -> dict:
    dataset = load_dataset("mnist5k")
    train_idx, val_idx, test_idx = stratified_split(
        dataset.labels, sizes=(4000, 500, 500), rng=np.random.default_rng(SEED)
    )
    train, val, test = dataset.subset(train_idx), dataset.subset(val_idx), dataset.subset(test_idx)
    plan = make_block_plan(train.labels, num_blocks=B, seed=SEED)
    ids = choose_backdoor_ids(
        train.labels,
        plan=plan,
        count=POISON_COUNT,
        target_class=TARGET,
        first_block=POISON_BLOCKS[0],
        last_block=POISON_BLOCKS[1],
        rng=np.random.default_rng(SEED + 1),
    )
    poisoned, _ = poison(train, plan=plan, ids=ids, target_class=TARGET)
    mask = test.labels != TARGET
    x_trig = images_to_tensor(stamp_trigger(test.images[mask], levels=test.levels), levels=test.levels)
    return {
        "train": train,
        "poisoned": poisoned,
        "val": val,
        "test": test,
        "poison_ids": ids,
        "plan": plan,
        "x_trig": x_trig,
    }


def blocks_per_shard(S: int) -> int:
    """B/S: a shard block holds as many samples as a block of S = 1 (the same optimizer steps in all)."""
    return B // S


def restrict_plan(plan: BlockPlan, positions: np.ndarray, *, merge: int) -> BlockPlan:
    """Block plan of a shard: its block j = the shard's samples of global blocks (j-1)·merge+1..j·merge.

    Local ids, in the global plan's order, so a shard's recent data is in its last blocks.
    """
    if plan.num_blocks % merge:
        raise ValueError(f"merge must divide the plan's {plan.num_blocks} blocks; got {merge}.")
    local = {int(p): j for j, p in enumerate(positions)}
    blocks = tuple(
        np.asarray(
            [local[int(i)] for b in range(first, first + merge) for i in plan.block_ids(b) if int(i) in local],
            dtype=np.int64,
        )
        for first in range(1, plan.num_blocks + 1, merge)
    )
    return BlockPlan(blocks=blocks, num_samples=int(positions.size))


def _probs(states, config, data_x):
    from obliviate.unlearning.config import model_from_state

    return np.stack(
        [
            shard_probabilities(model_from_state(config=config, state=s), x=data_x).numpy().astype(np.float32)
            for s in states
        ]
    )


def shard_inputs(d: dict, positions: np.ndarray, S: int) -> tuple[BlockData, BlockPlan, BlockTrainingConfig]:
    """One poisoned shard's data, block plan and config among S shards.

    A shard's block j holds its samples of S global blocks (blocks are arrival order: recent data is
    in the last blocks of every shard); the plan is fixed from the clean labels.
    """
    positions = np.asarray(positions)
    plan = restrict_plan(d["plan"], positions, merge=S)
    data = BlockData(train=d["poisoned"].subset(positions), heldout=d["val"])
    return data, plan, replace(CONFIG, num_blocks=plan.num_blocks)


def train_world(fresh: bool) -> dict:
    """Chains of S = 1, 2, 4, their poison-free exact retrains, naive retrains of the affected shards, block tax (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    meta_path, arrays_path = CACHE / "world.json", CACHE / "world.npz"
    cached = json.loads(meta_path.read_text()) if meta_path.exists() and not fresh else {}
    # a world cached before evaluation was timed apart from training retrains its chains (timings)
    # but keeps its accuracy sweeps, which that does not change
    plans_now = {str(S): blocks_per_shard(S) for S in SHARDS}
    same_world = cached.get("blocks_per_shard") == plans_now and cached.get("config") == CONFIG.to_dict()
    if cached and arrays_path.exists() and same_world:
        with np.load(arrays_path, allow_pickle=False) as npz:
            return {"meta": cached, "arrays": {k: npz[k] for k in npz.files}}
    d = _data()
    x_val = images_to_tensor(d["val"].images, levels=256)
    x_test = images_to_tensor(d["test"].images, levels=256)
    meta: dict = {
        "poison_ids": d["poison_ids"].tolist(),
        "shards": {},
        "block_tax": [],
        "blocks_per_shard": plans_now,
        "config": CONFIG.to_dict(),
    }
    arrays: dict[str, np.ndarray] = {"y_val": d["val"].labels, "y_test": d["test"].labels}
    for S in SHARDS:
        shard_plan = make_shard_plan(d["poisoned"].labels, num_shards=S, seed=SEED)
        meta["shards"][str(S)] = {"plan": shard_plan.to_dict()["shards"], "shards": []}
        for k, positions in enumerate(shard_plan.shards):
            data, plan, config = shard_inputs(d, positions, S)
            timings: list = []
            began = time.process_time()
            chain = train_chain(config=config, data=data, plan=plan, timings=timings)
            train_cpu = time.process_time() - began
            local_poison = np.flatnonzero(np.isin(positions, d["poison_ids"]))
            info = {
                "block_cpu_seconds": [t.cpu_seconds for t in timings],
                "block_evaluation_cpu_seconds": [t.evaluation_cpu_seconds for t in timings],
                "train_cpu_seconds": train_cpu,
                "block_of_local": chain.plan.block_of(np.arange(positions.size)).tolist(),
                "poison_first_block": int(chain.plan.block_of(local_poison).min()) if local_poison.size else None,
            }
            states = [c.model_state for c in chain.checkpoints]
            for name, x in (("val", x_val), ("test", x_test), ("trig", d["x_trig"])):
                arrays[f"S{S}k{k}_orig_{name}"] = _probs(states, CONFIG, x)
            if local_poison.size:
                retrainer = ChainRetrainer(chain=chain, data=data, ids=local_poison.tolist())
                began = time.process_time()
                retrainer.advance_to(plan.num_blocks)
                info["poison_retrain_cpu_seconds"] = time.process_time() - began
                clean = [
                    retrainer.checkpoints[i] if i >= info["poison_first_block"] else chain.checkpoints[i]
                    for i in range(plan.num_blocks + 1)
                ]
                clean_states = [c.model_state for c in clean]
                for name, x in (("val", x_val), ("test", x_test), ("trig", d["x_trig"])):
                    arrays[f"S{S}k{k}_clean_{name}"] = _probs(clean_states, CONFIG, x)
                # naive retrain of every affected shard: the exact retrain must equal it bit for bit
                began = time.process_time()
                naive = train_chain(config=config, data=data, plan=plan, excluded_ids=local_poison.tolist())
                info["naive_cpu_seconds"] = time.process_time() - began
                info["exact_bit_identical_to_naive"] = all(
                    torch.equal(naive.final.model_state[key], clean[-1].model_state[key]) for key in clean_states[-1]
                )
            meta["shards"][str(S)]["shards"].append(info)
            print(f"S={S} shard {k}: trained ({train_cpu:.1f} s CPU)", file=sys.stderr)
    # the studies on clean data do not depend on these chains; refresh_studies re-runs the stale ones
    meta.update({name: cached[name] for name in (*STUDIES, "block_tax") if name in cached})
    np.savez_compressed(arrays_path, **arrays)
    meta_path.write_text(json.dumps(meta))
    return {"meta": meta, "arrays": arrays}


TIMING_REPS = 5


def time_blocks(world: dict, *, reps: int = TIMING_REPS) -> dict:
    """Training and evaluation CPU seconds per block of every shard chain, S = 1, 2, 4 interleaved.

    The world's own timings come from one pass that trains S = 1, then 2, then 4, minutes apart,
    so a drift of the machine between them reads as a cost of sharding (S = 4's blocks measured 3 %
    slower than S = 1's in one build, S = 2's shard 0 as fast as S = 1's and its shard 1 as slow as
    S = 4's). Here each repetition trains every chain again, the order of S rotating between
    repetitions, and the simulation takes each block's median over the repetitions.
    """
    d = _data()
    chains = {S: [shard_inputs(d, p, S) for p in world["meta"]["shards"][str(S)]["plan"]] for S in SHARDS}
    train_s: dict[tuple[int, int], list[list[float]]] = {}
    eval_s: dict[tuple[int, int], list[list[float]]] = {}
    totals: dict[int, list[float]] = {S: [] for S in SHARDS}
    for rep in range(reps):
        order = SHARDS[rep % len(SHARDS) :] + SHARDS[: rep % len(SHARDS)]
        for S in order:
            for k, (data, plan, config) in enumerate(chains[S]):
                timings: list = []
                train_chain(config=config, data=data, plan=plan, timings=timings)
                train_s.setdefault((S, k), []).append([t.cpu_seconds - t.evaluation_cpu_seconds for t in timings])
                eval_s.setdefault((S, k), []).append([t.evaluation_cpu_seconds for t in timings])
            totals[S].append(sum(sum(train_s[S, k][-1]) for k in range(S)))
        print(
            f"block timing repetition {rep + 1}/{reps}: " + ", ".join(f"S={S} {totals[S][-1]:.2f} s" for S in SHARDS),
            file=sys.stderr,
        )
    return {
        "reps": reps,
        "train_cpu_seconds_per_rep": {str(S): v for S, v in totals.items()},
        "shards": {
            str(S): [
                {
                    "block_train_cpu_seconds": np.median(train_s[S, k], axis=0).tolist(),
                    "block_evaluation_cpu_seconds": np.median(eval_s[S, k], axis=0).tolist(),
                }
                for k in range(S)
            ]
            for S in SHARDS
        },
    }


TAX_SEEDS = (0, 1, 2, 3, 4)
CLI_DEFAULTS = (
    f"CLI defaults (B={DEFAULT_RECIPE['num_blocks']}, E={DEFAULT_RECIPE['local_epochs']}, Adam "
    f"{DEFAULT_RECIPE['learning_rate']:g} {DEFAULT_RECIPE['schedule']} to {DEFAULT_RECIPE['min_lr_fraction']:.0%})"
)
BENCH_CONFIG = (
    f"bench config (B=20, E=5, Adam {CONFIG.learning_rate:g} constant; chosen to memorise the backdoor, not a default)"
)
TAX_CONFIGS = {
    CLI_DEFAULTS: BlockTrainingConfig(**DEFAULT_RECIPE, seed=SEED),
    "earlier CLI defaults (B=6, E=3, Adam 1e-2 constant)": BlockTrainingConfig(
        num_blocks=6, local_epochs=3, optimizer="adam", learning_rate=0.01, seed=SEED
    ),
    BENCH_CONFIG: CONFIG,
    "issue's memorising config (B=20, E=5, Adam 1e-3 constant)": replace(CONFIG, learning_rate=1e-3),
    **{
        f"B=20, E=5, Adam 3e-3 cosine to {round(100 * fraction)} %": replace(
            CONFIG, learning_rate=3e-3, schedule="cosine", min_lr_fraction=fraction
        )
        for fraction in (0.3, 0.02)
    },
}


def block_tax(d: dict, *, skip: Sequence[str] = ()) -> list[dict]:
    """Held-out accuracy of the chain vs plain training (one block of everything, same epochs), clean data.

    Plain training is the same config with B = 1 (E epochs over all the data at block 1's rate).
    Accuracy on validation + test (1,000 samples, neither trained on), mean over ``TAX_SEEDS`` (the
    chain seed: initialisation, block split, batch order): one seed's tax on 500 samples moves by
    about a point.
    """
    x_eval, y_eval = _eval_set(d)
    out = []
    for label, base in TAX_CONFIGS.items():
        if label in skip:
            continue
        data = BlockData(train=d["train"], heldout=d["val"])
        row: dict = {
            "config": label,
            **{
                k: v
                for k, v in base.to_dict().items()
                if k in ("num_blocks", "local_epochs", "learning_rate", "optimizer", "schedule", "min_lr_fraction")
            },
            "seeds": list(TAX_SEEDS),
        }
        for seed in TAX_SEEDS:
            config = BlockTrainingConfig.from_dict({**base.to_dict(), "seed": seed})
            for kind, cfg in (
                ("chain", config),
                ("plain", BlockTrainingConfig.from_dict({**config.to_dict(), "num_blocks": 1})),
            ):
                began = time.process_time()
                chain = train_chain(config=cfg, data=data)
                probs = shard_probabilities(chain.model(), x=x_eval)
                row.setdefault(f"{kind}_heldout_accuracy", []).append(float((probs.argmax(1).numpy() == y_eval).mean()))
                row.setdefault(f"{kind}_cpu_seconds", []).append(time.process_time() - began)
                if kind == "chain":
                    accs = [c.heldout_accuracy for c in chain.checkpoints[1:] if c.heldout_accuracy is not None]
                    row.setdefault("largest_block_drop_points", []).append(
                        100 * max([0.0] + [a - b for a, b in itertools.pairwise(accs)])
                    )
        row["tax_points_per_seed"] = [
            100 * (p - c) for p, c in zip(row["plain_heldout_accuracy"], row["chain_heldout_accuracy"], strict=True)
        ]
        row["tax_points"] = float(np.mean(row["tax_points_per_seed"]))
        out.append(row)
        print(
            f"block tax {label}: {row['tax_points']:.2f} points (seeds {row['tax_points_per_seed']})", file=sys.stderr
        )
    return out


SISA_SEEDS = (0, 1, 2, 3, 4)


def _eval_set(d: dict) -> tuple[torch.Tensor, np.ndarray]:
    """Validation + test (1,000 samples): where the shard-cost rows are measured."""
    x_eval = torch.cat([images_to_tensor(d[k].images, levels=256) for k in ("val", "test")])
    return x_eval, np.concatenate([d["val"].labels, d["test"].labels])


def shard_costs(d: dict, *, config: BlockTrainingConfig, chains: bool, keep_block_size: bool = True) -> dict:
    """Accuracy of S = 1, 2, 4 class-stratified shards on the clean 4,000 samples, and S's cost in points.

    Per seed of ``SISA_SEEDS`` (the config's seed and the shard split's): every shard trained with
    ``config`` (``chains``: on the bench's block plan of that seed restricted to the shard, B/S
    blocks per shard, or with ``keep_block_size`` False B blocks of 1/S the size; else plainly, one
    block), served as the mean of the shards' probabilities, evaluated on validation + test.
    Remembered in ``d``: the studies ask for the same case more than once (the bench config's chains
    in the sweep and the rate choice; its plain training in the sweep and SISA's own cost).
    """
    memo = d.setdefault("shard_costs", {})
    case = (json.dumps(config.to_dict(), sort_keys=True), chains, keep_block_size)
    if case not in memo:
        memo[case] = _shard_costs(d, config=config, chains=chains, keep_block_size=keep_block_size)
    return memo[case]


def _shard_costs(d: dict, *, config: BlockTrainingConfig, chains: bool, keep_block_size: bool) -> dict:
    x_eval, y_eval = _eval_set(d)
    out: dict = {}
    for S in SHARDS:
        merge = S if keep_block_size else 1
        for seed in SISA_SEEDS:
            block_plan = make_block_plan(d["train"].labels, num_blocks=B, seed=seed) if chains else None
            probs = [
                shard_probabilities(
                    train_chain(
                        config=replace(config, seed=seed, num_blocks=B // merge if chains else 1),
                        data=BlockData(train=d["train"].subset(p), heldout=d["val"]),
                        plan=None if block_plan is None else restrict_plan(block_plan, p, merge=merge),
                    ).model(),
                    x=x_eval,
                ).numpy()
                for p in make_shard_plan(d["train"].labels, num_shards=S, seed=seed).shards
            ]
            right = np.mean(probs, axis=0).argmax(1) == y_eval
            out.setdefault(f"accuracy_S{S}", []).append(float(right.mean()))
            out.setdefault(f"validation_accuracy_S{S}", []).append(float(right[: d["val"].labels.size].mean()))
    for S in SHARDS[1:]:
        out[f"cost_points_S{S}"] = 100 * float(np.mean(out["accuracy_S1"]) - np.mean(out[f"accuracy_S{S}"]))
    return out


def sisa_plain_cost(d: dict) -> dict:
    """SISA's own accuracy cost at this data size: plain training (B = 1) of S shards vs one model.

    The same recipe as the bench chains (``CONFIG``, E = 5) on the clean 4,000 training samples,
    S = 1, 2, 4 class-stratified shards served as the mean of their probabilities, no blocks at
    all; evaluated on validation + test (1,000 samples). What the chains' S = 2 cost should be
    compared with: the part no block plan adds.
    """
    out = shard_costs(d, config=replace(CONFIG, num_blocks=1), chains=False)
    return {"seeds": list(SISA_SEEDS), "recipe": "bench config with B = 1 (plain training)", **out}


EPOCH_SWEEP = (5, 10, 20)


def learning_rate_choice(d: dict) -> dict:
    """The bench's learning rate: per rate of ``LEARNING_RATES`` (the rest of ``CONFIG`` kept), the
    S = 1, 2, 4 chains' accuracy on clean data (:func:`shard_costs`) and the attack success of an S = 1
    chain on the poisoned data (seed 0). Chosen: the best mean S = 1 validation accuracy among the
    rates whose attack success is at least ``MEMORISES`` (validation only: test is what is reported).
    """
    rows: dict = {}
    for rate in LEARNING_RATES:
        config = replace(CONFIG, learning_rate=rate)
        poisoned = train_chain(config=config, data=BlockData(train=d["poisoned"], heldout=d["val"]), plan=d["plan"])
        attack = shard_probabilities(poisoned.model(), x=d["x_trig"]).numpy().argmax(1) == TARGET
        rows[f"{rate:g}"] = {**shard_costs(d, config=config, chains=True), "asr_S1_untouched": float(attack.mean())}
        print(
            f"lr {rate:g}: S=2 cost {rows[f'{rate:g}']['cost_points_S2']:.2f}, ASR {attack.mean():.2f}", file=sys.stderr
        )
    memorising = [rate for rate in rows if rows[rate]["asr_S1_untouched"] >= MEMORISES]
    chosen = max(memorising, key=lambda rate: np.mean(rows[rate]["validation_accuracy_S1"]), default=None)
    return {
        "seeds": list(SISA_SEEDS),
        "memorises_at_asr": MEMORISES,
        "by_rate": rows,
        "chosen": chosen,
    }


def _choice_key() -> dict:
    return {**_study_key(), "learning_rate": list(LEARNING_RATES)}


def _study_key() -> dict:
    """What a study on clean data depends on: the config, the seeds and the shard block plans."""
    return {
        **CONFIG.to_dict(),
        "seeds": list(SISA_SEEDS),
        "blocks_per_shard": {str(S): blocks_per_shard(S) for S in SHARDS},
    }


def shard_cost_by_epochs(d: dict) -> dict:
    """S = 2 / S = 4 accuracy cost as the local epochs grow (the rest of the bench config kept).

    At every E of ``EPOCH_SWEEP``: the cost of the chains (:func:`shard_costs` with ``chains``, B/S
    blocks per shard) and of plain training with the same E, and the attack success of an S = 1
    chain on the poisoned data (seed 0): every E must still memorise the backdoor. At the bench's E
    also the chains of B blocks per shard (blocks of 1/S the size), the plan this bench used before.
    What it shows: at E = 5 a shard is trained too little, so most of the S = 2 cost is training
    length, and what is left at a longer E is the block plan's, not sharding's.
    """
    out: dict = {"seeds": list(SISA_SEEDS), "epochs": list(EPOCH_SWEEP), "by_epochs": {}}
    for epochs in EPOCH_SWEEP:
        config = replace(CONFIG, local_epochs=epochs)
        poisoned = train_chain(config=config, data=BlockData(train=d["poisoned"], heldout=d["val"]), plan=d["plan"])
        attack = shard_probabilities(poisoned.model(), x=d["x_trig"]).numpy().argmax(1) == TARGET
        row = {
            "chains": shard_costs(d, config=config, chains=True),
            "plain": shard_costs(d, config=replace(config, num_blocks=1), chains=False),
            "asr_S1_untouched": float(attack.mean()),
        }
        if epochs == E:
            row["chains_B_blocks_per_shard"] = shard_costs(d, config=config, chains=True, keep_block_size=False)
        out["by_epochs"][str(epochs)] = row
        print(
            f"E={epochs}: S=2 cost, chains {row['chains']['cost_points_S2']:.2f}, plain {row['plain']['cost_points_S2']:.2f}",
            file=sys.stderr,
        )
    return out


# name in the world's meta -> (the key it was computed under, how to compute it)
STUDIES = {
    "sisa_plain": (_study_key, sisa_plain_cost),
    "shard_cost_by_epochs": (_study_key, shard_cost_by_epochs),
    "learning_rate_choice": (_choice_key, learning_rate_choice),
}


def refresh_studies(meta: dict) -> None:
    """Re-run the studies (and block-tax rows) whose cached key is not today's; saves the world's meta."""
    data = None
    for name, (key, compute) in STUDIES.items():
        if (meta.get(name) or {}).get("key") != key():
            data = data or _data()
            meta[name] = {**compute(data), "key": key()}
    done = {row["config"] for row in meta.get("block_tax", [])}
    if set(TAX_CONFIGS) - done:  # rows added after the cache was built
        data = data or _data()
        meta["block_tax"] = meta.get("block_tax", []) + block_tax(data, skip=sorted(done))
    (CACHE / "world.json").write_text(json.dumps(meta))


# ----- simulation ---------------------------------------------------------------------------------


class Models:
    """Accuracy / attack success of a served combination, from the real checkpoints' probabilities."""

    def __init__(self, world: dict, S: int) -> None:
        self.S, self.arrays = S, world["arrays"]
        self.info = world["meta"]["shards"][str(S)]
        self.y_val, self.y_test = self.arrays["y_val"], self.arrays["y_test"]
        self._cache: dict = {}

    def _p(self, k: int, clean: bool, split: str) -> np.ndarray:
        key = f"S{self.S}k{k}_{'clean' if clean and f'S{self.S}k{k}_clean_val' in self.arrays else 'orig'}_{split}"
        return self.arrays[key]

    def predictions(self, served: dict, clean: frozenset, split: str) -> np.ndarray | None:
        """Predicted classes of a served combination (mean of the voting shards' probabilities)."""
        key = ("pred", tuple(sorted(served.items(), key=lambda kv: kv[0])), clean, split)
        if key not in self._cache:
            parts = [
                self._p(k, k in clean, "trig" if split == "asr" else split)[b]
                for k, b in served.items()
                if b is not None
            ]
            self._cache[key] = np.mean(np.stack(parts).astype(np.float64), axis=0).argmax(1) if parts else None
        return self._cache[key]

    def metric(self, served: dict, clean: frozenset, split: str) -> float | None:
        """served: shard -> block or None; clean: shards whose poison-free retrain has landed."""
        pred = self.predictions(served, clean, split)
        if pred is None:
            return None
        if split == "asr":
            return float((pred == TARGET).mean())
        return float((pred == (self.y_val if split == "val" else self.y_test)).mean())


def make_stream(rate: float, variant: str, *, world: dict, seed: int) -> list[dict]:
    rng = np.random.default_rng((seed, int(rate), variant == "recent"))
    poison_ids = set(world["meta"]["poison_ids"])
    block_of = np.asarray(world["meta"]["shards"]["1"]["shards"][0]["block_of_local"])  # S = 1: position -> block
    candidates = np.asarray([i for i in range(block_of.size) if i not in poison_ids])
    recent = candidates[block_of[candidates] >= POISON_BLOCKS[0]]
    times = np.cumsum(rng.exponential(DAY_S / rate, size=int(rate * 40)))
    times = times[times < 30 * DAY_S]
    stream = []
    for i, t in enumerate(times):
        k = int(rng.integers(1, 11))
        pool = recent if variant == "recent" and rng.random() < 0.8 else candidates
        stream.append({"id": f"r{i}", "t": float(t), "ids": sorted(rng.choice(pool, size=k, replace=False).tolist())})
    stream.append({"id": "poison", "t": 10 * DAY_S + 1.0, "ids": sorted(poison_ids)})
    return sorted(stream, key=lambda r: r["t"])


def simulate(
    stream: list[dict], *, world: dict, S: int, window_s: float | None, rollback: bool, naive: bool = False
) -> dict:
    """Run the pure rules over the stream in simulated time (window_s None: exact per request).

    Served versions are events: a batch landing serves the full model (or, while requests are still
    open, their interim plan); a request accepted with rollback publishes its interim only if it
    meets the floor (``plan.publish``), otherwise the batch flushes now and the version served so far
    stays until that retrain lands (the request's forget time is then its retrain's end).
    """
    info = world["meta"]["shards"][str(S)]
    models = Models(world, S)
    plans = [np.asarray(p) for p in info["plan"]]
    owner = {int(pos): (k, j) for k, p in enumerate(plans) for j, pos in enumerate(p)}
    block_of = [np.asarray(s["block_of_local"]) for s in info["shards"]]
    shard_blocks = blocks_per_shard(S)
    # A retrain (exact or naive) evaluates only its last block, as the service's worker does when no
    # rollback is served: the blocks' training CPU seconds plus one held-out evaluation.
    # per-block medians of the interleaved repetitions (time_blocks)
    timing = world["timing"]["shards"]
    block_s = [float(np.mean(shard["block_train_cpu_seconds"])) for shard in timing[str(S)]]
    eval_s = [float(np.mean(shard["block_evaluation_cpu_seconds"])) for shard in timing[str(S)]]
    s1 = timing["1"][0]
    naive_s1 = float(np.sum(s1["block_train_cpu_seconds"]) + np.mean(s1["block_evaluation_cpu_seconds"]))
    # the sharded model from scratch
    naive_same_s = float(sum(shard_blocks * t + e for t, e in zip(block_s, eval_s, strict=True)))
    acc_final = {k: models.metric({k: shard_blocks}, frozenset(), "val") for k in range(S)}
    full = dict.fromkeys(range(S), shard_blocks)
    pre_val = models.metric(full, frozenset(), "val")
    pre_test = models.metric(full, frozenset(), "test")
    # the margin kept back for held-out vs test noise, per candidate: one s.e. of the difference of two paired
    # drop estimates, from the candidate's disagreement with the pre-deletion model on the validation set
    pre_val_pred = models.predictions(full, frozenset(), "val")
    floor_val = served_floor(pre_deletion_accuracy=pre_val, floor_points=FLOOR_POINTS)
    margins: list[float] = []

    def margin_of(clean: frozenset):
        def margin(served) -> float:
            return paired_margin_points(
                reference=pre_val_pred, candidate=models.predictions(dict(served), clean, "val")
            )

        return margin

    shard_floor = min(acc_final.values()) - 0.05
    policy = BatchPolicy(window_s=window_s or 0.0)

    deleted: set[int] = set()
    pending: list[dict] = []  # accepted, not yet in a batch
    reqs: dict[str, dict] = {}  # every accepted request: t, ids, aff, exact_at (once batched)
    busy_until = 0.0
    batches: list[dict] = []
    compute_s = compute_blocks = 0.0
    clean_at: dict[int, float] = {}  # shard -> time its poison-free retrain landed
    landings: list[float] = []  # exact_at of batches not yet processed as served-version events
    changes: list[tuple[float, dict, frozenset]] = [(0.0, full, frozenset())]  # (from, served, clean shards)
    forgotten_at: dict[str, float] = {}

    def clean_set(t: float) -> frozenset:
        return frozenset(k for k, c in clean_at.items() if c <= t)

    def affected(ids) -> dict[int, int]:
        out: dict[int, int] = {}
        for pos in ids:
            if pos in deleted:
                continue
            k, j = owner[pos]
            out[k] = min(out.get(k, shard_blocks + 1), int(block_of[k][j]))
        return out

    def retrain_seconds(aff):
        jobs = sorted(((shard_blocks - d + 1) * block_s[k] + eval_s[k] for k, d in aff.items()), reverse=True)
        workers = [0.0] * WORKERS
        for job in jobs:
            workers[workers.index(min(workers))] += job
        return max(workers) if jobs else 0.0, sum(jobs), sum(shard_blocks - d + 1 for d in aff.values())

    def flush(at: float, reason: str) -> None:
        nonlocal busy_until, compute_s, compute_blocks, pending
        if not pending:
            return
        ids = sorted({i for r in pending for i in r["ids"]})
        aff = affected(ids)
        wall, cpu, blocks = retrain_seconds(aff)
        start = max(at, busy_until)
        exact_at = start + wall
        busy_until = exact_at
        compute_s += cpu
        compute_blocks += blocks  # in S = 1 block equivalents (a shard block holds as many samples)
        batches.append(
            {
                "at": at,
                "reason": reason,
                "requests": len(pending),
                "d_min": min(aff.values()) if aff else None,
                "exact_at": exact_at,
                "retrain_wall_s": wall,
            }
        )
        for r in pending:
            reqs[r["id"]]["exact_at"] = exact_at
        if any(r["id"] == "poison" for r in pending):
            for k in affected(set(world["meta"]["poison_ids"])):
                clean_at[k] = exact_at
        deleted.update(ids)
        landings.append(exact_at)
        pending = []

    def expected(ids_lists) -> float:
        aff = affected({i for ids in ids_lists for i in ids})
        return retrain_seconds(aff)[0] if aff else 0.0

    def open_at(t: float) -> list[dict]:
        return [q for q in reqs.values() if q["t"] <= t and q.get("exact_at", np.inf) > t]

    def plan_for(open_reqs: list[dict], t: float):
        aff: dict[int, int] = {}
        for q in open_reqs:
            for k, d in q["aff"].items():
                aff[k] = min(aff.get(k, shard_blocks + 1), d)
        if not aff:
            return None
        clean = clean_set(t)
        # every open request's rollback from the full chain: the same as rolling back step by step
        shards = [
            ShardCheckpoints(
                k, tuple(models.metric({k: i}, clean, "val") for i in range(shard_blocks + 1)), shard_blocks
            )
            for k in range(S)
        ]
        return plan_interim(
            shards=shards,
            affected=aff,
            served_floor=floor_val,
            shard_floor=shard_floor,
            ensemble_accuracy=(lambda served: models.metric(dict(served), clean, "val") or 0.0) if S > 1 else None,
            margin_of=margin_of(clean),
        )

    def land_until(t: float) -> None:
        """Served-version events of the batches that landed by ``t``."""
        while landings and min(landings) <= t:
            at = min(landings)
            landings.remove(at)
            if not rollback:
                changes.append((at, full, clean_set(at)))
                continue
            plan = plan_for(open_at(at), at)
            if plan is None:
                changes.append((at, full, clean_set(at)))
            elif plan.publish:
                changes.append((at, dict(plan.served), clean_set(at)))
            # else: the version served so far never saw the still-open ids of forgotten requests; it stays

    for r in stream:
        t = r["t"]
        if window_s is not None:
            while pending:
                batch = [new_request(request_id=p["id"], received_at=p["t"], policy=policy) for p in pending]
                at, reason = flush_time(batch, policy=policy, expected_retrain_s=expected([p["ids"] for p in pending]))
                if at > t:
                    break
                flush(at, reason)
        land_until(t)
        reqs[r["id"]] = {**r, "aff": affected(r["ids"]), "deadline": t + policy.deadline_s}
        pending.append(reqs[r["id"]])
        if naive or window_s is None:
            flush(t, "per_request")
        elif rollback:
            plan = plan_for(open_at(t), t)
            if plan is None:  # every id already deleted
                forgotten_at[r["id"]] = t
            elif plan.publish:
                margins.append(margin_of(clean_set(t))(plan.served))
                changes.append((t + INTERIM_LATENCY_S, dict(plan.served), clean_set(t)))
                forgotten_at[r["id"]] = t + INTERIM_LATENCY_S
            else:
                flush(t, "rollback_below_floor")
    if window_s is not None and pending:
        batch = [new_request(request_id=p["id"], received_at=p["t"], policy=policy) for p in pending]
        at, reason = flush_time(batch, policy=policy, expected_retrain_s=expected([p["ids"] for p in pending]))
        flush(at, reason)
    land_until(np.inf)
    if naive:
        compute_s = naive_s1 * len(stream)
        compute_blocks = float(B * len(stream))
        for r in stream:  # serialised naive retrains would queue; reported optimistic
            reqs[r["id"]]["exact_at"] = r["t"] + naive_s1
    for r in stream:
        forgotten_at.setdefault(r["id"], reqs[r["id"]]["exact_at"])

    # ----- timeline of served versions -------------------------------------------------------------
    changes.sort(key=lambda c: c[0])
    poison_forgotten = forgotten_at["poison"]
    naive_asr_s = models.metric(full, frozenset(range(S)), "asr")
    acc_points, asr_points = [], []
    ends = [c[0] for c in changes[1:]] + [30 * DAY_S]
    for (a, state, clean), b in zip(changes, ends, strict=True):
        if b <= a:
            continue
        acc = models.metric(state, clean, "test")
        acc_points.append((acc, b - a))
        if b > poison_forgotten:
            asr_points.append(models.metric(state, clean, "asr"))
    n = len(stream)
    to_exact = np.asarray([reqs[r["id"]]["exact_at"] - r["t"] for r in stream])
    to_forget = np.asarray([forgotten_at[r["id"]] - r["t"] for r in stream])
    late = sum(reqs[r["id"]]["exact_at"] > reqs[r["id"]]["deadline"] for r in stream)
    applied = sum(b_["requests"] for b_ in batches) if not naive else n
    weights = np.asarray([w for _, w in acc_points])
    values = np.asarray([v for v, _ in acc_points])
    below = float(sum(w for v, w in acc_points if v < pre_test - FLOOR_POINTS / 100))
    return {
        "requests": n,
        "batches": len(batches) if not naive else n,
        "flush_reasons": {
            k: sum(b_["reason"] == k for b_ in batches) for k in sorted({b_["reason"] for b_ in batches})
        },
        "mean_requests_per_batch": n / max(len(batches), 1) if not naive else 1.0,
        "compute_cpu_seconds": compute_s,
        "compute_block_trainings_S1_equivalent": compute_blocks,
        "compute_per_request_fraction_of_naive_same_S": compute_s / n / (naive_same_s if not naive else naive_s1),
        "compute_per_request_fraction_of_naive_S1": compute_s / n / naive_s1,
        "naive_retrain_cpu_seconds_same_S": naive_same_s,
        "requests_past_deadline": int(late),
        "requests_lost_or_applied_twice": int(abs(applied - n)),
        "time_to_exact_p50_s": float(np.percentile(to_exact, 50)),
        "time_to_exact_p95_s": float(np.percentile(to_exact, 95)),
        "time_to_forgotten_p50_s": float(np.percentile(to_forget, 50)),
        "time_to_forgotten_p95_s": float(np.percentile(to_forget, 95)),
        "forgotten_by_interim": int(sum(1 for r in stream if forgotten_at[r["id"]] < reqs[r["id"]]["exact_at"])),
        "pre_deletion_validation_accuracy": pre_val,
        "served_floor_validation": floor_val,
        "interims_published_at_acceptance": len(margins),
        "published_interim_margin_points_mean": float(np.mean(margins)) if margins else None,
        "published_interim_margin_points_max": float(max(margins)) if margins else None,
        "pre_deletion_test_accuracy": pre_test,
        "served_test_accuracy_min": float(values.min()),
        "served_test_accuracy_mean": float((values * weights).sum() / weights.sum()),
        "served_accuracy_max_drop_points": 100 * (pre_test - float(values.min())),
        "hours_below_pre_minus_floor": below / 3600,
        "retrain_wall_per_batch_mean_s": float(np.mean([b_["retrain_wall_s"] for b_ in batches])) if batches else None,
        "naive_same_S_asr": naive_asr_s,
        "asr_after_forget_max": max(asr_points),
        "asr_after_forget_min": min(asr_points),
        "asr_after_forget_max_deviation_from_naive_same_S_points": 100 * max(abs(a - naive_asr_s) for a in asr_points),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fresh", action="store_true", help="retrain the cached chains")
    parser.add_argument("--no-parallel", action="store_true", help="skip the timed Ray run (S = 2 on 2 workers)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = machine()
    began = time.perf_counter()
    world = train_world(args.fresh)
    refresh_studies(world["meta"])
    from bench.deletion_parallel import bench_lock

    with bench_lock():  # a timing: other benches would inflate it
        world["timing"] = time_blocks(world)
    train_wall = time.perf_counter() - began
    rows = []
    for rate in (20.0, 100.0):
        for variant in ("uniform", "recent"):
            stream = make_stream(rate, variant, world=world, seed=SEED)
            configs = [("naive per request", 1, None, False, True), ("exact per request", 1, None, False, False)]
            for label, window in (("batched 1h", 3600.0), ("batched 1d", DAY_S), ("batched 7d", 7 * DAY_S)):
                for S in SHARDS:
                    for rollback in (False, True):
                        configs.append((label, S, window, rollback, False))
            for label, S, window, rollback, naive in configs:
                sim = simulate(stream, world=world, S=S, window_s=window, rollback=rollback, naive=naive)
                rows.append(
                    {"rate_per_day": rate, "ids": variant, "strategy": label, "shards": S, "rollback": rollback, **sim}
                )
                print(
                    f"{rate:.0f}/d {variant} {label} S={S} rb={rollback}: "
                    f"{sim['compute_per_request_fraction_of_naive_same_S']:.4f} of naive (same S), "
                    f"drop {sim['served_accuracy_max_drop_points']:.1f}, "
                    f"asr dev {sim['asr_after_forget_max_deviation_from_naive_same_S_points']:.1f}, "
                    f"late {sim['requests_past_deadline']}",
                    file=sys.stderr,
                )
    sim_wall = time.perf_counter() - began - train_wall
    parallel = None
    if not args.no_parallel:
        from bench.deletion_parallel import measure

        parallel = measure(CONFIG)
        # and with twice the local epochs: the per-block fixed costs weigh half as much
        parallel["epochs_10"] = measure(replace(CONFIG, local_epochs=10))
    meta = world["meta"]
    s1 = meta["shards"]["1"]["shards"][0]
    choice = meta["learning_rate_choice"]
    if choice["chosen"] != f"{CONFIG.learning_rate:g}":
        print(
            f"warning: the bench config's rate {CONFIG.learning_rate:g} is not the chosen one ({choice['chosen']}); "
            "set CONFIG's learning_rate to it and re-run with --fresh.",
            file=sys.stderr,
        )
    final = {S: dict.fromkeys(range(S), blocks_per_shard(S)) for S in SHARDS}
    naive_asr = {S: Models(world, S).metric(final[S], frozenset(range(S)), "asr") for S in SHARDS}
    orig_asr = {S: Models(world, S).metric(final[S], frozenset(), "asr") for S in SHARDS}

    def pick(**kw):
        return next(r for r in rows if all(r[k] == v for k, v in kw.items()))

    b1d = pick(rate_per_day=20.0, ids="uniform", strategy="batched 1d", shards=1, rollback=False)
    b7d = pick(rate_per_day=20.0, ids="uniform", strategy="batched 7d", shards=1, rollback=False)
    batched_20 = [r for r in rows if r["strategy"].startswith("batched") and r["mean_requests_per_batch"] >= 20]
    worst_same = max(batched_20, key=lambda r: r["compute_per_request_fraction_of_naive_same_S"])
    worst_s1 = max(batched_20, key=lambda r: r["compute_per_request_fraction_of_naive_S1"])
    rb = [r for r in rows if r["rollback"]]
    worst_rb = max(rb, key=lambda r: r["time_to_forgotten_p95_s"])
    best_rb = min(rb, key=lambda r: r["time_to_forgotten_p95_s"])
    worst_drop = max(rows, key=lambda r: r["served_accuracy_max_drop_points"])
    worst_asr = max(rows, key=lambda r: r["asr_after_forget_max_deviation_from_naive_same_S_points"])
    s_acc = {S: Models(world, S).metric(final[S], frozenset(), "test") for S in SHARDS}
    s_acc_naive = {S: Models(world, S).metric(final[S], frozenset(range(S)), "test") for S in SHARDS}
    wall_exact = {
        S: pick(rate_per_day=20.0, ids="uniform", strategy="batched 1d", shards=S, rollback=False)[
            "retrain_wall_per_batch_mean_s"
        ]
        for S in SHARDS
    }
    tax = {row["config"]: row for row in meta["block_tax"]}
    where = "{rate_per_day:.0f}/day {ids}, {strategy}, S={shards}{rb}"

    def name(r: dict) -> str:
        return where.format(**r, rb=" rollback" if r["rollback"] else "")

    issue_rate = choice["by_rate"]["0.001"]
    headlines = [
        headline(
            f"learning rate of the bench config (Adam, constant): the best S=1 validation accuracy among "
            f"{', '.join(choice['by_rate'])} whose S=1 chain memorises the backdoor (attack success >= "
            f"{MEMORISES}), mean of {len(SISA_SEEDS)} seeds",
            CONFIG.learning_rate,
            target=None,
            better="higher",
            unit="learning rate",
            peer=f"the issue's 1e-3: attack success {issue_rate['asr_S1_untouched']:.2f}, S=2 cost "
            f"{issue_rate['cost_points_S2']:.2f} points; chosen here {choice['chosen']}",
        ),
        headline(
            "batched exact (>=20 requests/window): worst amortised compute per request, fraction of naive per request "
            f"of the same sharded model ({name(worst_same)})",
            worst_same["compute_per_request_fraction_of_naive_same_S"],
            target=1 / 20,
            better="lower",
            unit="x naive",
            peer="naive per request: the whole model of the same S retrained from scratch (same run)",
        ),
        headline(
            "batched exact (>=20 requests/window): worst amortised compute per request, fraction of the S=1 "
            f"whole-model naive retrain ({name(worst_s1)}; includes sharding's per-block overhead)",
            worst_s1["compute_per_request_fraction_of_naive_S1"],
            target=1 / 20,
            better="lower",
            unit="x naive",
            peer="naive per request, S=1 (same run)",
        ),
        headline(
            "batched 1d, 20/day uniform, S=1: compute per request, fraction of naive",
            b1d["compute_per_request_fraction_of_naive_same_S"],
            target=1 / 20,
            better="lower",
            unit="x naive",
            peer="naive per request",
        ),
        headline(
            "batched 7d, 20/day uniform, S=1: compute per request, fraction of naive",
            b7d["compute_per_request_fraction_of_naive_same_S"],
            target=1 / 20,
            better="lower",
            unit="x naive",
            peer="naive per request",
        ),
        headline(
            "requests past deadline (all configurations)",
            sum(r["requests_past_deadline"] for r in rows),
            target=0,
            better="lower",
            unit="requests",
            peer="none",
        ),
        headline(
            "requests lost or applied twice (all configurations)",
            sum(r["requests_lost_or_applied_twice"] for r in rows),
            target=0,
            better="lower",
            unit="requests",
            peer="none",
        ),
        headline(
            f"time to first served version without the ids, p95, best rollback configuration ({name(best_rb)})",
            best_rb["time_to_forgotten_p95_s"],
            target=60,
            better="lower",
            unit="s",
            peer=f"time to full retrain p95 {best_rb['time_to_exact_p95_s']:.0f} s",
        ),
        headline(
            "time to first served version without the ids, p95, worst rollback configuration "
            f"({name(worst_rb)}; requests whose interim misses the floor count their retrain's end)",
            worst_rb["time_to_forgotten_p95_s"],
            target=60,
            better="lower",
            unit="s",
            peer=f"time to full retrain p95 {worst_rb['time_to_exact_p95_s']:.0f} s",
        ),
        headline(
            "served accuracy: worst drop below the pre-deletion model, S=1 without rollback (all windows, rates)",
            max(r["served_accuracy_max_drop_points"] for r in rows if r["shards"] == 1 and not r["rollback"]),
            target=2.0,
            better="lower",
            unit="points",
            peer="pre-deletion model",
        ),
        headline(
            "served accuracy: worst drop below the pre-deletion model, S=1 with rollback",
            max(r["served_accuracy_max_drop_points"] for r in rows if r["shards"] == 1 and r["rollback"]),
            target=2.0,
            better="lower",
            unit="points",
            peer="pre-deletion model",
        ),
        headline(
            f"served accuracy: worst drop below the pre-deletion model over all configurations ({name(worst_drop)})",
            worst_drop["served_accuracy_max_drop_points"],
            target=2.0,
            better="lower",
            unit="points",
            peer="pre-deletion model of the same S",
        ),
        headline(
            "backdoor attack success of every served version after the poison request's forget time: max deviation "
            f"from naive retraining of the same S ({name(worst_asr)})",
            worst_asr["asr_after_forget_max_deviation_from_naive_same_S_points"],
            target=1.0,
            better="lower",
            unit="points",
            peer="naive ASR "
            + ", ".join(f"S={S} {naive_asr[S]:.3f}" for S in SHARDS)
            + " (untouched "
            + ", ".join(f"S={S} {orig_asr[S]:.3f}" for S in SHARDS)
            + ")",
        ),
    ]
    if parallel is not None:
        for what, run, target in (
            (
                (
                    "(2 ChainWorker Ray actors, 1 torch thread each, a 20-request batch, median of 5 interleaved, "
                    "bench lock held; no rollback served, so each retrain evaluates held-out accuracy at M_B only)"
                ),
                parallel,
                0.6,
            ),
            (
                "as the first with E = 10 local epochs (twice the training per block, the same fixed costs per block)",
                parallel["epochs_10"],
                None,
            ),
        ):
            headlines.append(
                headline(
                    f"S=2 on 2 workers: wall time to exact / S=1, measured {what}",
                    run["ratio_median"],
                    target=target,
                    better="lower",
                    unit="ratio",
                    peer="S=1 on 1 worker, same batch and config, same run",
                )
            )
    headlines += [
        headline(
            "S=2 on 2 workers: retrain wall time to exact per batch / S=1, CPU-derived (batched 1d, 20/day uniform; "
            "measured block training CPU seconds plus one held-out evaluation per retrain, shards packed on 2 workers)",
            wall_exact[2] / wall_exact[1],
            target=0.6,
            better="lower",
            unit="ratio",
            peer="S=1",
        ),
        headline(
            "accuracy cost of S=2 (test, poison-free models: the exact = naive retrain without the poisoned ids; "
            f"one seed and 500 test samples, so the {len(SISA_SEEDS)}-seed row of the bench config carries the target)",
            100 * (s_acc_naive[1] - s_acc_naive[2]),
            target=None,
            better="lower",
            unit="points",
            peer="S=1",
        ),
        headline(
            "SISA's own accuracy cost of S=2 at this data size: plain training (no blocks), same recipe, "
            f"validation + test, mean of {len(SISA_SEEDS)} seeds",
            meta["sisa_plain"]["cost_points_S2"],
            target=None,
            better="lower",
            unit="points",
            peer="one model on all 4,000 samples, plain training",
        ),
        *(
            headline(
                f"accuracy cost of S=2 at E = {epochs} local epochs{' (the bench config)' if int(epochs) == E else ''}: "
                "chains of B/S blocks per shard (clean data, "
                f"validation + test, mean of {len(SISA_SEEDS)} seeds; S=1 chain's backdoor attack success "
                f"{row['asr_S1_untouched']:.2f})",
                row["chains"]["cost_points_S2"],
                target=1.0 if int(epochs) == E else None,
                better="lower",
                unit="points",
                peer=(
                    f"plain training (B = 1) at the same E: {row['plain']['cost_points_S2']:.2f}; S=4 chains "
                    f"{row['chains']['cost_points_S4']:.1f}, plain {row['plain']['cost_points_S4']:.1f}; S=2 chains "
                    "per seed: "
                    + ", ".join(
                        f"{100 * (a - b):.1f}"
                        for a, b in zip(row["chains"]["accuracy_S1"], row["chains"]["accuracy_S2"], strict=True)
                    )
                ),
            )
            for epochs, row in meta["shard_cost_by_epochs"]["by_epochs"].items()
        ),
        headline(
            f"accuracy cost of S=2 at E = {E}: chains of B = {B} blocks per shard (blocks of 1/S the size; the plan "
            f"this bench used before), validation + test, mean of {len(SISA_SEEDS)} seeds",
            meta["shard_cost_by_epochs"]["by_epochs"][str(E)]["chains_B_blocks_per_shard"]["cost_points_S2"],
            target=None,
            better="lower",
            unit="points",
            peer="S=4: "
            f"{meta['shard_cost_by_epochs']['by_epochs'][str(E)]['chains_B_blocks_per_shard']['cost_points_S4']:.1f}",
        ),
        headline(
            "accuracy cost of S=4 (test, poison-free models)",
            100 * (s_acc_naive[1] - s_acc_naive[4]),
            target=None,
            better="lower",
            unit="points",
            peer="S=1",
        ),
        headline(
            "accuracy cost of S=2 (test, pre-deletion poisoned models; the poison in recent blocks costs each S "
            "differently)",
            100 * (s_acc[1] - s_acc[2]),
            target=None,
            better="lower",
            unit="points",
            peer="S=1",
        ),
    ]
    for label, target in (
        (CLI_DEFAULTS, 0.5),
        ("earlier CLI defaults (B=6, E=3, Adam 1e-2 constant)", None),
        (BENCH_CONFIG, None),
        ("issue's memorising config (B=20, E=5, Adam 1e-3 constant)", None),
        ("B=20, E=5, Adam 3e-3 cosine to 30 %", None),
        ("B=20, E=5, Adam 3e-3 cosine to 2 %", None),
    ):
        headlines.append(
            headline(
                f"block tax of the {label}, mean of {len(TAX_SEEDS)} seeds",
                tax[label]["tax_points"],
                target=target,
                better="lower",
                unit="points",
                peer="plain training (B=1), same data and epochs",
            )
        )
    data = {
        "command": "nice -n 5 ./.venv/bin/python bench/deletion_stream.py --fresh  (takes /work/bench.lock itself "
        "for the block timing and the timed Ray part only; about 30 min from nothing on a quiet 2-core machine, "
        "5 min from the cache)",
        "setup": {
            "data": "mnist5k: 4000 train / 500 validation / 500 test",
            "model": "lenet5",
            "config": CONFIG.to_dict(),
            "poison": f"{POISON_COUNT} ids in global blocks {POISON_BLOCKS}, 3x3 white corner -> class {TARGET}; "
            "one request on day 10",
            "shard_block_plans": "B/S blocks per shard: shard k's block j = its samples of global blocks "
            "(j-1)S+1..jS (blocks are arrival order), so a shard block holds as many samples as an S=1 block",
            "workers": WORKERS,
            "served_floor": f"interim published only if its validation accuracy >= pre-deletion validation - "
            f"{FLOOR_POINTS} points + its margin; margin = paired_margin_points (z = 3): 100 * 3 * sqrt(2 q / 500), "
            "q = the candidate's disagreement with the pre-deletion model on the validation set; the vote is "
            "chosen by accuracy - margin; "
            "otherwise the batch flushes now and the version served so far stays until the retrain lands (the "
            "request's forget time = retrain end)",
            "shard_floor": "lowest shard final accuracy - 5 points; rolled-back shards also leave the vote when "
            "they lower the ensemble's validation accuracy",
            "compute_peer": "naive per request of the same S = all S shards retrained from scratch; also reported "
            "against the S=1 whole-model naive retrain",
            "asr_peer": "naive retraining of the same S (bit-identical to the exact retrain; checked per shard)",
            "interim_latency_s_assumed": INTERIM_LATENCY_S,
            "what_ran": "real: chains S=1,2,4, poison-free exact retrains and naive retrains of every affected "
            "shard, block tax (5 seeds), a timed Ray run of S=1 vs S=2; simulated (pure rules): arrivals, "
            "batching, rollback, compute = block-trainings x measured training CPU seconds per block "
            "+ one evaluation per retrain",
            "approximations": [
                "accuracy effect of the random deletions' data loss not modelled (common to every strategy)",
                "ids repeat across requests (a month at 100/day names more ids than the training set)",
                "naive per request: retrains counted, not queued (time to exact optimistic)",
                "retrained blocks are not published progressively in the simulation (interim stays until the batch lands)",
            ],
            "train_wall_seconds": train_wall,
            "simulation_wall_seconds": sim_wall,
        },
        "shards_measured": {
            S: [
                {
                    k: sh.get(k)
                    for k in (
                        "train_cpu_seconds",
                        "poison_first_block",
                        "poison_retrain_cpu_seconds",
                        "naive_cpu_seconds",
                        "exact_bit_identical_to_naive",
                    )
                }
                | {"block_cpu_seconds_sum": float(sum(sh["block_cpu_seconds"]))}
                for sh in meta["shards"][S]["shards"]
            ]
            for S in meta["shards"]
        },
        "block_timing": world["timing"],
        "s1_measured": {k: s1.get(k) for k in ("train_cpu_seconds", "poison_retrain_cpu_seconds", "naive_cpu_seconds")},
        "shard_test_accuracy": {str(S): v for S, v in s_acc.items()},
        "shard_test_accuracy_after_poison_deletion": {str(S): v for S, v in s_acc_naive.items()},
        "asr": {
            "untouched": {str(S): v for S, v in orig_asr.items()},
            "naive": {str(S): v for S, v in naive_asr.items()},
        },
        "block_tax": [row for row in meta["block_tax"] if row["config"] in TAX_CONFIGS],
        "sisa_plain_training": meta["sisa_plain"],
        "learning_rate_choice": choice,
        "shard_cost_by_epochs": meta["shard_cost_by_epochs"],
        "parallel": parallel,
        "configurations": rows,
    }
    path = write_result("deletion_stream", headlines=headlines, data=data, started=started)
    plot(rows, RESULTS / "deletion_stream.png")
    print(f"wrote {path}", file=sys.stderr)
    for h in headlines:
        print(f"  {h['metric']}: {h['value']} (target {h['target']})", file=sys.stderr)
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    sel = [r for r in rows if r["rate_per_day"] == 20.0 and r["ids"] == "uniform"]
    labels = [f"{r['strategy']}\nS={r['shards']}{' rb' if r['rollback'] else ''}" for r in sel]
    x = np.arange(len(sel))
    axes[0].bar(x, [r["compute_per_request_fraction_of_naive_same_S"] for r in sel])
    axes[0].axhline(1 / 20, color="r", ls="--", label="target 1/20")
    axes[0].set_yscale("log")
    axes[0].set_title("compute per request / naive of the same S (20/day, uniform)")
    axes[1].bar(x, [max(r["time_to_forgotten_p95_s"], 0.1) for r in sel], label="to forgotten p95")
    axes[1].scatter(x, [max(r["time_to_exact_p95_s"], 0.1) for r in sel], color="k", label="to exact p95", zorder=3)
    axes[1].axhline(60, color="r", ls="--")
    axes[1].set_yscale("log")
    axes[1].set_title("seconds from request to no-ids version")
    axes[2].bar(x, [r["served_accuracy_max_drop_points"] or 0 for r in sel])
    axes[2].axhline(2, color="r", ls="--")
    axes[2].set_title("worst served accuracy drop (points)")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
