"""Deletion requests: the ledger first, then a Prefect event (the Python API behind `obliviate forget`).

:func:`submit_deletion` appends the request to the store's ledger (durable before anything else
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

from obliviate.service import parse_ids, request_id_for
from storage.ledger import TERMINAL, DeletionLedger
from storage.objects import ObjectStore

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
    out: dict[str, Any] = {"request_id": request_id, "status": entry.status, "new": created, "event_id": None,
                           "ids": list(values), "dataset": dataset}
    if not created and entry.status in TERMINAL:
        out["note"] = f"request {request_id} was already {entry.status}; nothing changed."
        return out
    if not emit:
        out["note"] = "recorded in the ledger; the reconciliation schedule will process it."
        return out
    target = api_url or os.environ.get("PREFECT_API_URL") or served_api_url(store)
    if not target:
        out["note"] = ("recorded in the ledger; no Prefect API is configured and no `obliviate serve` announced one "
                       "for this store, so it waits for the next serve's reconciliation.")
        return out
    from flows.runtime import ServerStartError, wait_healthy

    try:
        wait_healthy(target, timeout=5)
    except ServerStartError:
        out["note"] = (f"recorded in the ledger; the Prefect API {target} does not answer (is `obliviate serve` still "
                       "running?), so the next reconciliation will process it.")
        return out
    try:
        out["event_id"] = emit_deletion_event(store.url, {"request_id": request_id, "store": store.url}, api_url=target)
        out["note"] = f"recorded in the ledger and announced to {target}."
    except Exception as err:  # the ledger entry stands; reconciliation will pick it up
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
