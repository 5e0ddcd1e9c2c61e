"""The ``unlearn`` and ``reconcile`` flows: settle deletion requests across every registered run.

``unlearn`` runs on a deletion event (see :mod:`flows.deployments`). It checks the payload, then
processes every open ledger request, so requests that arrived meanwhile are merged into the same
pass; ``reconcile`` (cron) does the same without an event, so a lost event or a crashed run loses
nothing. One pass:

1. claim open requests (CAS on each request's status: a request is processed by one pass only;
   a claim older than ``stale_after_s`` is taken over, the work it left in storage is resumed);
2. validate them against the registry: a request naming ids no registered run of its dataset
   trained on is rejected with the reason, nothing changed;
3. fan out one unlearning per affected run on Ray actors in parallel
   (:meth:`actors.chains.ChainWorker.unlearn`), each publishing a new model version by CAS;
4. settle the ledger: ``done`` with the audit trail of every affected run, or back to
   ``pending`` with the error if a run failed (the next pass retries; finished runs are skipped
   because their version already lists the request).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.train_flow import worker_pool
from obliviate.service import RequestError, parse_event_payload
from storage.ledger import CLAIMED, DONE, PENDING, REJECTED, TERMINAL, DeletionLedger, RequestStatus
from storage.objects import ObjectStore
from storage.registry import RunRegistry

DEFAULT_STALE_AFTER_S = 600.0


def process_open_requests(
    store: str,
    *,
    policy: str = "exact",
    verify: bool = False,
    workers: int | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
    holder: str | None = None,
) -> dict[str, Any]:
    """Claim, validate, fan out and settle every open request of ``store`` (one pass)."""
    import ray

    from flows.runtime import cluster_cpus, ensure_ray

    logger = get_run_logger()
    object_store = ObjectStore(store)
    ledger, registry = DeletionLedger(object_store), RunRegistry(object_store)
    holder = holder or f"{flow_run.get_id() or 'local'}"
    claimed: list[RequestStatus] = []
    for entry in ledger.open_entries(stale_after_s=stale_after_s):
        taken = ledger.transition(
            entry.request_id, status=CLAIMED, details={"holder": holder, "claimed_at": time.time()},
            allowed_from=(PENDING,), stale_claim_after_s=stale_after_s,
        )
        if taken is not None:
            claimed.append(taken)
    if not claimed:
        return {"claimed": [], "runs": {}, "settled": {}}
    logger.info("claimed %d request(s): %s", len(claimed), [c.request_id for c in claimed])

    specs = {run_id: registry.spec(run_id) for run_id in registry.run_ids()}
    per_run: dict[str, dict[str, list[int]]] = {}
    affected_of: dict[str, list[str]] = {}
    settled: dict[str, str] = {}
    for entry in claimed:
        ids, dataset = [int(i) for i in entry.request["ids"]], entry.request["dataset"]
        runs = [spec for spec in specs.values() if spec.dataset == dataset]
        if not runs:
            _reject(ledger, entry, f"no registered run was trained on dataset {dataset!r} (registered datasets: "
                    f"{sorted({s.dataset for s in specs.values()})}); nothing changed.")
            settled[entry.request_id] = REJECTED
            continue
        known: set[int] = set()
        affected = []
        for spec in runs:
            positions, _ = spec.positions(ids)
            if positions.size:
                affected.append(spec.run_id)
                known.update(spec.dataset_ids(positions))
        unknown = sorted(set(ids) - known)
        if unknown:
            _reject(ledger, entry, f"unknown ids {unknown[:20]}{' ...' if len(unknown) > 20 else ''}: no registered run "
                    f"of dataset {dataset!r} trained on them (held-out, out of range, or never used); the request "
                    "is rejected as a whole and nothing changed. Resubmit without them.")
            settled[entry.request_id] = REJECTED
            continue
        affected_of[entry.request_id] = affected
        for run_id in affected:
            per_run.setdefault(run_id, {})[entry.request_id] = ids

    results: dict[str, dict[str, Any]] = {}
    fanout: dict[str, Any] = {}
    if per_run:
        ensure_ray()
        pool_size = max(1, min(len(per_run), workers or cluster_cpus()))
        actors = worker_pool(store, pool_size)
        started = time.time()
        futures = {
            run_id: actors[i % pool_size].unlearn.remote(run_id, per_run[run_id], policy=policy, verify=verify)
            for i, run_id in enumerate(sorted(per_run))
        }
        logger.info("fanned out %d unlearning(s) over %d worker(s)", len(futures), pool_size)
        for run_id, future in futures.items():
            try:
                results[run_id] = ray.get(future)
            except Exception as err:  # one run failing must not lose the others' results
                results[run_id] = {"run_id": run_id, "status": "failed", "error": f"{type(err).__name__}: {err}"}
        fanout = {"workers": pool_size, "runs": len(per_run), "seconds": time.time() - started}
        logger.info("fan-out of %d run(s) on %d worker(s) finished in %.1f s", len(per_run), pool_size, fanout["seconds"])

    for request_id, affected in affected_of.items():
        audits = {run_id: _for_request(results[run_id], request_id) for run_id in affected}
        failed = {run_id: a for run_id, a in audits.items() if a.get("status") == "failed"}
        if failed:
            ledger.transition(request_id, status=PENDING, details={"last_error": failed, "runs": audits},
                              allowed_from=(CLAIMED,))
            settled[request_id] = PENDING
        else:
            ledger.transition(request_id, status=DONE, details={"runs": audits, "finished_at": time.time()},
                              allowed_from=(CLAIMED,))
            settled[request_id] = DONE
    logger.info("settled: %s", settled)
    return {"claimed": [c.request_id for c in claimed], "runs": results, "settled": settled, "fanout": fanout}


def _for_request(audit: dict[str, Any], request_id: str) -> dict[str, Any]:
    """A run's audit as seen by one of the requests it applied (merged requests share it)."""
    return {**audit, "merged_with": [r for r in audit.get("requests", []) if r != request_id]}


