"""The ``unlearn`` flow: settle deletion requests across every registered run, and how requests reach it.

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

Requests reach it through the ledger first, then a Prefect event (the Python API behind
`obliviate forget`): :func:`submit_deletion` appends the request to the store's ledger (durable before anything else
happens), then emits ``obliviate.deletion.requested`` for the store's resource id. An
``obliviate serve`` watching that store runs the ``unlearn`` flow on the event; if no event gets
through (no server, network), the cron reconciliation finds the pending ledger entry later, so an
acknowledged request is never lost.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.artifacts import publish_request_artifacts
from flows.batching import batch_gate
from flows.train import worker_pool
from obliviate.unlearning.service import RequestError, parse_event_payload, parse_ids, request_id_for
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
    open_entries = ledger.open_entries(stale_after_s=stale_after_s)
    # --- issue 11: deadline-aware batching (flows/batching.py); requests wait until their batch is due ---
    gate = batch_gate(object_store, open_entries)
    if open_entries and not gate["flush"]:
        logger.info(
            "%d request(s) batched until %s (%s rule)", len(open_entries), gate["batched_until"], gate["reason"]
        )
        return {"claimed": [], "runs": {}, "settled": {}, "batched": gate}
    # --- end issue 11 ---
    for entry in open_entries:
        taken = ledger.transition(
            entry.request_id,
            status=CLAIMED,
            details={"holder": holder, "claimed_at": time.time()},
            allowed_from=(PENDING,),
            stale_claim_after_s=stale_after_s,
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
            _reject(
                ledger,
                entry,
                f"no registered run was trained on dataset {dataset!r} (registered datasets: "
                f"{sorted({s.dataset for s in specs.values()})}); nothing changed.",
            )
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
            _reject(
                ledger,
                entry,
                f"unknown ids {unknown[:20]}{' ...' if len(unknown) > 20 else ''}: no registered run "
                f"of dataset {dataset!r} trained on them (held-out, out of range, or never used); the request "
                "is rejected as a whole and nothing changed. Resubmit without them.",
            )
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
            except Exception as err:  # noqa: BLE001 -- any failure of one run is recorded on it; the others go on
                results[run_id] = {"run_id": run_id, "status": "failed", "error": f"{type(err).__name__}: {err}"}
        fanout = {"workers": pool_size, "runs": len(per_run), "seconds": time.time() - started}
        logger.info(
            "fan-out of %d run(s) on %d worker(s) finished in %.1f s", len(per_run), pool_size, fanout["seconds"]
        )

    for request_id, affected in affected_of.items():
        audits = {run_id: _for_request(results[run_id], request_id) for run_id in affected}
        failed = {run_id: a for run_id, a in audits.items() if a.get("status") == "failed"}
        if failed:
            ledger.transition(
                request_id, status=PENDING, details={"last_error": failed, "runs": audits}, allowed_from=(CLAIMED,)
            )
            settled[request_id] = PENDING
        else:
            exact_at = time.time()  # issue 11: when the request became exact, against its deadline
            deadline = gate["deadlines"].get(request_id)
            timing = {"exact_at": exact_at, "deadline": deadline, "late": deadline is not None and exact_at > deadline}
            ledger.transition(
                request_id,
                status=DONE,
                details={"runs": audits, "finished_at": exact_at, "batch": gate["reason"], **timing},
                allowed_from=(CLAIMED,),
            )
            settled[request_id] = DONE
    logger.info("settled: %s", settled)
    try:
        publish_request_artifacts(object_store, ledger, settled)
    except Exception as err:  # noqa: BLE001 -- the ledger is settled; a dashboard artifact must not undo that
        logger.warning("could not publish the dashboard artifacts of %s: %s", sorted(settled), err)
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
        ledger.record_event(
            event_id,
            {"outcome": REJECTED, "reason": str(err), "payload": repr(payload)[:500], "received_at": received_at},
        )
        return {"event_id": event_id, "outcome": REJECTED, "reason": str(err)}
    entry = ledger.get(request_id)
    if entry.status in TERMINAL or (entry.status == CLAIMED and received_at - entry.updated_at <= stale_after_s):
        ledger.record_event(
            event_id,
            {"outcome": "duplicate", "request_id": request_id, "status": entry.status, "received_at": received_at},
        )
        logger.info("event %s: request %s is already %s; nothing to do", event_id, request_id, entry.status)
        return {"event_id": event_id, "outcome": "duplicate", "request_id": request_id, "status": entry.status}
    ledger.record_event(event_id, {"outcome": "processing", "request_id": request_id, "received_at": received_at})
    result = process_open_requests(store, policy=policy, verify=verify, workers=workers, stale_after_s=stale_after_s)
    outcome = "processed" if request_id in result["claimed"] else "duplicate"
    return {"event_id": event_id, "outcome": outcome, "request_id": request_id, **result}


EVENT_NAME = "obliviate.deletion.requested"
ENDPOINT_KEY = "service/endpoint.json"


def store_resource_id(store_url: str) -> str:
    """The Prefect resource id of a store: the events of one store trigger only its own `serve`."""
    return "obliviate.store." + hashlib.sha256(ObjectStore(store_url).url.encode()).hexdigest()[:16]


def served_api_url(store: ObjectStore) -> str | None:
    """The Prefect API URL an ``obliviate serve`` of this store announced, if any."""
    if not store.exists(ENDPOINT_KEY):
        return None
    return str(store.get_json(ENDPOINT_KEY).get("api_url") or "") or None


def emit_deletion_event(store_url: str, payload: dict[str, Any], *, api_url: str) -> str | None:
    """Emit one deletion event to ``api_url`` and wait until it is sent; returns the event id."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        event = emit_event(
            event=EVENT_NAME,
            resource={"prefect.resource.id": store_resource_id(store_url), "prefect.resource.name": store_url},
            payload=payload,
        )
        EventsWorker.drain_all(timeout=30)
    return str(event.id) if event is not None else None


