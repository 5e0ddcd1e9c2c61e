"""Model-extraction audit on real MNIST: attackers, selectors and peers (issue 13; SPEC 3, 3b).

Per split ``s`` (:func:`obliviate.extraction.audit.draw_split` with seed ``s``, the same split
``obliviate target train --seed s`` + ``obliviate steal`` use): a LeNet-5 target trained on
2,000 images (1,500 Adam steps, :func:`train_target`), a disjoint pool of 2,000 images for the
attacker, 1,000 test images. For every budget and configuration ``attacker:selector`` the
attacker buys labels (label-only target, counted), trains a LeNet-5 substitute, and we measure
agreement with the target and accuracy (true labels) on the test set, FGSM transferability at
eps 0.3, and seconds per cell. Peers in the same run: the ``basic`` trainer, random queries, and
(``--art``) ART 1.20.1 KnockoffNets (random) and CopycatCNN on the same label-only target, with
an epoch count that gives about ``--art-steps`` optimiser steps at every budget (ART's fixed
epochs would starve small budgets).

Outputs ``bench/results/<name>.json`` (headline, config, cells, summaries, queries-to-agreement,
machine with load averages) and ``<name>.md`` / ``<name>.png``.

Usage (from the repository root; what was committed is in ``bench/results/extraction.md``)::

    nice -n 10 python bench/extraction.py --splits 0 --configs semi_supervised:cluster_centers,\\
        basic:cluster_centers,semi_supervised:random --art knockoff_random --name extraction/split0
    nice -n 10 python bench/extraction.py --splits 3 --configs semi_supervised:cluster_centers,\\
        basic:cluster_centers --name extraction/confirm3                     # one process per split
    nice -n 10 python bench/extraction_default_cost.py      # CPU seconds of one default cell per budget
    python bench/extraction.py --merge extraction/split0,...,extraction/adaptive_r8_2 --name extraction  # list: config.merged_from

The committed run added, on splits 0-2 in separate processes (same seeded targets), the previous
default and ART's CopycatCNN::

    nice -n 10 python bench/extraction.py --splits 0 --configs pseudo_label:cluster_centers \\
        --art copycat --name extraction/extra0

The adaptive selector (``semi_supervised:adaptive``, 4 rounds) and, on the confirmation splits,
random queries and ART KnockoffNets were added later in the same way (same seeded targets)::

    nice -n 10 python bench/extraction.py --splits 0 --budgets 300,600,150 \\
        --configs semi_supervised:adaptive --name extraction/adaptive0        # and adaptive0_50 at 50
    nice -n 10 python bench/extraction.py --splits 3 --budgets 300,600,150,50 \\
        --configs semi_supervised:adaptive,semi_supervised:random --art knockoff_random --name extraction/confirm3b

``--configs semi_supervised:adaptive_r8`` (bench-only: the adaptive selector with 8 rounds) ran on
splits 0-2 at 150/300/600 the same way (``extraction/adaptive_r8_<split>``), and
``--configs semi_supervised:adaptive_cc`` (bench-only: round 0 by ``cluster_centers`` instead of
k-center) on splits 0-5 at all four budgets (``extraction/adaptive_cc_a`` for splits 0-2,
``adaptive_cc_b`` for 3-5). The default attacker, ``semi_supervised_ensemble``, ran on splits 0-5 at
all four budgets the same way (``extraction/ensemble_a`` for splits 0-2, ``ensemble_b`` for 3-5); the
rows labelled ``semi_supervised`` are its one-substitute member from the earlier runs, paired by split.

The default attacker with the adaptive selector (``semi_supervised_ensemble:adaptive``) ran on splits
0-5 the same way (``extraction/ens_adaptive_a`` for splits 0-2 and ``ens_adaptive_b`` for 3-5 at
600/300/150, ``ens_adaptive_50a`` / ``ens_adaptive_50b`` at 50).

The audit's default selector, ``auto`` (``cluster_centers`` below 150 queries, ``adaptive`` from 150),
ran with the default attacker on splits 0-5 at all four budgets (``extraction/ens_auto_a`` for splits
0-2, ``ens_auto_b`` for 3-5); those cells are the headline rows.

The agreement ceiling (twins of the target, ``bench/extraction_ceiling.py``) is written to
``extraction/ceiling.json`` and folded in by ``--merge``.

The attackers' options were set on splits 11 and 12 (never reported); splits 0-2 are the reported splits
and 3-5 the confirmation splits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine
from obliviate.data import load_dataset
from obliviate.extraction.active import AUDIT_SELECTOR
from obliviate.extraction.attackers import DEFAULT_ATTACKER, AttackOptions
from obliviate.extraction.audit import (
    BENCH_SPLIT_SIZES,
    DEFAULT_SEEDS,
    SEED_BUDGETS,
    SEED_TABLE,
    draw_split,
    run_cell,
    summarize,
    train_target,
)
from obliviate.extraction.headline import queries_to_agreement
from obliviate.extraction.selectors import DEFAULT_SELECTOR, SELECTORS, Pool
from obliviate.extraction.substitute import TrainConfig, accuracy, predict_labels
from obliviate.extraction.target import LocalTorchBackend, OutputMode, Target

RESULTS = Path(__file__).resolve().parent / "results"
#: What ``obliviate steal`` runs by default: the headline rows.
AUDIT = f"{DEFAULT_ATTACKER}:{AUDIT_SELECTOR}"
#: The default attacker with the label-free default selector (the audit's default before ``auto``):
#: the ensemble-vs-one-substitute and adaptive-vs-one-shot pairings are made on it.
DEFAULT = f"{DEFAULT_ATTACKER}:{DEFAULT_SELECTOR}"
#: The default's one member: the attacker the random-query, adaptive and previous-default cells ran with.
SINGLE = "semi_supervised"
CONFIGS = (
    AUDIT,
    DEFAULT,
    f"basic:{DEFAULT_SELECTOR}",
    f"{SINGLE}:{DEFAULT_SELECTOR}",
    f"{SINGLE}:random",
)
#: one definition: `target train` + `steal` on mnist5k draw this split, and the report names it the bench's
SIZES = dict(zip(("train", "pool", "test"), BENCH_SPLIT_SIZES, strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", default="0")
    p.add_argument("--budgets", default="50,150,300,600")
    p.add_argument("--configs", default=",".join(CONFIGS), help="attacker:selector pairs")
    p.add_argument("--art", default="", help="ART peers to add: knockoff_random,copycat (needs the bench extra)")
    p.add_argument("--art-steps", type=int, default=600, help="about this many optimiser steps per ART fit")
    p.add_argument("--target-steps", type=int, default=1500)
    p.add_argument("--name", default="extraction")
    p.add_argument("--merge", default="", help="comma-separated result names to merge into --name")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge.split(","), args.name)
    torch.set_num_threads(1)
    started = machine()
    configs = [tuple(c.split(":")) for c in args.configs.split(",") if c]
    for _, sel in configs:
        if sel.startswith("adaptive_r") and sel not in SELECTORS:
            _register_adaptive_rounds(int(sel.removeprefix("adaptive_r")))
        if sel == "adaptive_cc" and sel not in SELECTORS:
            _register_adaptive_variant(sel, first_round="cluster_centers")
    unknown = [s for _, s in configs if s not in SELECTORS]
    if unknown:
        raise SystemExit(f"unknown selectors {unknown}")
    budgets = [int(b) for b in args.budgets.split(",")]
    data = load_dataset("mnist5k")
    t0 = time.perf_counter()
    splits, cells = [], []
    config = vars(args) | {"budgets": budgets}
    for split in (int(s) for s in args.splits.split(",")):

        def partial(info: dict, new: list[dict]) -> None:
            conf = config | {"complete": False}
            write(args.name, [*splits, info], cells + new, conf, started, time.perf_counter() - t0)

        info, new = run_split(data, split, budgets, configs, args, partial)
        splits.append(info)
        cells.extend(new)
    write(args.name, splits, cells, config | {"complete": True}, started, time.perf_counter() - t0)
    return 0


def _register_adaptive_rounds(rounds: int) -> None:
    """Bench-only selector ``adaptive_r<R>``: the adaptive selector with ``R`` rounds (its default is 4)."""
    _register_adaptive_variant(f"adaptive_r{rounds}", rounds=rounds)


def _register_adaptive_variant(name: str, *, rounds: int = 4, first_round: str = "kcenter") -> None:
    """A bench-only adaptive selector with other :class:`~obliviate.extraction.active.ActiveOptions`."""
    from obliviate.extraction.active import ActiveOptions, adaptive
    from obliviate.extraction.selectors import selector

    options = ActiveOptions(rounds=rounds, first_round=first_round)

    def fn(pool: Pool, *, k: int, rng: np.random.Generator, target: Target, train: TrainConfig):
        return adaptive(pool, k=k, rng=rng, target=target, train=train, options=options)

    fn.__doc__ = f"The adaptive selector with {rounds} rounds, round 0 by {first_round}."
    selector(name, needs_target=True, needs_substitute=True)(fn)


@dataclass(frozen=True)
class SplitSetting:
    """One split of the bench: the target trained on its own data, the attacker's pool, the test set."""

    target: torch.nn.Module
    config: TrainConfig
    train_idx: np.ndarray
    pool_idx: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    oracle: Target
    target_test: np.ndarray


