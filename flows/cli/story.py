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
    batch_requests: int = 0,
    batch_floor_points: float = 25.0,
) -> dict[str, Any]:
    """Train small runs, serve the store, forget ``forget_count`` ids, wait for the new versions.

    The ids are the first training ids of the first run; every run that trained on any of them
    is unlearned (the runs differ by split seed, so some may share ids). Returns a summary:
    store, request id, ledger status, latencies, and per run the versions, held-out accuracy
    before and after, blocks retrained, speed-up and (with ``verify``) consistency with a naive
    retrain. With ``batch_requests`` N > 0 the same ``serve`` then takes N more requests in one
    batch (:func:`batch_story`) and the summary's ``batch`` tells its per-request cost.
    """
    import ray

    from flows.runtime import apply_prefect_defaults, prefect_api_and_ray
    from flows.train import train_flow

    apply_prefect_defaults()
    store = ObjectStore(store_url)
    store.ensure_container()
    registry = RunRegistry(store)
    began = time.perf_counter()
    with prefect_api_and_ray() as api_url:
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
            after_single = {run_id: registry.current(run_id) for run_id in run_ids}
            batch = (
                batch_story(
                    store.url,
                    api_url=api_url,
                    data=data,
                    run_ids=run_ids,
                    requests=batch_requests,
                    floor_points=batch_floor_points,
                    timeout_s=timeout_s,
                )
                if batch_requests
                else None
            )
    runs = {}
    for run_id in run_ids:
        audit = entry["details"].get("runs", {}).get(run_id)
        after = after_single[run_id]
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
        "batch": batch,
        "wall_seconds": time.perf_counter() - began,
    }


