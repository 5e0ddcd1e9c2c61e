"""The deletion story in one call: train a small run, serve, forget ids, wait for the new version.

:func:`deletion_story` is what a demo (``make demo``) or a benchmark calls. It uses the same
pieces a user runs by hand (``obliviate train``, ``obliviate serve``, ``obliviate forget``):
a Prefect API server (the configured one, or one started on 127.0.0.1), one Ray runtime that the
``serve`` subprocess and its flow runs join, the ``train`` flow, and a deletion request that goes
through the ledger and a Prefect event to the event-triggered ``unlearn`` deployment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flows.unlearn import ENDPOINT_KEY, submit_deletion, wait_for_request
from storage.ledger import DeletionLedger
from storage.objects import ObjectStore
from storage.registry import RunRegistry

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def serving(
    store_url: str,
    *,
    api_url: str,
    extra_args: Sequence[str] = (),
    ready_timeout_s: float = 180.0,
    log_path: str | Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Run ``obliviate serve`` for ``store_url`` in a subprocess while the block runs.

    The subprocess joins this process's Ray runtime (``RAY_ADDRESS``) and Prefect API; the block
    starts once the deployments are registered (the store's endpoint announcement names its pid).
    """
    import ray

    store = ObjectStore(store_url)
    env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    if ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    log_path = Path(log_path or tempfile.mkstemp(prefix="obliviate-serve-", suffix=".log")[1])
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--store", store_url, "--audit-cron", "off", *extra_args],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"obliviate serve exited with {process.returncode}; its log {log_path} ends with:\n"
                    f"{log_path.read_text()[-2000:]}"
                )
            if store.exists(ENDPOINT_KEY) and store.get_json(ENDPOINT_KEY).get("pid") == process.pid:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"obliviate serve was not ready after {ready_timeout_s:.0f} s; see {log_path}.")
            time.sleep(0.5)
        process.log_path = str(log_path)  # type: ignore[attr-defined]
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def wait_for_flow_runs(api_url: str, flow_names: Sequence[str], *, timeout_s: float) -> bool:
    """Wait until no run of ``flow_names`` is pending or running; ``False`` if ``timeout_s`` passed first."""
    import json
    import urllib.request

    query = {
        "flows": {"name": {"any_": list(flow_names)}},
        "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING"]}}},
        "limit": 1,
    }
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        request = urllib.request.Request(
            f"{api_url}/flow_runs/filter",
            data=json.dumps(query).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            if not json.loads(response.read()):
                return True
        time.sleep(0.5)
    return False


def request_latencies(store_url: str, request_id: str) -> dict[str, float | None]:
    """Seconds from the request (ledger time, the event follows at once) to the unlearning's start and end."""
    ledger = DeletionLedger(ObjectStore(store_url))
    entry = ledger.get(request_id)
    requested = float(entry.request["requested_at"])
    history = ledger.history(request_id)
    claimed = next((h["at"] for h in history if h["status"] == "claimed"), None)
    finished = next((h["at"] for h in history if h["status"] in ("done", "rejected")), None)
    runs = entry.details.get("runs", {})
    worker_starts = [a["started_at"] for a in runs.values() if a.get("started_at")]
    return {
        "event_to_unlearning_start_s": (claimed - requested) if claimed else None,
        "event_to_worker_start_s": (min(worker_starts) - requested) if worker_starts else None,
        "end_to_end_s": (finished - requested) if finished else None,
    }


def deletion_story(
    store_url: str = "file://./runs/story",
    *,
    data: str = "digits",
    run_ids: Sequence[str] = ("story-a",),
    forget_count: int = 3,
    blocks: int = 6,
    epochs: int = 3,
    train_size: int | None = 1200,
    heldout_size: int = 300,
    verify: bool = True,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Train small runs, serve the store, forget ``forget_count`` ids, wait for the new versions.

    The ids are the first training ids of the first run; every run that trained on any of them
    is unlearned (the runs differ by split seed, so some may share ids). Returns a summary:
    store, request id, ledger status, latencies, and per run the versions, held-out accuracy
    before and after, blocks retrained, speed-up and (with ``verify``) consistency with a naive
    retrain.
    """
    import ray

    from flows.runtime import apply_prefect_defaults, ensure_ray, prefect_api
    from flows.train import train_flow

    apply_prefect_defaults()
    store = ObjectStore(store_url)
    store.ensure_container()
    registry = RunRegistry(store)
    began = time.perf_counter()
    with prefect_api() as api_url:
        ensure_ray()
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        trained = {}
        for number, run_id in enumerate(run_ids):
            trained[run_id] = train_flow(
                store=store.url,
                run_id=run_id,
                data=data,
                blocks=blocks,
                epochs=epochs,
                train_size=train_size,
                heldout_size=heldout_size,
                split_seed=number,
            )
        forget = sorted(registry.spec(run_ids[0]).train_ids[:forget_count])
        before = {run_id: registry.current(run_id) for run_id in run_ids}
        with serving(store.url, api_url=api_url, extra_args=["--verify"] if verify else []):
            submitted = submit_deletion(store.url, forget, dataset=data, reason="deletion story")
            entry = wait_for_request(store.url, submitted["request_id"], timeout_s=timeout_s)
            # Let the flow run finish (its dashboard artifacts come after the ledger settles)
            # before serve stops: stopping it kills runs in flight, which then read "Crashed".
            wait_for_flow_runs(api_url, ("unlearn", "reconcile"), timeout_s=60.0)
    runs = {}
    for run_id in run_ids:
        audit = entry["details"].get("runs", {}).get(run_id)
        after = registry.current(run_id)
        runs[run_id] = {
            "version_before": before[run_id].version,
            "version_after": after.version,
            "heldout_accuracy_before": before[run_id].metrics.get("heldout_accuracy"),
            "heldout_accuracy_after": after.metrics.get("heldout_accuracy"),
            "affected": audit is not None,
            "blocks_retrained": audit.get("blocks_retrained") if audit else [],
            "speedup_vs_full_retrain": audit.get("speedup_vs_full_retrain") if audit else None,
            "theoretical_speedup": audit.get("theoretical_speedup") if audit else None,
            "verification": audit.get("verification") if audit else None,
            "ids_gone": (set(forget) & set(registry.spec(run_id).train_ids)) <= set(after.deleted_ids),
        }
    return {
        "store": store.url,
        "request_id": submitted["request_id"],
        "forgotten_ids": forget,
        "status": entry["status"],
        "ledger": store.uri(f"ledger/requests/{submitted['request_id']}.json"),
        "latency": request_latencies(store.url, submitted["request_id"]),
        "runs": runs,
        "trained": trained,
        "wall_seconds": time.perf_counter() - began,
    }