def split_setting(data, split: int, *, target_steps: int) -> SplitSetting:
    """Train split ``split``'s target (seed = split) and draw its pool and test set, as the CLI does."""
    config = TrainConfig(arch="lenet5", steps=target_steps)
    target, meta = train_target(data, train_size=SIZES["train"], config=config, seed=split)
    train_idx, pool_idx, test_idx = draw_split(
        data.labels, train_size=SIZES["train"], pool_size=SIZES["pool"], test_size=SIZES["test"], seed=split
    )
    assert sorted(train_idx.tolist()) == meta["train_indices"]  # "split s" means one thing (issue 13, fix 4)
    test_images = data.images[test_idx]
    oracle = Target(LocalTorchBackend(target), budget=None)
    return SplitSetting(
        target, config, train_idx, pool_idx, test_images, data.labels[test_idx], oracle, oracle.query(test_images)
    )


def run_split(data, split: int, budgets: list[int], configs, args, partial) -> tuple[dict, list[dict]]:
    t0 = time.perf_counter()
    setting = split_setting(data, split, target_steps=args.target_steps)
    target, target_test = setting.target, setting.target_test
    test_images, test_labels = setting.test_images, setting.test_labels
    pool = Pool(data.images[setting.pool_idx], levels=data.levels)
    info = {
        "split": split,
        "target_accuracy": accuracy(predicted=target_test, truth=test_labels),
        "target_train_seconds": time.perf_counter() - t0,
    }
    print(f"[split {split}] target accuracy {info['target_accuracy']:.4f}", flush=True)
    cells = []
    for budget in budgets:  # budget-major: a run cut short still has every configuration at small budgets
        for attack, sel in configs:
            cells.append(measure_cell(setting, pool, split=split, budget=budget, attack=attack, selector=sel))
            _log(split, cells[-1])
        for peer in [p for p in args.art.split(",") if p]:
            cells.append(art_cell(peer, target, pool, budget, split, test_images, test_labels, target_test, args))
            _log(split, cells[-1])
        partial(info, cells)
    info["split_seconds"] = time.perf_counter() - t0
    return info, cells


