"""`obliviate train` and `obliviate forget` from the command line, on the embedded default (file://)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.reconcile import reconcile_flow
from storage import ObjectStore
from storage.registry import RunRegistry

REPO = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.slow


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_then_forget_from_the_cli(tmp_path, prefect_api_url, ray_address):
    url = f"file://{tmp_path}/runs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "RAY_ADDRESS": ray_address}
    trained = _cli(
        "train",
        "--store",
        url,
        "--run-id",
        "cli-a",
        "--blocks",
        "3",
        "--epochs",
        "1",
        "--train-size",
        "300",
        "--heldout-size",
        "100",
        env=env,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["version"] == 1 and summary["trained_blocks"] == 3
    registry = RunRegistry(ObjectStore(url))
    ids = sorted(registry.spec("cli-a").train_ids[:2])

    bad = _cli("forget", "--store", url, "--ids", "1,one", env=env)
    assert bad.returncode == 2 and "comma-separated integers" in bad.stderr

    # --no-event: recorded only; the reconciliation (cron in `serve`) settles it.
    asked = _cli(
        "forget", "--store", url, "--ids", ",".join(map(str, ids)), "--reason", "cli test", "--no-event", env=env
    )
    assert asked.returncode == 0, asked.stderr[-3000:]
    request_id = json.loads(asked.stdout.strip().splitlines()[-1])["request_id"]
    result = reconcile_flow(store=url)
    assert result["settled"] == {request_id: "done"}
    status = _cli("forget", "--store", url, "--status", request_id, env=env)
    entry = json.loads(status.stdout)
    assert entry["status"] == "done" and [h["status"] for h in entry["history"]] == ["pending", "claimed", "done"]
    assert entry["details"]["runs"]["cli-a"]["to_version"] == 2
    assert set(ids) <= set(registry.current("cli-a").deleted_ids)
