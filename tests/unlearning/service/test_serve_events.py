"""`obliviate serve` end to end (real Prefect server, local Ray, a local store): the audit cron's
deployment, deletion events of every form in both dispatch modes, and what serve leaves behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from actors.chains import ChainWorker
from flows.deployments import POOL_KEY, ServiceOptions
from flows.train import run_spec
from flows.unlearn import emit_deletion_event, wait_for_request
from storage import ObjectStore
from storage.ledger import DeletionLedger
from storage.registry import RunRegistry

pytestmark = pytest.mark.slow

GRID = {"budgets": [10], "selectors": ["random"], "attackers": ["basic"], "steps": 20}


@pytest.fixture
def tiny(tiny_run) -> dict:
    return tiny_run(blocks=3, train_size=300, heldout_size=100, split_seed=0)


def _client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return get_client(sync_client=True)


def _event_run(api_url: str, event_id: str, *, timeout: float = 150.0):
    """The final ``unlearn`` flow run whose ``event_id`` parameter is ``event_id``."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _client(api_url) as client:
            runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["unlearn"])))
        mine = [r for r in runs if (r.parameters or {}).get("event_id") == event_id]
        if mine and mine[0].state is not None and mine[0].state.is_final():
            return mine[0]
        time.sleep(1.0)
    raise AssertionError(f"no finished unlearn run for event {event_id} after {timeout} s")


def _deployment_id(api_url: str, name: str) -> str:
    with _client(api_url) as client:
        return str(client.read_deployment_by_name(name).id)


def test_runner_serve_audits_on_its_cron_deployment_refuses_bad_events_and_removes_its_trigger(
    store_url, prefect_api_url, ray_address, serve, tiny
):
    """The audit deployment's runs failed: "Ray is not initialised" for every run. A bad event's run
    ended COMPLETED. `serve --dispatch runner` left its automation enabled after it stopped."""
    from prefect.deployments import run_deployment

    ChainWorker(store_url).train(run_spec(run_id="r", **tiny))
    block_ids = [int(i) for i in RunRegistry(ObjectStore(store_url)).entry("r")["block_sample_ids"][1]]
    suffix = ServiceOptions(store=store_url).suffix
    process = serve(store_url, "--dispatch", "runner", "--audit-cron", "0 3 * * *", "--reconcile-cron", "0 0 1 1 *")

    # the 03:00 run, started by hand as `prefect deployment run 'extraction-audit/audit-<suffix>'` does
    # (the runner starts it in a fresh process, where Ray is not initialised)
    run = run_deployment(f"extraction-audit/audit-{suffix}", parameters=GRID, timeout=300)
    assert run.state is not None and run.state.is_completed(), (run.state, process.log_path.read_text()[-3000:])
    report = ObjectStore(store_url).get_json("runs/r/audits/v000001/report.json")
    assert report["target_meta"]["run_id"] == "r"

    store = ObjectStore(store_url)
    bad = emit_deletion_event(store.url, {"ids": [11, 12]}, api_url=prefect_api_url)
    good = emit_deletion_event(store.url, {"ids": block_ids[:2], "dataset": "digits"}, api_url=prefect_api_url)
    refused = _event_run(prefect_api_url, bad)
    assert refused.state.is_failed() and "names the dataset they index in 'dataset'" in refused.state.message
    record = DeletionLedger(store).event(bad)
    assert record["outcome"] == "rejected" and "'dataset'" in record["reason"]
    applied = _event_run(prefect_api_url, good)
    assert applied.state.is_completed(), applied.state
    (entry,) = DeletionLedger(store).entries()
    assert entry.status == "done" and entry.request["ids"] == sorted(block_ids[:2])
    record = DeletionLedger(store).event(good)
    assert record["status"] == "done" and record["request_id"] == entry.request_id

    trigger = f"deletion-requested-{suffix}"
    with _client(prefect_api_url) as client:
        assert client.read_automations_by_name(trigger)
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    with _client(prefect_api_url) as client:
        assert client.read_automations_by_name(trigger) == [], process.log_path.read_text()[-2000:]


def test_warm_serve_runs_each_event_as_a_run_of_its_unlearn_deployment(
    store_url, prefect_api_url, ray_address, serve, tiny
):
    """Warm runs had no deployment (the deployment's page showed none), and a bad event's run ended COMPLETED."""
    ChainWorker(store_url).train(run_spec(run_id="w", **tiny))
    block_ids = [int(i) for i in RunRegistry(ObjectStore(store_url)).entry("w")["block_sample_ids"][1]]
    suffix = ServiceOptions(store=store_url).suffix
    process = serve(store_url, "--reconcile-cron", "0 0 1 1 *")
    deadline = time.monotonic() + 120
    while not ObjectStore(store_url).exists(POOL_KEY) and time.monotonic() < deadline:
        time.sleep(0.5)
    deployment = _deployment_id(prefect_api_url, f"unlearn/unlearn-{suffix}")
    store = ObjectStore(store_url)
    bad = emit_deletion_event(store.url, {"request_id": "nope-nope"}, api_url=prefect_api_url)
    good = emit_deletion_event(
        store.url, {"ids": block_ids[:2], "dataset": "digits", "request_id": "warm-ids"}, api_url=prefect_api_url
    )
    refused = _event_run(prefect_api_url, bad)
    assert refused.state.is_failed() and "'nope-nope' is not there" in refused.state.message
    assert str(refused.deployment_id) == deployment
    applied = _event_run(prefect_api_url, good)
    assert applied.state.is_completed() and str(applied.deployment_id) == deployment
    assert wait_for_request(store_url, "warm-ids", timeout_s=150)["status"] == "done"
    log = process.log_path.read_text()
    assert "'nope-nope' is not there" in log and "Traceback" not in log, log[-3000:]
    # the docs said `unlearn-<store>`; serve's first line names the deployments as Prefect lists them
    assert f"deployments of {store.url} served through {prefect_api_url}: unlearn/unlearn-{suffix}, " in log
    assert f"reconcile/reconcile-{suffix}" in log