def measure_cell(
    setting: SplitSetting,
    pool: Pool,
    *,
    split: int,
    budget: int,
    attack: str,
    selector: str,
    output: OutputMode = OutputMode.LABELS,
) -> dict:
    """One bench cell: ``attack`` with ``selector`` buys ``budget`` queries of split ``split``'s target, answered
    as ``output`` (labels, the label-only threat of issue 13, or class probabilities), seeded by the split.

    Returns:
        the cell's record plus ``split``, ``target_output`` and ``cpu_seconds``.
    """
    options = AttackOptions()
    attacker = Target(LocalTorchBackend(setting.target), budget=budget, output=output)
    cpu0 = time.process_time()
    cell = run_cell(
        selector=selector,
        budget=budget,
        seed=1000 * split,
        pool=pool,
        attacker=attacker,
        oracle=setting.oracle,
        test_images=setting.test_images,
        test_labels=setting.test_labels,
        train=TrainConfig(arch="lenet5", steps=options.basic_steps),
        eps=(0.3,),
        oracle_test_labels=setting.target_test,
        attack=attack,
        attack_options=options,
    )
    if attacker.used != budget:
        raise RuntimeError(f"{attack}/{selector} spent {attacker.used} queries, not its budget {budget}")
    # CPU seconds of the process (one torch thread): the cell's cost on an idle core.
    return cell.to_dict() | {
        "split": split,
        "target_output": attacker.output.value,
        "cpu_seconds": time.process_time() - cpu0,
    }


def art_cell(peer, target, pool, budget, split, test_images, test_labels, target_test, args) -> dict:
    """ART 1.20.1 KnockoffNets(random) / CopycatCNN against the same label-only, counted target."""
    from art.attacks.extraction import CopycatCNN, KnockoffNets
    from art.estimators.classification import PyTorchClassifier

    from obliviate.models import build_model

    start = time.perf_counter()
    counted = Target(LocalTorchBackend(target), budget=budget)

    class LabelOnly(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            images = np.clip(np.rint(x[:, 0].detach().numpy() * 255), 0, 255).astype(np.uint8)
            return torch.nn.functional.one_hot(torch.from_numpy(counted.query(images)), 10).float()

    victim = PyTorchClassifier(
        LabelOnly(), loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10, clip_values=(0, 1)
    )
    thief_model = build_model("lenet5", seed=1000 * split)
    thief = PyTorchClassifier(
        thief_model,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(thief_model.parameters(), lr=1e-3),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0, 1),
    )
    batch = 32
    epochs = max(25, int(np.ceil(args.art_steps * batch / budget)))
    common = {"batch_size_fit": batch, "batch_size_query": 256, "nb_epochs": epochs, "nb_stolen": budget}
    np.random.seed(1000 * split)  # ART draws its random subset and batches from the global RNGs
    torch.manual_seed(1000 * split)
    if peer == "copycat":
        attack = CopycatCNN(victim, **common)
    else:
        attack = KnockoffNets(victim, sampling_strategy="random", verbose=False, **common)
    x = pool.images[:, None].astype(np.float32) / 255.0
    stolen = attack.extract(x, thieved_classifier=thief)
    sub = predict_labels(stolen.model, images=test_images)
    return {
        "attacker": f"art_{peer}",
        "selector": "random",
        "budget": budget,
        "seed": 1000 * split,
        "split": split,
        "queries": counted.used,
        "accuracy": accuracy(predicted=sub, truth=test_labels),
        "agreement": accuracy(predicted=sub, truth=target_test),
        "transfer": {},
        "class_histogram": [],
        "mean_entropy": float("nan"),
        "synthetic": 0,
        "seconds": time.perf_counter() - start,
        "substitute": "lenet5",
        "extra": {"nb_epochs": epochs, "batch_size_fit": batch},
    }


def _log(split: int, c: dict) -> None:
    print(
        f"[split {split}] {c['attacker']:16s} {c['selector']:16s} k={c['budget']:4d} acc={c['accuracy']:.4f} "
        f"agr={c['agreement']:.4f} queries={c['queries']} {c['seconds']:.1f}s",
        flush=True,
    )


def merge(names: list[str], name: str) -> int:
    """Combine per-split result files into one result."""
    docs = [json.loads((RESULTS / f"{n}.json").read_text()) for n in names]
    # A split run in several files (peers added later) is one split: the target is retrained identically.
    splits = list({s["split"]: s for d in docs for s in d["splits"]}.values())
    cells = [c for d in docs for c in d["cells"]]
    config = dict(docs[0]["config"]) | {
        "merged_from": names,
        "configs_per_file": {n: d["config"]["configs"] for n, d in zip(names, docs)},
    }
    started = docs[0]["machine"] | {
        "load_average_per_file": {n: d["machine"].get("load_average_at_start") for n, d in zip(names, docs)}
    }
    write(name, splits, cells, config, started, sum(d["seconds"] for d in docs), references=True)
    return 0