def batch_story(
    store_url: str,
    *,
    api_url: str,
    data: str,
    run_ids: Sequence[str],
    requests: int,
    floor_points: float,
    timeout_s: float,
    window_s: float = 3600.0,
    seed: int = 0,
) -> dict[str, Any]:
    """N deletion requests in one batch against a running ``serve``: rollback at once, one retrain, its cost.

    The store's batch policy becomes a ``window_s`` window with rollback (``serve --batch-window 1h
    --rollback``); N requests of one id each, drawn (seeded) round robin from the newest quarter of the
    first run's blocks (recent data, deleted more often), are submitted; one event lets a pass gate them (``batched until T``, each
    affected run serves the checkpoint before the earliest affected block); ``forget --now`` and
    one more event flush the batch: one exact retrain per affected run, publishing each block as
    it lands. Returns per request its forget and exact times, and the batch's retrain compute
    (block-trainings and seconds) per request against naive retraining per request.
    """
    import numpy as np

    from flows.batching import OPEN_BATCH_KEY, request_flush, save_policy
    from flows.rollback import save_rollback
    from flows.unlearn import emit_deletion_event
    from obliviate.unlearning.batching import BatchPolicy
    from obliviate.unlearning.plan import BlockPlan

    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    save_policy(store, BatchPolicy(window_s=window_s))
    save_rollback(store, enabled=True, floor_points=floor_points)
    first = run_ids[0]
    spec = registry.spec(first)
    plan = BlockPlan.from_dict(store.get_json(f"runs/{first}/plan.json"))
    deleted = set(registry.current(first).deleted_ids)
    # the newest quarter of the blocks (at least one): recent data is deleted more often, and a small
    # demo chain's early checkpoints are too weak for any interim to meet a served-accuracy floor
    newest = list(range(plan.num_blocks - max(1, plan.num_blocks // 4) + 1, plan.num_blocks + 1))
    rng = np.random.default_rng(seed)
    chosen = []
    for k in range(requests):  # one id per request, round robin over the newest blocks
        block = newest[k % len(newest)]
        candidates = [int(spec.train_ids[p]) for p in plan.block_ids(block)]
        candidates = [i for i in candidates if i not in deleted and i not in chosen]
        chosen.append(int(rng.choice(candidates)))
    before = {run_id: registry.current(run_id) for run_id in run_ids}
    submitted = [
        submit_deletion(store.url, [int(i)], dataset=data, reason=f"batch story {k + 1}/{requests}", emit=False)
        for k, i in enumerate(chosen)
    ]
    request_ids = [s["request_id"] for s in submitted]
    emit_deletion_event(store.url, {"request_id": request_ids[-1], "store": store.url}, api_url=api_url)
    deadline = time.monotonic() + timeout_s
    gated: dict[str, Any] = {}
    while time.monotonic() < deadline:  # the pass gates the open batch: batched until T, rolled back
        with contextlib.suppress(Exception):
            gated = store.get_json(OPEN_BATCH_KEY)
        if set(request_ids) <= set(gated.get("requests", [])) and gated.get("interim"):
            break
        time.sleep(0.5)
    # what each run published at acceptance, as the gate recorded it: reading the current version
    # instead raced with the retrain's progressive versions once a flush-now rule had started it
    interim = {
        run_id: {"version": done.get("version"), "serve_block": done.get("serve_block")}
        for run_id, done in ((gated.get("interim") or {}).get("runs") or {}).items()
        if run_id in run_ids and done.get("published")
    }
    flushed_by_rule = gated.get("reason") if gated.get("flush") else None
    request_flush(store, reason="batch story: forget --now")
    emit_deletion_event(store.url, {"request_id": request_ids[-1], "store": store.url}, api_url=api_url)
    entries = {rid: wait_for_request(store.url, rid, timeout_s=timeout_s) for rid in request_ids}
    wait_for_flow_runs(api_url, ("unlearn", "reconcile"), timeout_s=60.0)
    ledger = DeletionLedger(store)
    audits: dict[str, dict[str, Any]] = {}
    for entry in entries.values():
        for run_id, audit in (entry["details"].get("runs") or {}).items():
            if audit.get("status") == "published":
                audits.setdefault(run_id, audit)
    block_trainings = sum(len(a.get("blocks_retrained") or []) for a in audits.values())
    retrain_seconds = sum(float(a.get("retrain_seconds") or 0.0) for a in audits.values())
    # naive: every request retrains every run it affects from scratch (the runs' recorded block times)
    affected = [[r for r in (e["details"].get("runs") or {}) if r in before] for e in entries.values()]
    naive_blocks = sum(int(before[r].metrics.get("num_blocks", 0)) for runs in affected for r in runs) / requests
    naive_seconds = (
        sum(float(before[r].metrics.get("train_seconds", 0.0)) for runs in affected for r in runs) / requests
    )
    per_request = []
    for rid in request_ids:
        requested = float(ledger.get(rid).request["requested_at"])
        forgotten = None
        with contextlib.suppress(Exception):
            forgotten = float(store.get_json(f"ledger/forgotten/{rid}.json")["forgotten_at"]) - requested
        details = entries[rid]["details"]
        exact = float(details["exact_at"]) - requested if details.get("exact_at") else None
        per_request.append(
            {
                "request_id": rid,
                "ids": entries[rid]["ids"],
                "status": entries[rid]["status"],
                "forget_s": forgotten,
                "exact_s": exact,
                "late": details.get("late"),
            }
        )
    served = {}
    for run_id in run_ids:
        history = []
        for version in range(before[run_id].version + 1, registry.current(run_id).version + 1):
            pointer = store.read_pointer_version(registry.pointer_key(run_id), version)
            block = pointer.target.get("serve_block", "final")
            history.append(
                {
                    "version": version,
                    "serve_block": block,
                    "retrained": "retraining" in pointer.target,  # a progressive version: M'_i of the retrain
                    **pointer.target.get("metrics", {}),
                }
            )
        served[run_id] = history
    return {
        "requests": per_request,
        "window_s": window_s,
        "batched_until": gated.get("batched_until"),
        "batched_rule": gated.get("reason"),
        "interim": interim,
        "flushed_by_rule": flushed_by_rule,
        # why no interim was published for a run, with its figures (accuracy, floor, margin), when that flushed it
        "rollback_refused": gated.get("rollback_refused") if flushed_by_rule else None,
        "runs_retrained": sorted(audits),
        "block_trainings": block_trainings,
        "retrain_seconds": retrain_seconds,
        "per_request_block_trainings": block_trainings / requests,
        "per_request_seconds": retrain_seconds / requests,
        "naive_per_request_block_trainings": naive_blocks,
        "naive_per_request_seconds": naive_seconds,
        "served": served,
        "floor_points": floor_points,
    }
