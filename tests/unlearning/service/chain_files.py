"""What a run's chains hold in the store, read as a test sees it: checkpoint blocks, block ids, and ``store check``.

Shared by the tests of interrupted trainings, dead-training sweeps, unused unlearning chains and lost claims.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import ObjectStore

REPO = Path(__file__).resolve().parents[3]


def chain_blocks(store: ObjectStore, run_id: str) -> dict[str, list[int]]:
    """chain folder -> stored checkpoint blocks of ``run_id``."""
    out: dict[str, list[int]] = {}
    for key in store.list(f"runs/{run_id}/chains"):
        if key.endswith(".pt"):
            out.setdefault(key.split("/")[3], []).append(int(key[-7:-3]))
    return {chain: sorted(blocks) for chain, blocks in out.items()}


def id_in_block(store: ObjectStore, block: int, run_id: str) -> int:
    """A dataset id that ``run_id``'s stored block plan puts in ``block``."""
    plan = store.get_json(f"runs/{run_id}/plan.json")
    spec = store.get_json(f"runs/{run_id}/spec.json")
    return int(spec["train_ids"][int(plan["blocks"][block - 1][0])])


def wait_for_block(
    store: ObjectStore, process: subprocess.Popen, block: int, run_id: str, *, timeout: float = 240.0
) -> str:
    """Wait until ``run_id``'s chain holds checkpoint ``block`` while ``process`` trains it; its chain folder."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for chain, blocks in chain_blocks(store, run_id).items():
            if block in blocks:
                return chain
        if process.poll() is not None:
            pytest.fail(f"the training ended before block {block}: {process.communicate()[1][-3000:]}")
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"no checkpoint {block} of {run_id} within {timeout} s")


def store_check_cli(url: str, *extra: str) -> tuple[int, str, dict]:
    """``obliviate store check --store url *extra`` as a user runs it: exit code, stderr, and its JSON report."""
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "store", "check", "--store", url, *extra],
        cwd=REPO,
        env=env | {"PYTHONPATH": str(REPO), "PREFECT_API_URL": "http://127.0.0.1:9/api"},  # it needs no Prefect
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.returncode, done.stderr, json.loads(done.stdout.strip().splitlines()[-1])