def write(
    name: str,
    splits: list[dict],
    cells: list[dict],
    config: dict,
    started: dict,
    seconds: float,
    *,
    references: bool = False,
) -> None:
    """Write ``<name>.json/.md/.png``; ``references`` (a merge) adds the agreement ceiling of
    ``extraction/ceiling.json`` (``bench/extraction_ceiling.py``) when it exists."""
    import os

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).parent.mkdir(parents=True, exist_ok=True)
    budgets = sorted({int(c["budget"]) for c in cells})
    rows = summarize(cells)
    by = {(r.attacker, r.selector, r.budget): r for r in rows}
    reported = {s["split"] for s in splits}
    reach = {}
    for atk, sel in {(c["attacker"], c["selector"]) for c in cells}:
        for level in (0.9, 0.95):
            reach[f"{atk}:{sel}@{level:g}"] = queries_to_agreement(
                cells, attacker=atk, selector=sel, level=level, group="split"
            ).to_dict()
    headline = _headline(by, budgets, reach, splits, cells)
    ceiling_path = RESULTS / "extraction" / "ceiling.json"
    ceiling = json.loads(ceiling_path.read_text()) if references and ceiling_path.exists() else None
    adaptive = _adaptive_pairs(cells)
    headline += (
        _adaptive_headline(adaptive)
        + _ensemble_headline(cells)
        + (_ceiling_headline(ceiling, cells) if ceiling else [])
    )
    headline += _e2e_headline() if references else []
    doc = {
        "headline": headline,
        "config": config | {"sizes": SIZES, "attack_options": asdict(AttackOptions())},
        "seed_table": {"budgets": list(SEED_BUDGETS), **SEED_TABLE},
        "splits": splits,
        "summary": [asdict(r) | {"label": r.label} for r in rows],
        "queries_to_agreement": reach,
        "cells": cells,
        "seconds": seconds,
        "machine": started | {"load_average_at_end": list(os.getloadavg()), "contended": "2 cores shared by 5 helpers"},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "splits_reported": sorted(reported),
        "adaptive_vs_one_shot": adaptive,
    }
    if ceiling:
        doc["agreement_ceiling"] = {k: ceiling[k] for k in ("what", "config", "splits", "summary", "rows", "machine")}
        doc["agreement_ceiling"]["date"] = ceiling["date"]
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    (RESULTS / f"{name}.md").write_text(_markdown(doc, rows))
    _plot(RESULTS / f"{name}.png", rows, ceiling["summary"] if ceiling else None)
    print(f"wrote {RESULTS / (name + '.json')} ({len(cells)} cells, {seconds:.0f}s)", flush=True)


def _peer_text(by, budget: int, metric: str) -> str:
    parts = []
    for label, key in (
        (
            f"{DEFAULT_ATTACKER} with {DEFAULT_SELECTOR} (the default before {AUDIT_SELECTOR})",
            (DEFAULT_ATTACKER, DEFAULT_SELECTOR),
        ),
        ("basic", ("basic", DEFAULT_SELECTOR)),
        (f"{SINGLE} (one member of the default)", (SINGLE, DEFAULT_SELECTOR)),
        (f"random queries ({SINGLE})", (SINGLE, "random")),
        ("ART KnockoffNets", ("art_knockoff_random", "random")),
        ("ART CopycatCNN", ("art_copycat", "random")),
        ("pseudo_label (the default before FixMatch)", ("pseudo_label", DEFAULT_SELECTOR)),
        (f"adaptive selector ({SINGLE})", (SINGLE, "adaptive")),
        (f"adaptive selector ({DEFAULT_ATTACKER})", (DEFAULT_ATTACKER, "adaptive")),
    ):
        r = by.get((*key, budget))
        if r is not None:
            parts.append(f"{label} {100 * getattr(r, metric + '_mean'):.2f}")
    return "; ".join(parts) or None


def _headline(by, budgets, reach, splits, cells) -> list[dict]:
    out = []
    agree_target = dict(zip((50, 150, 300, 600), (93, 95, 96, 97)))
    seed_acc = dict(zip(SEED_BUDGETS, SEED_TABLE["drmi"]["accuracy"]))
    target_acc = 100 * float(np.mean([s["target_accuracy"] for s in splits]))
    for b in budgets:
        r = by.get((DEFAULT_ATTACKER, AUDIT_SELECTOR, b))
        if r is None:
            continue
        out.append(
            {
                "metric": f"default attacker ({AUDIT}) mean agreement, budget {b} ({r.runs} splits)",
                "value": round(100 * r.agreement_mean, 2),
                "target": agree_target.get(b),
                "better": "higher",
                "unit": "%",
                "peer": _peer_text(by, b, "agreement"),
            }
        )
        goal = seed_acc.get(b)
        if goal is not None and target_acc < goal:
            goal = round(target_acc - 0.5, 2)  # the rule: within 0.5 points of the target
        out.append(
            {
                "metric": f"default attacker mean test accuracy, budget {b} (target model {target_acc:.2f} %)",
                "value": round(100 * r.accuracy_mean, 2),
                "target": goal,
                "better": "higher",
                "unit": "%",
                "peer": f"seed's DRMI {seed_acc.get(b)}; " + (_peer_text(by, b, "accuracy") or ""),
            }
        )
    for atk, sel in (
        (DEFAULT_ATTACKER, AUDIT_SELECTOR),
        (DEFAULT_ATTACKER, DEFAULT_SELECTOR),
        ("basic", DEFAULT_SELECTOR),
    ):
        for level in (0.9, 0.95):
            q = reach.get(f"{atk}:{sel}@{level:g}")
            if q is None:
                continue
            per = ", ".join(
                f"split {k}: {v if v is not None else '>' + str(max(q['budgets']))}" for k, v in q["per_group"].items()
            )
            out.append(
                {
                    "metric": f"queries to {100 * level:g} % agreement, {atk}:{sel} (mean curve; {per})",
                    "value": q["mean"],
                    "target": None,
                    "better": "lower",
                    "unit": "queries (budget grid; null = not reached by 600)",
                    "peer": "basic" if atk != "basic" else DEFAULT_ATTACKER,
                }
            )
    for atk in sorted({c["attacker"] for c in cells}):
        # One-shot selectors only: the adaptive selector's in-loop training has its own row below.
        secs = [c["seconds"] for c in cells if c["attacker"] == atk and not _in_the_loop(c["selector"])]
        if not secs:
            continue
        out.append(
            {
                "metric": f"seconds per cell, {atk} (one-shot selectors; mean over budgets and splits; contended machine)",
                "value": round(float(np.mean(secs)), 1),
                "target": None,
                "better": "lower",
                "unit": "s",
                "peer": "basic",
            }
        )
    cpu = RESULTS / "extraction" / "default_audit_cpu.json"
    default = [c for c in cells if c["attacker"] == DEFAULT_ATTACKER and c["selector"] == AUDIT_SELECTOR]
    if default and not cpu.exists():  # wall times on a contended machine: only when no CPU-second figure exists
        per_budget = {b: float(np.mean([c["seconds"] for c in default if c["budget"] == b])) for b in budgets}
        # The default audit: 5 budgets (50,150,200,300,600) x DEFAULT_SEEDS on 2 Ray workers; 200 interpolated.
        five = list(per_budget.values()) + [float(np.interp(200, list(per_budget), list(per_budget.values())))]
        out.append(
            {
                "metric": f"whole default audit of one model (5 budgets x {DEFAULT_SEEDS} seeds on 2 cores), estimated from cell times",
                "value": round(DEFAULT_SEEDS * sum(five) / 2 / 60, 1),
                "target": 15,
                "better": "lower",
                "unit": "min",
                "peer": "cell times measured on a machine shared by 5 helpers (see machine.load_average_*)",
            }
        )
    if cpu.exists():
        # CPU seconds of one default cell per budget (one thread): the idle-machine cost of a cell.
        per = json.loads(cpu.read_text())["cells"]
        out.append(
            {
                "metric": f"whole default audit of one model (5 budgets x {DEFAULT_SEEDS} seeds on 2 cores), from CPU seconds per cell",
                "value": round(DEFAULT_SEEDS * sum(v["cpu_s"] for v in per.values()) / 2 / 60, 1),
                "target": 15,
                "better": "lower",
                "unit": "min",
                "peer": "CPU seconds per cell: " + ", ".join(f"k={k} {v['cpu_s']:.0f}s" for k, v in per.items()),
            }
        )
    return out


