"""CPU seconds of one default-audit cell per budget (issue 13): the idle-machine cost of the audit.

One cell = the audit's default selector (``AUDIT_SELECTOR``), the default attacker (``DEFAULT_ATTACKER``), FGSM at eps 0.1/0.2/0.3,
on split 0 (pool 2,000, test 1,000). Process CPU time on one torch thread is what the cell's wall
time would be on an idle core; ``bench/extraction.py --merge`` turns it into the headline "whole
default audit" figure. Writes ``bench/results/extraction/default_audit_cpu.json``.

Usage: ``nice -n 10 python bench/extraction_default_cost.py``
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from obliviate.data import load_dataset
from obliviate.extraction.active import AUDIT_SELECTOR
from obliviate.extraction.attackers import DEFAULT_ATTACKER, AttackOptions
from obliviate.extraction.audit import draw_split, run_cell, train_target
from obliviate.extraction.selectors import Pool
from obliviate.extraction.substitute import TrainConfig
from obliviate.extraction.target import LocalTorchBackend, Target


def main() -> int:
    torch.set_num_threads(1)
    data = load_dataset("mnist5k")
    target, _ = train_target(data, train_size=2000, config=TrainConfig(steps=300), seed=0)
    _, pool_idx, test_idx = draw_split(data.labels, train_size=2000, pool_size=2000, test_size=1000, seed=0)
    pool = Pool(data.images[pool_idx])
    cells = {}
    for k in (50, 150, 200, 300, 600):
        wall, cpu = time.perf_counter(), time.process_time()
        run_cell(
            selector=AUDIT_SELECTOR,
            budget=k,
            seed=0,
            pool=pool,
            attacker=Target(LocalTorchBackend(target), budget=k),
            oracle=Target(LocalTorchBackend(target), budget=None),
            test_images=data.images[test_idx],
            test_labels=data.labels[test_idx],
            eps=(0.1, 0.2, 0.3),
            attack=DEFAULT_ATTACKER,
            attack_options=AttackOptions(),
        )
        cells[str(k)] = {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}
        print(k, cells[str(k)], flush=True)
    doc = {
        "what": __doc__.splitlines()[0],
        "command": "nice -n 10 python bench/extraction_default_cost.py",
        "cells": cells,
        "load_average_at_end": list(os.getloadavg()),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    out = Path(__file__).resolve().parent / "results" / "extraction" / "default_audit_cpu.json"
    out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
