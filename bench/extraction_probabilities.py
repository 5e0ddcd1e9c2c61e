"""The probabilities threat (SPEC 3's switch): the same attackers against the same target, answered with labels
vs class probabilities, in one run.

``bench/extraction.py`` measures the label-only oracle issue 13 asks about. An owner whose API returns class
probabilities (``obliviate steal --target-output probabilities``) needs the same figures for that API: how much
closer does a thief get when each query buys a whole softmax row instead of its argmax? Per split ``s``
(:func:`bench.extraction.split_setting`: the target ``obliviate target train --seed s`` trains, its disjoint pool
and test set), every budget and every configuration ``attacker:selector`` runs twice with the same seed, once per
answer form (:func:`bench.extraction.measure_cell`): the queries bought are counted the same (one per image) and
only what they return differs. The metrics are the bench's: agreement with the target and accuracy (true labels)
on the test set, FGSM transferability at eps 0.3, CPU seconds per cell.

Configurations (default): the audit's default attacker and selector (``bench.extraction.AUDIT``) and
``basic`` with the label-free default selector (the bench's ``basic`` row).

Outputs ``bench/results/<name>.json``: ``headline`` (per configuration and budget, the mean agreement with
probabilities; its peer the labels row of the same run on the same splits, with the paired differences),
``machine``, ``date``, ``command``, and the data (config, splits, cells, summaries per answer form, paired
differences, queries to 90 % / 95 % agreement per answer form). Budget-major over the splits, written after each
budget: a run cut short keeps every split at the smaller budgets (``config.complete`` says whether it finished).

Usage (from the repository root; what was committed is in the result's ``command``)::

    nice -n 10 python bench/extraction_probabilities.py --splits 0,1,2 --budgets 50,150,300,600
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import headline, machine, write_result
from bench.extraction import AUDIT, SIZES, measure_cell, split_setting
from obliviate.data import load_dataset
from obliviate.extraction.attackers import AttackOptions
from obliviate.extraction.audit import summarize
from obliviate.extraction.headline import queries_to_agreement
from obliviate.extraction.selectors import DEFAULT_SELECTOR, SELECTORS, Pool
from obliviate.extraction.substitute import accuracy
from obliviate.extraction.target import OutputMode

CONFIGS = (AUDIT, f"basic:{DEFAULT_SELECTOR}")
MODES = (OutputMode.LABELS, OutputMode.PROBABILITIES)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", default="0,1,2")
    p.add_argument("--budgets", default="50,150,300,600")
    p.add_argument("--configs", default=",".join(CONFIGS), help="attacker:selector pairs")
    p.add_argument("--target-steps", type=int, default=1500)
    p.add_argument("--name", default="extraction_probabilities")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = machine()
    command = "nice -n 10 python bench/extraction_probabilities.py " + shlex.join(argv)
    configs = [tuple(c.split(":")) for c in args.configs.split(",") if c]
    unknown = [s for _, s in configs if s not in SELECTORS]
    if unknown:
        raise SystemExit(f"unknown selectors {unknown}")
    budgets = [int(b) for b in args.budgets.split(",")]
    split_ids = [int(s) for s in args.splits.split(",")]
    data = load_dataset("mnist5k")
    t0 = time.perf_counter()
    settings, splits = {}, []
    for split in split_ids:  # every target first: the budget-major loop below visits each split at each budget
        s0 = time.perf_counter()
        settings[split] = split_setting(data, split, target_steps=args.target_steps)
        target_accuracy = accuracy(predicted=settings[split].target_test, truth=settings[split].test_labels)
        splits.append(
            {"split": split, "target_accuracy": target_accuracy, "target_train_seconds": time.perf_counter() - s0}
        )
        print(f"[split {split}] target accuracy {target_accuracy:.4f}", flush=True)
    pools = {s: Pool(data.images[settings[s].pool_idx], levels=data.levels) for s in split_ids}
    config = vars(args) | {"budgets": budgets, "sizes": SIZES, "modes": [m.value for m in MODES], "complete": False}
    cells: list[dict] = []
    for budget in budgets:
        for split in split_ids:
            for attack, sel in configs:
                for mode in MODES:
                    cell = measure_cell(
                        settings[split],
                        pools[split],
                        split=split,
                        budget=budget,
                        attack=attack,
                        selector=sel,
                        output=mode,
                    )
                    cells.append(cell)
                    print(
                        f"[split {split}] {attack}:{sel} k={budget} {mode.value:13s} agr={cell['agreement']:.4f} "
                        f"acc={cell['accuracy']:.4f} cpu={cell['cpu_seconds']:.0f}s",
                        flush=True,
                    )
        write(args.name, command, config, splits, cells, started, time.perf_counter() - t0)
    write(args.name, command, config | {"complete": True}, splits, cells, started, time.perf_counter() - t0)
    return 0


def paired(cells: list[dict]) -> list[dict]:
    """Per configuration and budget: probabilities minus labels, split by split (same target, seed and budget)."""
    by = {(c["attacker"], c["selector"], c["budget"], c["split"], c["target_output"]): c for c in cells}
    out = []
    for atk, sel, budget in sorted({(c["attacker"], c["selector"], c["budget"]) for c in cells}):
        both = [
            (split, by[atk, sel, budget, split, "labels"], by[atk, sel, budget, split, "probabilities"])
            for split in sorted({c["split"] for c in cells})
            if (atk, sel, budget, split, "labels") in by and (atk, sel, budget, split, "probabilities") in by
        ]
        if not both:
            continue

        def mean(metric: str, mode: int, rows: list = both) -> float:
            return float(np.mean([row[mode][metric] for row in rows]))

        gains = [100 * (prob["agreement"] - lab["agreement"]) for _, lab, prob in both]
        out.append(
            {
                "attacker": atk,
                "selector": sel,
                "budget": budget,
                "splits": [split for split, _, _ in both],
                "agreement_labels": 100 * mean("agreement", 1),
                "agreement_probabilities": 100 * mean("agreement", 2),
                "agreement_gain_per_split": gains,
                "agreement_gain_mean": float(np.mean(gains)),
                "agreement_gain_std": float(np.std(gains)),
                "accuracy_labels": 100 * mean("accuracy", 1),
                "accuracy_probabilities": 100 * mean("accuracy", 2),
                "transfer_labels": 100 * float(np.mean([lab["transfer"]["0.3"] for _, lab, _ in both])),
                "transfer_probabilities": 100 * float(np.mean([prob["transfer"]["0.3"] for _, _, prob in both])),
                "cpu_seconds_labels": mean("cpu_seconds", 1),
                "cpu_seconds_probabilities": mean("cpu_seconds", 2),
            }
        )
    return out


def headlines(pairs: list[dict]) -> list[dict]:
    """One entry per configuration and budget: agreement with probabilities, the labels row its peer."""
    out = []
    for row in pairs:
        splits = ", ".join(str(s) for s in row["splits"])
        per_split = " / ".join(f"{g:+.1f}" for g in row["agreement_gain_per_split"])
        out.append(
            headline(
                f"{row['attacker']}:{row['selector']} mean agreement with the target, queries answered with class "
                f"probabilities, budget {row['budget']} (splits {splits})",
                round(row["agreement_probabilities"], 2),
                target=None,  # a measurement: issue 13 sets targets for the label-only oracle only
                better="higher",
                unit="%",
                peer=(
                    f"labels (same run, target, seeds and budget) {row['agreement_labels']:.2f}; probabilities minus "
                    f"labels per split {per_split} (mean {row['agreement_gain_mean']:+.2f} ± "
                    f"{row['agreement_gain_std']:.2f} points); test accuracy {row['accuracy_probabilities']:.2f} vs "
                    f"{row['accuracy_labels']:.2f}; FGSM transfer at 0.3 {row['transfer_probabilities']:.1f} vs "
                    f"{row['transfer_labels']:.1f}; CPU s / cell {row['cpu_seconds_probabilities']:.0f} vs "
                    f"{row['cpu_seconds_labels']:.0f}"
                ),
            )
        )
    return out


def write(
    name: str, command: str, config: dict, splits: list[dict], cells: list[dict], started: dict, seconds: float
) -> None:
    """Write ``bench/results/<name>.json`` (the headline, machine, date, command and every cell)."""
    pairs = paired(cells)
    summary, reach = {}, {}
    for mode in MODES:
        mine = [c for c in cells if c["target_output"] == mode.value]
        summary[mode.value] = [asdict(r) | {"label": r.label} for r in summarize(mine)] if mine else []
        for atk, sel in sorted({(c["attacker"], c["selector"]) for c in mine}):
            for level in (0.9, 0.95):
                found = queries_to_agreement(mine, attacker=atk, selector=sel, level=level, group="split")
                reach[f"{atk}:{sel}@{level:g}/{mode.value}"] = found.to_dict()
    path = write_result(
        name,
        headlines=headlines(pairs),
        data={
            "command": command,
            "config": config | {"attack_options": asdict(AttackOptions())},
            "splits": splits,
            "paired": pairs,
            "summary": summary,
            "queries_to_agreement": reach,
            "cells": cells,
            "seconds": seconds,
        },
        started=started | {"contended": "2 cores shared by 6 helpers; one torch thread"},
    )
    print(f"wrote {path} ({len(cells)} cells, {seconds:.0f}s)", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