def _adaptive_verdict(pairs: list[dict]) -> str:
    """One sentence per adaptive selector: where its paired gain over the default one-shot selector
    (same attacker) exceeds the spread (std over splits) of the paired differences."""
    lines = []
    for sel in sorted({p["selector"] for p in pairs}, key=lambda t: (len(t), t)):
        one_shot = f"{sel.split(':')[0]}:{DEFAULT_SELECTOR}"
        rows = [p for p in pairs if p["selector"] == sel and p["peer"] == one_shot]
        beyond = [p["budget"] for p in rows if p["difference_mean"] > p["difference_std"]]
        text = ", ".join(
            f"{p['budget']}: {100 * p['difference_mean']:+.2f} ± {100 * p['difference_std']:.2f}" for p in rows
        )
        lines.append(
            f"`{sel}` ({rows[0]['rounds'] if rows else '?'} rounds) minus `{one_shot}`, paired, by budget: {text} "
            f"points; the mean gain exceeds the spread of the paired differences at "
            f"{', '.join(map(str, beyond)) or 'no budget'}."
        )
    return " ".join(lines)


def _e2e_headline() -> list[dict]:
    """The end-to-end default audit (``bench/extraction_audit_e2e.py``), kept across merges."""
    from bench.extraction_audit_e2e import METRIC

    path = RESULTS / "extraction" / "default_audit_e2e.json"
    if not path.exists():
        return []
    e2e = json.loads(path.read_text())
    return [
        {
            "metric": METRIC,
            "value": round(e2e["steal_seconds"] / 60, 2),
            "target": 15,
            "better": "lower",
            "unit": "minutes",
            "peer": (
                f"target training before it {e2e['target_train_seconds']:.0f} s; loads {e2e['load_before'][0]:.1f} -> "
                f"{e2e['load_after'][0]:.1f}; command: bench/extraction_audit_e2e.py"
            ),
        }
    ]


def _in_the_loop(sel: str) -> bool:
    """Whether the selector trains substitutes between query rounds (bench-only ``adaptive_*`` variants too)."""
    return sel.startswith("adaptive") or (sel in SELECTORS and SELECTORS[sel].needs_substitute)


def _rounds(sel: str) -> int:
    from obliviate.extraction.active import ActiveOptions

    return int(sel.removeprefix("adaptive_r")) if sel.startswith("adaptive_r") else ActiveOptions().rounds


def _cpu_mean(cells: list[dict]) -> float | None:
    cpu = [c["cpu_seconds"] for c in cells if c.get("cpu_seconds") is not None]
    return float(np.mean(cpu)) if cpu else None


