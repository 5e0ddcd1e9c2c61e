"""Verify of a sharded run: shards replayed side by side on Ray against one after another in the command.

``obliviate verify --run G`` of a sharded run (``train --shards S``) replays each shard's chain (SPEC 6). By
default it replays them as Ray tasks of one CPU each (:func:`flows.verify.verify_shards`); with
``--in-process`` one after another in its own process, without Ray (``verify_shards(in_process=True)``).
Both are timed here, as a user runs them, in fresh processes, interleaved:

* ``fan_out``: ``obliviate verify --run G`` (a Prefect server started by the command, a local Ray runtime started
  alongside it, one Ray task per shard), and ``fan_out_no_prefect``: the same with ``--no-prefect`` (Ray alone);
* ``in_process`` and ``in_process_no_prefect`` (the peers): the same commands with ``--in-process``.

Setup (not timed): ``obliviate train --shards S`` of mnist5k (LeNet-5, B blocks per shard, E epochs per block) in a
fresh ``file://`` store. Each side must pass (every replayed block bit-identical) or the bench stops.

Run: ``nice -n 5 ./.venv/bin/python bench/verify_shards.py [--shards S] [--epochs E] [--repeats R] [--result NAME]``;
writes ``bench/results/NAME.json`` (default ``verify_shards``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import headline, machine, write_result

ROOT = Path(__file__).resolve().parents[1]
OBLIVIATE = [sys.executable, "-m", "flows.cli"]


def _timed(command: list[str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds of ``command`` and the JSON of its last stdout line; stops the bench if it fails."""
    began = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    failed = [r["run_id"] for r in report["shards"] if r["status"] != "passed"]
    if failed:
        raise SystemExit(f"{' '.join(command)}: shard(s) {failed} did not pass")
    return seconds, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=6, help="blocks per shard")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--result", default="verify_shards", help="written to bench/results/RESULT.json")
    args = parser.parse_args(argv)
    started = machine()
    with tempfile.TemporaryDirectory(prefix="bench-verify-shards-") as folder:
        url = f"file://{folder}/store"
        train = [
            *OBLIVIATE,
            "train",
            "--store",
            url,
            "--run-id",
            "g",
            "--data",
            "mnist5k",
            "--shards",
            str(args.shards),
            "--blocks",
            str(args.blocks),
            "--epochs",
            str(args.epochs),
        ]
        began = time.perf_counter()
        subprocess.run(train, cwd=ROOT, capture_output=True, text=True, check=True)
        train_s = time.perf_counter() - began
        print(f"trained {args.shards} shards in {train_s:.1f} s", file=sys.stderr)
        verify = [*OBLIVIATE, "verify", "--store", url, "--run", "g"]
        sides = {
            "fan_out": verify,  # a Prefect server started by the command, Ray started alongside it
            "in_process": [*verify, "--in-process"],
            "fan_out_no_prefect": [*verify, "--no-prefect"],
            "in_process_no_prefect": [*verify, "--no-prefect", "--in-process"],
        }
        seconds: dict[str, list[float]] = {side: [] for side in sides}
        replay_s: dict[str, list[list[float]]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
            for side in order:
                wall, report = _timed(sides[side])
                seconds[side].append(wall)
                replay_s[side].append([r["seconds"] for r in report["shards"]])
                print(f"repeat {repeat}: {side} {wall:.1f} s", file=sys.stderr)
    median = {side: statistics.median(values) for side, values in seconds.items()}
    command = (
        f"nice -n 5 ./.venv/bin/python bench/verify_shards.py --shards {args.shards} --blocks {args.blocks} "
        f"--epochs {args.epochs} --repeats {args.repeats} --result {args.result}"
    )
    headlines = []
    for fan_out, peer, how in [
        ("fan_out", "in_process", "with Prefect (a flow run, artifacts)"),
        ("fan_out_no_prefect", "in_process_no_prefect", "--no-prefect"),
    ]:
        headlines += [
            headline(
                f"verify of a {args.shards}-shard run {how}, shards side by side on Ray (median wall s, every start-up "
                "included)",
                round(median[fan_out], 2),
                target=None,
                better="lower",
                unit="s",
                peer=f"--in-process, shards one after another in the command's process: {median[peer]:.2f} s",
            ),
            headline(
                f"speed-up of verify {how} on Ray over --in-process (the shards one after another)",
                round(median[peer] / median[fan_out], 3),
                target=None,
                better="higher",
                unit="x",
                peer=f"--in-process: 1.0 ({os.cpu_count()} CPUs)",
            ),
        ]
    path = write_result(
        args.result,
        headlines=headlines,
        data={
            "command": command,
            "setup": {
                "data": "mnist5k",
                "model": "lenet5",
                "shards": args.shards,
                "blocks_per_shard": args.blocks,
                "epochs": args.epochs,
                "train_seconds": train_s,
            },
            "wall_seconds": seconds,
            "replay_seconds_per_shard": replay_s,
        },
        started=started,
    )
    print(", ".join(f"{side} {value:.2f} s" for side, value in median.items()) + f"; {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