def _reject(ledger: DeletionLedger, entry: RequestStatus, reason: str) -> None:
    get_run_logger().warning("request %s rejected: %s", entry.request_id, reason)
    ledger.transition(entry.request_id, status=REJECTED, details={"reason": reason}, allowed_from=(CLAIMED,))


@flow(name="unlearn")
def unlearn_flow(
    store: str,
    payload: Any = None,
    event_id: str | None = None,
    policy: str = "exact",
    verify: bool = False,
    workers: int | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> dict[str, Any]:
    """Handle one deletion event: check it, then settle every open request (merged).

    Args:
        store: the store of runs and ledger.
        payload: the event payload, ``{"request_id": ...}``.
        event_id: the event's id (for the ledger's event log).
        policy: ``exact`` (default) or ``deepobliviate``.
        verify: also retrain naively and report consistency (costs a full retrain per run).
        workers: Ray workers for the fan-out (default: cluster CPUs).
        stale_after_s: a claim older than this is considered crashed and taken over.
    """
    logger = get_run_logger()
    ledger = DeletionLedger(ObjectStore(store))
    event_id = event_id or f"manual-{uuid.uuid4().hex[:12]}"
    received_at = time.time()
    try:
        request_id = parse_event_payload(payload)
        if not ledger.exists(request_id):
            raise RequestError(
                f"rule: a deletion event names a request already in the ledger; {request_id!r} is not there. "
                "Submit deletions with `obliviate forget`, which writes the ledger before emitting."
            )
    except RequestError as err:
        logger.warning("deletion event %s rejected: %s", event_id, err)
        ledger.record_event(event_id, {"outcome": REJECTED, "reason": str(err), "payload": repr(payload)[:500],
                                       "received_at": received_at})
        return {"event_id": event_id, "outcome": REJECTED, "reason": str(err)}
    entry = ledger.get(request_id)
    if entry.status in TERMINAL or (entry.status == CLAIMED and received_at - entry.updated_at <= stale_after_s):
        ledger.record_event(event_id, {"outcome": "duplicate", "request_id": request_id, "status": entry.status,
                                       "received_at": received_at})
        logger.info("event %s: request %s is already %s; nothing to do", event_id, request_id, entry.status)
        return {"event_id": event_id, "outcome": "duplicate", "request_id": request_id, "status": entry.status}
    ledger.record_event(event_id, {"outcome": "processing", "request_id": request_id, "received_at": received_at})
    result = process_open_requests(store, policy=policy, verify=verify, workers=workers, stale_after_s=stale_after_s)
    outcome = "processed" if request_id in result["claimed"] else "duplicate"
    return {"event_id": event_id, "outcome": outcome, "request_id": request_id, **result}


@flow(name="reconcile")
def reconcile_flow(
    store: str,
    policy: str = "exact",
    verify: bool = False,
    workers: int | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> dict[str, Any]:
    """Finish every ledger entry that is not done (a lost event, a crashed pass): the cron safety net."""
    return process_open_requests(store, policy=policy, verify=verify, workers=workers, stale_after_s=stale_after_s)
