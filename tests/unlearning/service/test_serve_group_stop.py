"""``obliviate serve`` stopped by a SIGTERM to its whole process group, as systemd stops a service.

A SIGTERM to serve's pid alone hands the request it is working on back (``pending``, its attempt
not counted). Sent to the group (systemd's default ``KillMode=control-group``, ``kill -TERM --
-PGID``), serve's own local Ray runtime gets it too: the retrain's workers died before serve's
handler marked the pass as stopping, so the flow run ended ``Crashed``, the request stayed
``claimed`` until its lease lapsed, and serve's log filled with "--- Logging error ---" tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.deployments import POOL_KEY
from flows.train import run_spec
from storage.ledger import DeletionLedger
from storage.objects import ObjectStore
from storage.registry import RunRegistry

REPO = Path(__file__).resolve().parents[3]


def _forget(url: str, ids: list[int], request_id: str, *, api_url: str) -> None:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    command = [sys.executable, "-m", "flows.cli", "forget", "--store", url, "--data", "digits"]
    command += ["--ids", ",".join(map(str, ids)), "--request-id", request_id]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _serve_stopped_by_a_group_sigterm(tmp_path, prefect_api_url, tiny_run, *, ray_env=None):
    """serve working on request group-1 when a SIGTERM reaches its process group: its log, the request's entry and
    history, and the seconds from the SIGTERM to the hand-back line (None: not seen) and to serve's exit."""
    store_url = f"file://{tmp_path}/store"
    slow = tiny_run(epochs=1500, split_seed=0)  # about 20 s to retrain from block 1: the stop lands mid-retrain
    ChainWorker(store_url).train(run_spec(run_id="slow", **slow))
    block_ids = [int(i) for i in RunRegistry(ObjectStore(store_url)).entry("slow")["block_sample_ids"][1]]
    # serve starts its own local Ray runtime (no RAY_ADDRESS): its processes are in serve's group.
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")} | (ray_env or {})
    env |= {"PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "PYTHONUNBUFFERED": "1"}
    (tmp_path / "home").mkdir()
    env["HOME"] = str(tmp_path / "home")  # a local Ray runtime's token goes there
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "flows.cli", "serve", "--store", store_url, "--audit-cron", "off"]
    command += ["--reconcile-cron", "0 0 1 1 *", "--workers", "1"]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    store = ObjectStore(store_url)
    ledger = DeletionLedger(store)
    handed_back_s = None
    try:
        deadline = time.monotonic() + 150
        while not store.exists(POOL_KEY) and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        _forget(store_url, block_ids[:2], "group-1", api_url=prefect_api_url)
        deadline = time.monotonic() + 60
        while ledger.get("group-1").status != "claimed" and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # the retrain is under way on serve's own Ray workers
        os.killpg(process.pid, signal.SIGTERM)
        signalled = time.monotonic()
        while process.poll() is None and time.monotonic() - signalled < 90:
            if handed_back_s is None and HANDED_BACK in log.read_text():
                handed_back_s = time.monotonic() - signalled
            time.sleep(0.1)
        code = process.wait(timeout=1)
        exited_s = time.monotonic() - signalled
        assert code == 0, (code, log.read_text()[-3000:])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # what serve's own Ray left behind, if anything
        process.wait(timeout=30)
    text = log.read_text()
    if handed_back_s is None and HANDED_BACK in text:  # said in its last 0.1 s
        handed_back_s = exited_s
    entry = ledger.get("group-1")
    history = [h["status"] for h in ledger.history("group-1")]
    return text, entry, history, handed_back_s, exited_s


HANDED_BACK = "handed back (serve is stopping); its attempt is not counted"


@pytest.mark.slow
def test_serve_stopped_by_a_sigterm_to_its_process_group_hands_the_request_back(tmp_path, prefect_api_url, tiny_run):
    text, entry, history, _, _ = _serve_stopped_by_a_group_sigterm(tmp_path, prefect_api_url, tiny_run)
    # The defect: the request stayed "claimed" until its lease lapsed. Where the retrain outran the
    # stop (Ray's workers may outlive the group signal, so how far it gets varies by machine), the pass
    # settles it "done"; otherwise it is handed back. Either way it is never left claimed or failed.
    if entry.status == "pending":
        assert entry.details["attempts"] == 0, (entry.details, text[-3000:])
        assert "serve stopped during the work" in entry.details["handed_back"]["reason"]
        assert history == ["pending", "claimed", "pending"]
        assert HANDED_BACK in text, text[-3000:]
    else:
        assert entry.status == "done" and history == ["pending", "claimed", "done"], (entry.details, text[-3000:])
    assert "obliviate serve: stopped;" in text
    assert "Logging error" not in text and "Traceback" not in text, text[-3000:]
    # the unlearn flow run ends as on a SIGTERM to serve alone, not Crashed when serve exits
    assert "Finished in state Completed()" in text and "Crash detected" not in text, text[-3000:]


@pytest.mark.slow
def test_serve_whose_ray_shutdown_outlasts_its_bound_says_where_it_waits(tmp_path, prefect_api_url, tiny_run):
    """With its Ray runtime gone, serve ends the pass under way by ray.shutdown(), which waits on the dead GCS first.

    Here Ray is made to wait 30 s there (its task-event flush timeout: 5 s by default, 1 s under serve), past serve's
    20 s bound. serve said nothing for those 20 s, handed the request back itself, and exited once Ray's clean-up at
    exit had waited for that shutdown: the pass it let go then ran with the interpreter half torn down ("--- Logging
    error ---" tracebacks), its flow run's final state logged in them or lost. Now serve says where Ray's shutdown
    waits, hands the request back, then waits for the shutdown itself: the flow run ends Completed before the exit.
    """
    ray_env = {"RAY_task_events_shutdown_flush_timeout_ms": "30000"}
    text, entry, history, handed_back_s, _ = _serve_stopped_by_a_group_sigterm(
        tmp_path, prefect_api_url, tiny_run, ray_env=ray_env
    )
    if entry.status == "done":  # the retrain outran the stop (see above): nothing waited on Ray
        pytest.skip("the retrain finished before the stop reached it")
    assert entry.status == "pending" and entry.details["attempts"] == 0, (entry.details, text[-3000:])
    assert history == ["pending", "claimed", "pending"]
    said = [line for line in text.splitlines() if "Ray's shutdown has not returned after 20 s" in line]
    assert len(said) == 1 and "hands the requests of the pass under way back itself" in said[0], text[-3000:]
    assert "it waits in shutdown" in said[0], said  # Ray's shutdown, inside its core worker's shutdown
    assert handed_back_s is not None and "obliviate serve: stopped;" in text, text[-3000:]
    assert "Logging error" not in text and "Traceback" not in text, text[-3000:]
    stopped = text.index("obliviate serve: stopped;")
    assert "Finished in state Completed()" in text[:stopped], text[-3000:]
