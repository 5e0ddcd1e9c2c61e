"""The scheduled extraction audit of `obliviate serve` (flows.audit.audit_flow) on a real store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.train import run_spec
from storage import ObjectStore
from storage.registry import TRAIN_CHAIN, RunRegistry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


def test_each_run_is_audited_on_what_its_training_left_out_and_one_failure_blocks_no_other(
    store_url, tmp_path, tiny_run, prefect_api_url, ray_address
):
    """`serve`'s 03:00 audit asked every run for 200 pool + 150 test images: a default digits run
    (300 held out) failed it, and the first failing run stopped the audit of the runs after it."""
    from flows.audit import AuditFailed, audit_flow

    runs = (("broken", 300, 100), ("ok", 300, 100), ("fitted", 1677, 120), ("small", 1757, 40))
    for run_id, train_size, heldout_size in runs:
        spec = run_spec(run_id=run_id, split_seed=0, **tiny_run(train_size=train_size, heldout_size=heldout_size))
        ChainWorker(store_url).train(spec)
    registry = RunRegistry(ObjectStore(store_url))
    final = tmp_path / "store" / registry.checkpoint_key("broken", TRAIN_CHAIN, 4)
    final.write_bytes(b"damaged")

    grid = {"budgets": [10, 40], "selectors": ["random"], "attackers": ["basic"], "steps": 20}
    with pytest.raises(AuditFailed, match=r"1 of 4 run\(s\) could not be audited: \{'broken': .*damaged"):
        audit_flow(store=store_url, **grid)
    report = ObjectStore(store_url).get_json("runs/ok/audits/v000001/report.json")  # audited after the failure
    assert {row["budget"] for row in report["summary"]} == {10, 40} and report["target_meta"]["run_id"] == "ok"
    # 120 images left out of "fitted": pool 80 and test 40 (2 : 1), both budgets below the pool
    fitted = ObjectStore(store_url).get_json("runs/fitted/audits/v000001/report.json")
    assert sum(fitted["pool_class_histogram"]) == 80 and len(fitted["cells"]) == 2
    # 40 images left out of "small": pool 26 (budget 40 dropped), test 14 < 30: skipped, with its reason
    reports = audit_flow(store=store_url, run_id="small", **grid)
    assert reports["small"]["status"] == "skipped" and "left 40 images of digits out" in reports["small"]["reason"]
    assert not ObjectStore(store_url).exists("runs/small/audits/v000001/report.json")


def test_a_sharded_run_is_audited_as_the_one_model_it_serves(store_url, tiny_run, prefect_api_url, ray_address):
    """Each shard was audited alone, as if it were the served model, with the other shards' training
    images in its pool; the audit now queries the group as served (mean probability)."""
    from flows.audit import audit_flow
    from flows.model_server import RunBackend
    from flows.train import train_flow

    options = tiny_run(split_seed=0)
    options.pop("split_seed")
    train_flow(store=store_url, run_id="g", shards=2, split_seed=0, **options)
    grid = {"budgets": [10], "selectors": ["random"], "attackers": ["basic"], "steps": 20}
    reports = audit_flow(store=store_url, **grid)
    assert set(reports) == {"g"} and reports["g"]["version"] == [1, 1]
    body = ObjectStore(store_url).get_json("runs/g/audits/v000001-v000001/report.json")
    assert (
        body["target_meta"]["members"] == ["g-s0of2", "g-s1of2"] and body["target_meta"]["rule"] == "mean_probability"
    )
    # the pool and test set leave out every shard's training images
    trained = set(RunBackend(store_url, "g").spec_info["train_indices"])
    assert len(trained) == options["train_size"] and "audit_split" in body["split"]
    assert body["overlap_warning"] is None  # the served group declared them and they were excluded


def test_the_audit_flow_joins_ray_in_a_fresh_process(store_url, prefect_api_url, ray_address, tiny_run):
    """serve's 03:00 audit (and `prefect deployment run 'extraction-audit/audit-<suffix>'`) failed for every
    run: "Ray is not initialised". The runner starts the run as here: a new interpreter, RAY_ADDRESS set
    by serve, Ray not initialised in it."""
    ChainWorker(store_url).train(
        run_spec(run_id="f", **tiny_run(blocks=3, train_size=300, heldout_size=100, split_seed=0))
    )
    grid = {"budgets": [10], "selectors": ["random"], "attackers": ["basic"], "steps": 20}
    code = f"from flows.audit import audit_flow; print(audit_flow(store={store_url!r}, **{grid!r})['f']['status'])"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "RAY_ADDRESS": ray_address}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("audited"), done.stderr[-3000:]