def _adaptive_pairs(cells: list[dict]) -> list[dict]:
    """Adaptive selectors (``adaptive``, bench-only ``adaptive_r<R>``) against one-shot selectors,
    paired by split (same target, same seed)."""
    out = []
    adaptive_pairs = sorted(
        {
            (c["attacker"], c["selector"])
            for c in cells
            if c["attacker"] in (SINGLE, DEFAULT_ATTACKER) and c["selector"].startswith("adaptive")
        }
    )
    for atk, sel in adaptive_pairs:
        adaptive = {(c["budget"], c["split"]): c for c in cells if (c["attacker"], c["selector"]) == (atk, sel)}
        for budget in sorted({b for b, _ in adaptive}):
            for peer in (DEFAULT_SELECTOR, "random") + (("adaptive",) if sel != "adaptive" else ()):
                others = {
                    c["split"]: c for c in cells if (c["attacker"], c["selector"], c["budget"]) == (atk, peer, budget)
                }
                common = sorted(s for b, s in adaptive if b == budget and s in others)
                if not common:
                    continue
                mine = [adaptive[budget, s] for s in common]
                theirs = [others[s] for s in common]
                a = np.array([c["agreement"] for c in mine])
                o = np.array([c["agreement"] for c in theirs])
                out.append(
                    {
                        "selector": f"{atk}:{sel}",
                        "rounds": _rounds(sel),
                        "budget": budget,
                        "peer": f"{atk}:{peer}",
                        "splits": common,
                        "adaptive_agreement_mean": float(a.mean()),
                        "adaptive_agreement_std": float(a.std()),
                        "peer_agreement_mean": float(o.mean()),
                        "peer_agreement_std": float(o.std()),
                        "difference_per_split": [float(d) for d in a - o],
                        "difference_mean": float((a - o).mean()),
                        "difference_std": float((a - o).std()),
                        "adaptive_accuracy_mean": float(np.mean([c["accuracy"] for c in mine])),
                        "peer_accuracy_mean": float(np.mean([c["accuracy"] for c in theirs])),
                        "adaptive_seconds_mean": float(np.mean([c["seconds"] for c in mine])),
                        "peer_seconds_mean": float(np.mean([c["seconds"] for c in theirs])),
                        # CPU seconds (one torch thread) where the cell recorded them; pairs where both did.
                        "adaptive_cpu_seconds_mean": _cpu_mean(mine),
                        "cpu_pairs": [
                            [m["cpu_seconds"], t["cpu_seconds"]]
                            for m, t in zip(mine, theirs)
                            if m.get("cpu_seconds") is not None and t.get("cpu_seconds") is not None
                        ],
                    }
                )
    return out


def _adaptive_headline(pairs: list[dict]) -> list[dict]:
    out = []
    one_shot = RESULTS / "extraction" / "default_audit_cpu.json"
    reference = json.loads(one_shot.read_text())["cells"] if one_shot.exists() else {}
    for sel, budget in sorted({(p["selector"], p["budget"]) for p in pairs}, key=lambda t: (len(t[0]), t)):
        ps = {p["peer"]: p for p in pairs if (p["selector"], p["budget"]) == (sel, budget)}
        main = ps.get(DEFAULT) or next(iter(ps.values()))
        parts = []
        for peer, p in ps.items():
            diffs = " / ".join(f"{100 * d:+.1f}" for d in p["difference_per_split"])
            parts.append(
                f"{peer} on the same splits {100 * p['peer_agreement_mean']:.2f} (adaptive minus it per split {diffs}; "
                f"mean {100 * p['difference_mean']:+.2f} ± {100 * p['difference_std']:.2f})"
            )
        cost = [f"wall s / cell {main['adaptive_seconds_mean']:.0f} (contended machine)"]
        if main["adaptive_cpu_seconds_mean"] is not None:
            cost.append(f"CPU s / cell {main['adaptive_cpu_seconds_mean']:.0f}")
        pairs_cpu = [c for p in ps.values() for c in p["cpu_pairs"] if p["peer"].endswith(":random")]
        if pairs_cpu:
            ratio = np.mean([a / b for a, b in pairs_cpu])
            cost.append(f"{ratio:.2f}x the CPU of the one-shot random cell on the same split")
        elif str(budget) in reference:
            cost.append(
                f"one default one-shot cell {reference[str(budget)]['cpu_s']:.0f} CPU s (default_audit_cpu.json)"
            )
        parts.append(", ".join(cost))
        out.append(
            {
                "metric": (
                    f"adaptive selector ({sel}, {main['rounds']} rounds"
                    f"{', round 0 by cluster_centers' if sel.endswith('adaptive_cc') else ''}) mean agreement, "
                    f"budget {budget} (splits {', '.join(map(str, main['splits']))})"
                ),
                "value": round(100 * main["adaptive_agreement_mean"], 2),
                "target": None,
                "better": "higher",
                "unit": "%",
                "peer": "; ".join(parts),
            }
        )
    return out


CEILING_LABELS = {
    "twin": "agreement ceiling: independently retrained twin of the target (same data, other seed)",
    "twin_plus_pool_true": (
        "agreement ceiling: twin trained on the target's data plus the attacker's whole pool with true labels "
        "(same recipe, other seed)"
    ),
    "twin_plus_pool_target": (
        "agreement reference: twin trained on the target's data plus the whole pool labelled by the target"
    ),
    "whole_pool_augmented": "agreement reference: attacker buying the whole pool (2,000 queries), augmented trainer",
}


def _default_at(cells: list[dict], budget: int, splits: list[int]) -> tuple[float, list[int]]:
    got = {
        c["split"]: c["agreement"]
        for c in cells
        if (c["attacker"], c["selector"], c["budget"]) == (DEFAULT_ATTACKER, AUDIT_SELECTOR, budget)
        and c["split"] in splits
    }
    return (float(np.mean(list(got.values()))) if got else float("nan")), sorted(got)


