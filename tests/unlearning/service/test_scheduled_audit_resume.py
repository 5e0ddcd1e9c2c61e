"""A scheduled audit that stopped part-way left nothing for the next one (flows.audit.audit_flow's ``cells_dir``).

``obliviate steal`` keeps an unfinished audit's finished cells beside its report, and the same command again runs only
the others; the scheduled audit (serve's 03:00 cron) wrote its report into a temporary folder, so the cells of an
audit whose process died went with it, and the next night's audit ran every cell again. Here the audit's process is
killed (SIGKILL, as a lost machine) once one cell is kept; the next audit of the same version takes that cell.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.train import run_spec
from storage import ObjectStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
# basic's cell takes seconds; augmented's, at 2000 steps, far longer: the kill lands between the two
GRID = {
    "budgets": [10],
    "selectors": ["random"],
    "attackers": ["basic", "augmented"],
    "steps": 20,
    "attack_steps": 2000,
}


def _kept_cell(cells: Path, process: subprocess.Popen, *, timeout: float = 300.0) -> Path:
    """The kept file of the audit's basic cell, once written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(cells.glob("*/report/.cells-*/basic-random-k10-seed0.json"))
        if found:
            return found[0]
        if process.poll() is not None:
            pytest.fail(f"the audit ended before its basic cell was kept: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no basic cell kept within {timeout} s")


@pytest.fixture
def run_f(store_url, tiny_run) -> str:
    """Run "f" trained and published in ``store_url`` (a 100-image held-out part: a pool and test set to audit on)."""
    ChainWorker(store_url).train(
        run_spec(run_id="f", **tiny_run(blocks=3, train_size=300, heldout_size=100, split_seed=0))
    )
    return "f"


@pytest.fixture(params=["single chain", "sharded"])
def audited_run(request, store_url, tiny_run) -> tuple[str, str]:
    """A run to audit, and its report's key. The sharded run "g" is queried through a server on a new port each
    audit: its audit was named by that address, so the next one took none of its cells and started over.
    """
    if request.param == "single chain":
        return request.getfixturevalue("run_f"), "runs/f/audits/v000001/report.json"
    options = tiny_run(blocks=3, train_size=300, heldout_size=100, split_seed=0)
    for shard in range(2):
        ChainWorker(store_url).train(run_spec(run_id="g", shards=2, shard=shard, **options))
    ObjectStore(store_url).put_json(
        "groups/g.json", {"run_id": "g", "members": ["g-s0of2", "g-s1of2"], "rule": "mean_probability"}
    )
    return "g", "runs/g/audits/v000001-v000001/report.json"


def test_a_scheduled_audit_killed_part_way_leaves_its_finished_cells_to_the_next(
    store_url, audited_run, tmp_path, prefect_api_url, ray_address
) -> None:
    from flows.audit import audit_flow

    run, report_key = audited_run
    cells = tmp_path / "cells"
    code = (
        f"from flows.audit import audit_flow\naudit_flow(store={store_url!r}, cells_dir={str(cells)!r}, **{GRID!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "RAY_ADDRESS": ray_address}
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        kept = _kept_cell(cells, process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)
    measured = json.loads(kept.read_text())
    assert not ObjectStore(store_url).exists(report_key)

    reports = audit_flow(store=store_url, cells_dir=str(cells), **GRID)

    assert reports[run]["status"] == "audited", reports
    body = ObjectStore(store_url).get_json(report_key)
    basic = [c for c in body["cells"] if c["attacker"] == "basic"]
    augmented = [c for c in body["cells"] if c["attacker"] == "augmented"]
    assert len(basic) == 1 and len(augmented) == 1, body["cells"]
    # taken, not run again: a rerun would measure its own seconds
    assert basic[0]["seconds"] == measured["seconds"] and basic[0]["agreement"] == measured["agreement"]
    assert not cells.exists(), sorted(cells.rglob("*"))  # the report stored: nothing left behind


def test_a_scheduled_audit_whose_cells_folder_cannot_be_written_still_audits(
    store_url, run_f, tmp_path, prefect_api_url, ray_address
) -> None:
    from flows.audit import audit_flow

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    grid = {"budgets": [10], "selectors": ["random"], "attackers": ["basic"], "steps": 20}

    reports = audit_flow(store=store_url, cells_dir=str(blocked), **grid)

    assert reports["f"]["status"] == "audited", reports
    assert ObjectStore(store_url).exists("runs/f/audits/v000001/report.json")
    assert blocked.read_text() == "not a folder"
