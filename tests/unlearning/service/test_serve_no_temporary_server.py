"""``obliviate serve`` on its own Prefect server never starts a temporary one while an unlearning runs.

Probe 113, finding 1: with no Prefect API configured, serve starts its own server on 127.0.0.1 and its
dispatcher runs the ``unlearn`` flow pointed at it. Once a fan-out lasted past 10 s, the thread that says
"waiting on the unlearning of run ..." logged through the flow's Prefect logger with Prefect's settings as
they were at import (a new thread does not inherit the dispatcher's settings context): Prefect then started
temporary servers of its own ("Starting temporary server", sqlite tracebacks, "APILogWorker failed with N
pending items"), one outliving the flow as serve's child, and those lines never reached serve's dashboard.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.unlearning.service.conftest import REPO

WAITING = "waiting on the unlearning of run slow for"


@pytest.mark.slow
def test_a_long_unlearning_logs_to_serves_own_server_and_starts_no_temporary_one(tmp_path, slow_run_store):
    from flows.deployments import ENDPOINT_KEY, POOL_KEY
    from storage.ledger import DeletionLedger
    from storage.objects import ObjectStore
    from storage.registry import RunRegistry

    # 1500 epochs a block: retraining blocks 1-3 takes about 20 s on a quiet 2-core machine, past the 10 s heartbeat
    store_url = slow_run_store(tmp_path / "store", epochs=1500)
    block_ids = [int(i) for i in RunRegistry(ObjectStore(store_url)).entry("slow")["block_sample_ids"][1]]

    # A new user's setting: no Prefect API configured (serve starts its own server), no Ray address, a fresh HOME.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "RAY_"))}
    env |= {"PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "flows.cli", "serve", "--store", store_url, "--audit-cron", "off"]
    command += ["--reconcile-cron", "0 0 1 1 *", "--workers", "1"]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    store = ObjectStore(store_url)
    try:
        deadline = time.monotonic() + 240
        while not store.exists(POOL_KEY) and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert store.exists(POOL_KEY), log.read_text()[-3000:]
        api_url = store.get_json(ENDPOINT_KEY)["api_url"]
        forget = [sys.executable, "-m", "flows.cli", "forget", "--store", store_url, "--data", "digits"]
        forget += ["--ids", ",".join(map(str, block_ids[:2])), "--request-id", "long-1", "--wait", "400"]
        done = subprocess.run(forget, cwd=REPO, env=env, capture_output=True, text=True, timeout=450, check=False)
        assert DeletionLedger(store).get("long-1").status == "done", done.stdout + done.stderr + log.read_text()[-3000:]
        text = log.read_text()
        # the fan-out outlasted the heartbeat, so its thread spoke (else this test shows nothing)
        assert WAITING in text, text[-3000:]
        # The defect: Prefect started servers of its own for that thread's log lines.
        assert "Starting temporary server" not in text, text[-4000:]
        assert "APILogWorker" not in text, text[-4000:]
        # and those lines reached serve's server, the one its dashboard shows
        kept = _messages_on(api_url, WAITING)
        assert kept, (api_url, text[-3000:])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # what serve left behind, its Ray and any Prefect server
        process.wait(timeout=30)


def _messages_on(api_url: str, part: str) -> list[str]:
    """The log messages holding ``part`` that the Prefect server at ``api_url`` keeps (logs arrive in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTextSearch
    from prefect.settings import PREFECT_API_URL, temporary_settings

    only = LogFilter(text=LogFilterTextSearch(query="waiting"))  # a word of it: the server's phrase syntax aside
    kept: list[str] = []
    for _ in range(30):
        with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            kept = [log.message for log in client.read_logs(log_filter=only, limit=50) if part in log.message]
        if kept:
            break
        time.sleep(1.0)
    return kept