def _ensemble_headline(cells: list[dict]) -> list[dict]:
    """The default (``semi_supervised_ensemble``) against one ``semi_supervised`` substitute, paired by
    split: the same bought labels, and its member 0 is that substitute."""
    out = []

    def of(attack: str, budget: int) -> dict[int, dict]:
        return {
            c["split"]: c
            for c in cells
            if (c["attacker"], c["selector"], c["budget"]) == (attack, DEFAULT_SELECTOR, budget)
        }

    for budget in sorted({c["budget"] for c in cells if c["attacker"] == DEFAULT_ATTACKER}):
        ensemble, single = of(DEFAULT_ATTACKER, budget), of(SINGLE, budget)
        common = sorted(set(ensemble) & set(single))
        if not common or DEFAULT_ATTACKER == SINGLE:
            continue
        e = np.array([100 * ensemble[s]["agreement"] for s in common])
        d = np.array([100 * single[s]["agreement"] for s in common])
        cpu = [(ensemble[s].get("cpu_seconds"), single[s].get("cpu_seconds")) for s in common]
        ratio = np.mean([a / b for a, b in cpu if a and b]) if all(a and b for a, b in cpu) else None
        out.append(
            {
                "metric": (
                    f"default attacker ({DEFAULT}) minus one {SINGLE} substitute (its member 0), mean agreement "
                    f"gain, budget {budget} (splits {', '.join(map(str, common))}, paired)"
                ),
                "value": round(float(np.mean(e - d)), 2),
                "target": None,
                "better": "higher",
                "unit": "points",
                "peer": (
                    f"{SINGLE}:{DEFAULT_SELECTOR} {d.mean():.2f} vs the default {e.mean():.2f} (per split "
                    f"{' / '.join(f'{x:+.1f}' for x in e - d)}; ± {np.std(e - d):.2f}); test accuracy "
                    f"{np.mean([100 * single[s]['accuracy'] for s in common]):.2f} vs "
                    f"{np.mean([100 * ensemble[s]['accuracy'] for s in common]):.2f}"
                    + (f"; CPU per cell {ratio:.1f}x" if ratio is not None else "")
                ),
            }
        )
    return out


def _ceiling_headline(ceiling: dict, cells: list[dict]) -> list[dict]:
    out = []
    for kind, label in CEILING_LABELS.items():
        row = ceiling["summary"].get(kind)
        if row is None:
            continue
        default, _common = _default_at(cells, 600, row["splits"])
        per = ", ".join(f"split {k}: {100 * v:.1f}" for k, v in row["per_split_agreement"].items())
        count = f"{row['models']} models" if kind == "twin" else "one per split"
        out.append(
            {
                "metric": f"{label}, mean over splits {', '.join(map(str, row['splits']))} ({count}; {per})",
                "value": round(100 * row["agreement_mean"], 2),
                "target": None,
                "better": "higher",
                "unit": "%",
                "peer": (
                    f"default attacker at 600 on the same splits {100 * default:.2f}; spread over splits "
                    f"{100 * row['agreement_min']:.1f}-{100 * row['agreement_max']:.1f}; its test accuracy "
                    f"{100 * row['accuracy_mean']:.2f}"
                ),
            }
        )
    return out


def _ceiling_markdown(doc: dict) -> list[str]:
    ceiling = doc.get("agreement_ceiling")
    if not ceiling:
        return []
    summary, cells = ceiling["summary"], doc["cells"]
    out = [
        "",
        "## Agreement ceiling: twins of the target (`bench/extraction_ceiling.py`)",
        "",
        (
            "Each split's target retrained exactly as above; beside it LeNet-5 models trained with the target's own "
            "recipe (1,500 Adam steps) and a different seed. Agreement with the target on the same 1,000 test images "
            "(percent; mean ± std over splits of the per-split mean, min-max in brackets):"
        ),
        "",
        "| reference | splits | models | agreement | test accuracy | default attacker at 600, same splits |",
        "|---|---|---|---|---|---|",
    ]
    for kind, label in CEILING_LABELS.items():
        r = summary.get(kind)
        if r is None:
            continue
        default, _ = _default_at(cells, 600, r["splits"])
        out.append(
            f"| {label.split(': ', 1)[1]} | {len(r['splits'])} | {r['models']} | {100 * r['agreement_mean']:.2f} ± "
            f"{100 * r['agreement_std']:.2f} ({100 * r['agreement_min']:.1f}-{100 * r['agreement_max']:.1f}) | "
            f"{100 * r['accuracy_mean']:.2f} | {100 * default:.2f} |"
        )
    twin = summary.get("twin")
    if twin:
        pair = [s["twin_pairwise_agreement"] for s in ceiling["splits"] if "twin_pairwise_agreement" in s]
        t = 100 * twin["agreement_mean"]
        default, _ = _default_at(cells, 600, twin["splits"])
        close = [goal for goal in (95, 96, 97) if goal > t - 0.5]
        pool_true = summary.get("twin_plus_pool_true")
        whole = summary.get("whole_pool_augmented")
        text = (
            f"What this means: a model trained exactly like the target, on the target's own 2,000 images with "
            f"true labels, differing only in its seed, agrees with the target on {t:.2f} % of the test images "
            f"(per split {100 * twin['agreement_min']:.1f}-{100 * twin['agreement_max']:.1f}; twins with each "
            f"other: {100 * float(np.mean(pair)):.2f} %). That is what two equally good models of this task share; "
            "the rest are each model's own idiosyncratic errors, which no amount of correctly labelled data "
            f"reveals. The default attacker at 600 queries ({100 * default:.2f} %) is {t - 100 * default:.2f} "
            "points below the twin, without the target's training data. "
        )
        goals = []
        for budget, goal in ((150, 95), (300, 96), (600, 97)):
            reached, _ = _default_at(cells, budget, twin["splits"])
            where = (
                "above the twin: asks a label-only thief without the target's data to copy the target more "
                "closely than a retrained copy of the target itself does"
                if goal > t
                else (
                    f"{t - goal:.2f} points below the twin"
                    + (
                        ", within the twin's own spread over splits"
                        if goal >= round(100 * twin["agreement_min"], 1)
                        else ""
                    )
                )
            )
            goals.append(f"{goal} % at {budget} queries (default {100 * reached:.2f} %): {where}")
        text += "The issue's agreement targets against this ceiling: " + "; ".join(goals) + ". "
        if close:
            text += (
                f"So {' / '.join(f'{g} %' for g in close)} {'asks' if len(close) == 1 else 'ask'} for the agreement "
                "of an identically trained "
                "model with the target's own data, not of an attacker with a pool and a budget. "
            )
        if pool_true:
            text += (
                f"More data with true labels does not raise the ceiling: the target's data plus the whole pool "
                f"with true labels (same recipe) agrees {100 * pool_true['agreement_mean']:.2f} %, less than the twin "
                "(true labels teach none of the target's own errors; probably also because the same 1,500 steps see "
                "each image half as often), so it is no upper bound on agreement. "
            )
        if whole:
            text += (
                f"An attacker buying all 2,000 pool labels (augmented trainer) reaches "
                f"{100 * whole['agreement_mean']:.2f} %, about what the default reaches with 600 queries and the rest "
                "of the pool unlabeled: above 600 queries, buying more labels from this pool gains next to nothing."
            )
        out += ["", text]
    return out