def submit_deletion(
    store_url: str,
    ids: Any,
    *,
    dataset: str,
    reason: str | None = None,
    request_id: str | None = None,
    emit: bool = True,
    api_url: str | None = None,
) -> dict[str, Any]:
    """Record a deletion request in the ledger, then announce it with a Prefect event.

    Args:
        store_url: the store holding the runs and the ledger.
        ids: dataset sample ids (row indices of ``dataset``), a list or ``"3,17,42"``.
        dataset: the dataset the ids index (as runs were trained with ``--data``).
        reason: free text kept in the ledger (ticket, legal basis).
        request_id: idempotency key: submitting the same id again changes nothing.
        emit: emit the event (``False``: leave it to the reconciliation).
        api_url: Prefect API to emit to; default ``PREFECT_API_URL``, else the one the store's
            ``obliviate serve`` announced.

    Returns:
        ``request_id``, ``status``, ``new`` (False for a repeat), ``event_id`` (or ``None``) and a note.

    Raises:
        RequestError: malformed ids, or a request id reused for other ids (nothing written).
    """
    values = parse_ids(ids)
    store = ObjectStore(store_url)
    ledger = DeletionLedger(store)
    request_id = request_id or request_id_for(values, dataset, salt=f"{time.time_ns()}-{uuid.uuid4().hex}")
    entry, created = ledger.append(request_id=request_id, ids=values, dataset=dataset, reason=reason)
    out: dict[str, Any] = {
        "request_id": request_id,
        "status": entry.status,
        "new": created,
        "event_id": None,
        "ids": list(values),
        "dataset": dataset,
    }
    if not created and entry.status in TERMINAL:
        out["note"] = f"request {request_id} was already {entry.status}; nothing changed."
        return out
    if not emit:
        out["note"] = "recorded in the ledger; the reconciliation schedule will process it."
        return out
    target = api_url or os.environ.get("PREFECT_API_URL") or served_api_url(store)
    if not target:
        out["note"] = (
            "recorded in the ledger; no Prefect API is configured and no `obliviate serve` announced one "
            "for this store, so it waits for the next serve's reconciliation."
        )
        return out
    from flows.runtime import ServerStartError, wait_healthy

    try:
        wait_healthy(target, timeout=5)
    except ServerStartError:
        out["note"] = (
            f"recorded in the ledger; the Prefect API {target} does not answer (is `obliviate serve` still "
            "running?), so the next reconciliation will process it."
        )
        return out
    try:
        out["event_id"] = emit_deletion_event(store.url, {"request_id": request_id, "store": store.url}, api_url=target)
        out["note"] = f"recorded in the ledger and announced to {target}."
    except Exception as err:  # noqa: BLE001 -- the ledger entry stands whatever failed; reconciliation picks it up
        out["note"] = f"recorded in the ledger; the event could not be sent ({err}); reconciliation will process it."
    return out


def wait_for_request(store_url: str, request_id: str, *, timeout_s: float, poll_s: float = 0.5) -> dict[str, Any]:
    """Poll the ledger until the request is ``done`` or ``rejected``; returns its entry.

    Raises:
        TimeoutError: still open after ``timeout_s``.
    """
    ledger = DeletionLedger(ObjectStore(store_url))
    deadline = time.monotonic() + timeout_s
    while True:
        entry = ledger.get(request_id)
        if entry.status in TERMINAL:
            return entry.as_dict()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"request {request_id} is still {entry.status!r} after {timeout_s:.0f} s; is `obliviate serve` running "
                "for this store? The entry stays in the ledger and will be processed."
            )
        time.sleep(poll_s)
