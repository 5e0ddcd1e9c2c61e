"""How high can agreement with the target go? Twins of the target as the extraction bench's ceiling (issue 13).

On each of the extraction bench's splits (:func:`obliviate.extraction.audit.draw_split` and
:func:`~obliviate.extraction.audit.train_target`, the very functions and sizes of
``bench/extraction.py``), the target is retrained exactly as the bench trains it, and beside it:

* ``twin``: ``--twins`` LeNet-5 models with the target's recipe (1,500 Adam steps,
  :func:`~obliviate.extraction.substitute.train_classifier`) on the target's own training
  images and true labels, only another seed. Their agreement with the target is what two
  equally good models of this task share: an attacker who reproduced the target's training
  exactly, except for the seed, would get this much.
* ``twin_plus_pool_true``: the same recipe on the target's training images *plus* the attacker's
  whole pool (2,000 more images) with true labels: more and better-labelled data than any
  label-only attacker with this pool holds.
* ``twin_plus_pool_target``: the same, but the pool labelled by the target (what an attacker who
  also held the target's training set and bought the whole pool would train on).
* ``whole_pool_augmented``: the ``augmented`` attacker on the whole pool bought (2,000 queries, no
  unlabeled rest): the attacker's own ceiling for this pool without the target's data.

Each is measured on the bench's 1,000 test images: agreement with the target and accuracy. The
result goes to ``bench/results/extraction/ceiling.json``; ``python bench/extraction.py --merge ...``
folds it into ``bench/results/extraction.json`` (headline rows "agreement ceiling: ...").

Accuracy-only (no lock)::

    nice -n 10 python bench/extraction_ceiling.py --splits 0,1,2,3,4,5 --twins 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine
from bench.extraction import SIZES, split_setting
from obliviate.data import load_dataset
from obliviate.extraction.attackers import AttackOptions, train_substitute
from obliviate.extraction.substitute import TrainConfig, accuracy, predict_labels, train_classifier

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("twin", "twin_plus_pool_true", "twin_plus_pool_target", "whole_pool_augmented")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", default="0,1,2,3,4,5")
    p.add_argument("--twins", type=int, default=3, help="twins (other seeds) per split")
    p.add_argument("--target-steps", type=int, default=1500)
    p.add_argument("--name", default="extraction/ceiling")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = machine()
    data = load_dataset("mnist5k")
    t0 = time.perf_counter()
    rows: list[dict] = []
    splits: list[dict] = []
    for split in (int(s) for s in args.splits.split(",")):
        info, new = run_split(data, split, args)
        splits.append(info)
        rows.extend(new)
        write(args.name, splits, rows, vars(args), started, time.perf_counter() - t0)
    return 0


def run_split(data, split: int, args) -> tuple[dict, list[dict]]:
    t0 = time.perf_counter()
    setting = split_setting(data, split, target_steps=args.target_steps)
    cfg, train_idx, pool_idx, oracle = setting.config, setting.train_idx, setting.pool_idx, setting.oracle
    test_images, test_labels, target_test = setting.test_images, setting.test_labels, setting.target_test
    pool_images = data.images[pool_idx]
    pool_target = oracle.query(pool_images)
    info = {
        "split": split,
        "target_accuracy": accuracy(predicted=target_test, truth=test_labels),
        "target_train_seconds": time.perf_counter() - t0,
        "target_pool_accuracy": accuracy(predicted=pool_target, truth=data.labels[pool_idx]),
    }
    print(f"[split {split}] target accuracy {info['target_accuracy']:.4f}", flush=True)
    rows: list[dict] = []
    twin_preds: list[np.ndarray] = []

    def measure(kind: str, seed: int, model: torch.nn.Module, start: float, extra: dict) -> None:
        pred = predict_labels(model, images=test_images, levels=data.levels)
        if kind == "twin":
            twin_preds.append(pred)
        rows.append(
            {
                "kind": kind,
                "split": split,
                "seed": seed,
                "agreement": accuracy(predicted=pred, truth=target_test),
                "accuracy": accuracy(predicted=pred, truth=test_labels),
                "seconds": time.perf_counter() - start,
                **extra,
            }
        )
        r = rows[-1]
        print(f"[split {split}] {kind:22s} seed={seed} agr={r['agreement']:.4f} acc={r['accuracy']:.4f}", flush=True)

    train_x, train_y = data.images[train_idx], data.labels[train_idx]
    for j in range(1, args.twins + 1):
        seed = 10_000 + 100 * split + j  # never the target's seed (= split)
        start = time.perf_counter()
        model = train_classifier_like_target(train_x, train_y, cfg, seed, data)
        measure("twin", seed, model, start, {"train_images": len(train_x)})
    for kind, pool_y in (("twin_plus_pool_true", data.labels[pool_idx]), ("twin_plus_pool_target", pool_target)):
        seed = 20_000 + 100 * split
        start = time.perf_counter()
        x, y = np.concatenate([train_x, pool_images]), np.concatenate([train_y, pool_y])
        model = train_classifier_like_target(x, y, cfg, seed, data)
        measure(kind, seed, model, start, {"train_images": len(x)})
    seed = 1000 * split  # the bench's attacker seed for this split
    start = time.perf_counter()
    sub = train_substitute(
        "augmented",
        images=pool_images,
        labels=pool_target,
        unlabeled=pool_images[:0],
        options=AttackOptions(),
        seed=seed,
        levels=data.levels,
    )
    measure("whole_pool_augmented", seed, sub.model, start, {"queries": len(pool_images)})
    if len(twin_preds) > 1:
        pairs = [
            accuracy(predicted=a, truth=b) for i, a in enumerate(twin_preds) for b in twin_preds[i + 1 :]
        ]  # twin-to-twin: the same quantity without the target
        info["twin_pairwise_agreement"] = float(np.mean(pairs))
    info["split_seconds"] = time.perf_counter() - t0
    return info, rows


def train_classifier_like_target(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, seed: int, data) -> torch.nn.Module:
    """The target's recipe (train_target calls train_classifier with these arguments), another seed."""
    return train_classifier(images=x, labels=y, config=cfg, seed=seed, num_classes=data.num_classes, levels=data.levels)


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per kind: mean and spread over splits of the per-split mean (twins averaged within a split first)."""
    out = {}
    for kind in KINDS:
        per_split: dict[int, list[float]] = {}
        per_split_acc: dict[int, list[float]] = {}
        for r in rows:
            if r["kind"] == kind:
                per_split.setdefault(r["split"], []).append(r["agreement"])
                per_split_acc.setdefault(r["split"], []).append(r["accuracy"])
        if not per_split:
            continue
        agr = np.array([np.mean(v) for v in per_split.values()])
        acc = np.array([np.mean(v) for v in per_split_acc.values()])
        out[kind] = {
            "splits": sorted(per_split),
            "models": sum(len(v) for v in per_split.values()),
            "agreement_mean": float(agr.mean()),
            "agreement_std": float(agr.std()),
            "agreement_min": float(agr.min()),
            "agreement_max": float(agr.max()),
            "accuracy_mean": float(acc.mean()),
            "per_split_agreement": {int(s): float(np.mean(v)) for s, v in per_split.items()},
        }
    return out


def write(name: str, splits: list[dict], rows: list[dict], config: dict, started: dict, seconds: float) -> None:
    (RESULTS / name).parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "what": "agreement ceiling of the extraction bench: twins of the target (bench/extraction_ceiling.py)",
        "config": config | {"sizes": SIZES},
        "splits": splits,
        "summary": summarize(rows),
        "rows": rows,
        "seconds": seconds,
        "machine": started
        | {"load_average_at_end": list(os.getloadavg()), "contended": "2 cores shared with the lead's benchmarks"},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {RESULTS / (name + '.json')} ({len(rows)} models, {seconds:.0f}s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