def _markdown(doc: dict, rows) -> str:
    splits = doc["splits"]
    out = [
        f"# Model extraction on MNIST 5k: attackers and selectors ({len(splits)} split runs)",
        "",
        "Target LeNet-5 on 2,000 images (draw_split seed = split); accuracy on its 1,000 test images: "
        + ", ".join(f"split {s['split']} {100 * s['target_accuracy']:.2f} %" for s in splits)
        + ".",
        (
            "Threat model: label-only counted queries; pool (2,000) and test set (1,000) disjoint from the target's "
            "training images; every substitute is LeNet-5 (the target's architecture: assumed known). `basic` uses "
            "the bought labels only; `augmented` adds label-preserving affine augmentation; `pseudo_label` adds "
            "confident pseudo-labels of the unlabeled pool; `semi_supervised` adds FixMatch consistency "
            "training on the unlabeled pool instead; `semi_supervised_ensemble` (default) averages the softmax of "
            "three `semi_supervised` substitutes (seeds s, s+1, s+2). Selector `auto` (the audit's default) buys "
            "`cluster_centers` below 150 queries and runs `adaptive` rounds (the target answers between rounds) from "
            "150; ART peers use random queries and ART's own trainer (with label-only "
            "answers and the same seeds, ART 1.20.1's CopycatCNN and KnockoffNets(random) buy the same images and "
            "train alike: their rows coincide)."
        ),
        "",
        "## Headline",
        "",
        "| metric | value | target | peer |",
        "|---|---|---|---|",
    ]
    for h in doc["headline"]:
        out.append(f"| {h['metric']} | {h['value']} {h['unit']} | {h['target']} | {h['peer']} |")
    out += [
        "",
        "## All cells (percent, mean ± std over splits)",
        "",
        "| attacker | selector | budget | runs | agreement | accuracy | FGSM ε=0.3 transfer | s / cell |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tr = r.transfer_mean.get("0.3")
        out.append(
            f"| {r.attacker} | {r.selector} | {r.budget} | {r.runs} | {100 * r.agreement_mean:.2f} ± "
            f"{100 * r.agreement_std:.2f} | {100 * r.accuracy_mean:.2f} ± {100 * r.accuracy_std:.2f} | "
            f"{'–' if tr is None else f'{100 * tr:.2f}'} | {r.seconds_mean:.1f} |"
        )
    if doc.get("adaptive_vs_one_shot"):
        out += [
            "",
            "## Adaptive selector against one-shot selectors, paired by split (same target, same seed)",
            "",
            (
                "| selector | rounds | budget | peer | splits | adaptive agreement | peer agreement | "
                "adaptive minus peer per split | mean ± std | wall s / cell adaptive vs peer |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in doc["adaptive_vs_one_shot"]:
            out.append(
                f"| {p['selector']} | {p['rounds']} | {p['budget']} | {p['peer']} | {', '.join(map(str, p['splits']))} | "
                f"{100 * p['adaptive_agreement_mean']:.2f} | {100 * p['peer_agreement_mean']:.2f} | "
                f"{' / '.join(f'{100 * d:+.1f}' for d in p['difference_per_split'])} | "
                f"{100 * p['difference_mean']:+.2f} ± {100 * p['difference_std']:.2f} | "
                f"{p['adaptive_seconds_mean']:.0f} vs {p['peer_seconds_mean']:.0f} |"
            )
        out += ["", _adaptive_verdict(doc["adaptive_vs_one_shot"])]
    out += _ceiling_markdown(doc)
    return "\n".join(out) + "\n"


def _plot(path: Path, rows, ceiling: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("agreement", "accuracy")):
        for label in dict.fromkeys(r.label for r in rows):
            rs = sorted((r for r in rows if r.label == label), key=lambda r: r.budget)
            ax.errorbar(
                [r.budget for r in rs],
                [100 * getattr(r, f"{key}_mean") for r in rs],
                yerr=[100 * getattr(r, f"{key}_std") for r in rs],
                marker="o",
                ms=3,
                capsize=2,
                label=label,
                lw=2.2 if label == f"{DEFAULT_ATTACKER} / {AUDIT_SELECTOR}" else 1.0,
            )
        if key == "accuracy":
            ax.plot(SEED_BUDGETS, SEED_TABLE["drmi"]["accuracy"], "k--", label="seed's DRMI")
        elif ceiling and "twin" in ceiling:
            ax.axhline(100 * ceiling["twin"]["agreement_mean"], color="k", ls=":", lw=1, label="twin of the target")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel("query budget")
        ax.set_title(f"substitute {key} %")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
