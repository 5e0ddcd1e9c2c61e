"""Deadline-aware batching in the service (SPEC section 6): when the open requests are processed.

The rules are pure (:mod:`obliviate.unlearning.batching`); this module keeps their state in the
store next to the ledger:

* ``service/batch_policy.json``: the policy ``obliviate serve --batch-window/--batch-max/--deadline``
  runs with (absent: every request is processed at once, as before batching);
* ``ledger/batch/open.json``: the open batch: its requests, each one's deadline (as the ledger
  recorded it when the request was accepted), and
  ``batched_until`` (when it flushes and which rule decides it) -- what ``forget --status`` shows;
* ``ledger/flush/<time>.json``: a forced flush (``forget --now``), consumed by the next pass.

:func:`batch_gate` is called at the start of every unlearning pass (event or cron reconcile): it
says whether the open requests are due. The expected retrain time is the slowest registered run's
recorded block times from block 1 (the worst case), so a batch flushes early enough for every
request to be exact before its deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from flows.rollback import load_rollback, publish_interim, refusal_words, release_refused
from obliviate.errors import ConfigError
from obliviate.unlearning.batching import (
    BatchPolicy,
    PendingRequest,
    expected_retrain_seconds,
    flush_decision,
    new_request,
)
from storage.errors import ObjectNotFound
from storage.ledger import BATCH_POLICY_KEY
from storage.objects import ObjectStore
from storage.registry import RunRegistry

POLICY_KEY = BATCH_POLICY_KEY  # the ledger reads its deadline_s when it accepts a request
OPEN_BATCH_KEY = "ledger/batch/open.json"
FLUSH_PREFIX = "ledger/flush"


def save_policy(store: ObjectStore, policy: BatchPolicy) -> None:
    store.put_json(
        POLICY_KEY,
        {
            "window_s": policy.window_s,
            "batch_max": policy.batch_max,
            "deadline_s": policy.deadline_s,
            "margin_s": policy.margin_s,
        },
    )


def load_policy(store: ObjectStore) -> BatchPolicy:
    """The store's batch policy (immediate processing when ``serve`` never set one)."""
    try:
        return BatchPolicy(**store.get_json(POLICY_KEY))
    except ObjectNotFound:
        return BatchPolicy()


def request_flush(store: ObjectStore, *, reason: str) -> str:
    """Ask the next pass to flush the open batch now (``forget --now``)."""
    key = f"{FLUSH_PREFIX}/{time.time():.6f}.json"
    store.put_json(key, {"reason": reason, "at": time.time()})
    return key


def expected_retrain(store: ObjectStore) -> float:
    """Worst-case exact retrain of any registered run: all its recorded block times (block 1 on)."""
    registry = RunRegistry(store)
    worst = 0.0
    for run_id in registry.run_ids():
        current = registry.current(run_id)
        if current is None:
            continue
        seconds = registry.manifest(current).metadata.get("block_seconds") or []
        try:
            worst = max(worst, expected_retrain_seconds(seconds, first_block=1))
        except ConfigError:
            continue
    return worst


def pending_request(request: Mapping[str, Any], *, policy: BatchPolicy, now: float) -> PendingRequest:
    """A ledger request record as the batching rules see it, with the deadline it was given when accepted.

    A record written before the ledger recorded deadlines (no ``deadline``) gets its receipt +
    ``policy.deadline_s``, as every request did then; one without a receipt time counts as received ``now``.

    Raises:
        ConfigError: its recorded deadline is not a number (the message names the request).
    """
    return new_request(
        request_id=str(request["request_id"]),
        received_at=float(request.get("requested_at", now)),
        policy=policy,
        deadline=request.get("deadline"),
    )


def batch_gate(store: ObjectStore, pending: Sequence[Any], *, now: float | None = None) -> dict[str, Any]:
    """Whether the pending ledger entries flush now; records the open batch when they wait.

    Args:
        store: the service's store.
        pending: ledger entries not yet processed (objects with ``request_id`` and ``request``).
        now: the current time (default: the clock).

    Returns:
        ``{"flush": bool, "reason", "batched_until", "requests", "deadlines"}``; each deadline is
        the one the ledger recorded when it accepted the request (:func:`pending_request`), so a
        policy changed since (``serve --deadline``) moves none, and the deadline rule flushes by
        the earliest of them. Run by a pass inside :func:`flows.settle.store_pass`, the gate checks the
        store's pass claim before each of its writes (rejecting requests, publishing interim versions, recording
        the batch): found taken over (the pass stalled past its lease), it writes nothing more and returns
        ``{"flush": False, "reason": "claim_lost", "claim_lost": <the line said>, ...}``.
    """
    from flows.settle import lost_pass_claim

    def lost(where: str) -> dict[str, Any] | None:
        line = lost_pass_claim(store, where=where)
        if line is None:
            return None
        _logger().warning("%s", line)
        return {
            "flush": False,
            "reason": "claim_lost",
            "claim_lost": line,
            "batched_until": None,
            "requests": [],
            "deadlines": {},
            "rejected": rejected,
        }

    now = time.time() if now is None else now
    policy = load_policy(store)
    forced = store.list(FLUSH_PREFIX)
    rollback = load_rollback(store)
    # Without a window or rollback every pass flushes what is open: a `forget --now` asks for nothing more,
    # so its flush request is consumed and the batch keeps the window's rule (it was said to flush "when
    # `forget --now` asked", requests that came after it included).
    immediate = policy.window_s == 0 and not rollback["enabled"]
    if immediate and forced:
        if stop := lost("before consuming flush requests"):
            return stop
        for key in forced:
            store.delete(key)
    rejected: dict[str, str] = {}
    if not immediate:  # a request no run can apply is refused as it joins the batch, not when the batch flushes
        if stop := lost("before rejecting requests at its batch gate"):
            return stop
        rejected = reject_at_gate(store, pending, now=now)
        pending = [e for e in pending if e.request_id not in rejected]
    batch = [pending_request(e.request, policy=policy, now=now) for e in pending]
    deadlines = {r.request_id: r.deadline for r in batch}
    if rollback["enabled"]:  # requests rejected or cancelled since their rollback hold nothing back any more
        if stop := lost("before releasing the holds of refused requests"):
            return stop
        release_refused(store)
    if not batch:
        return {
            "flush": False,
            "reason": "empty",
            "batched_until": None,
            "requests": [],
            "deadlines": {},
            "rejected": rejected,
        }
    if immediate:  # immediate (default): no extra I/O; the pass itself rejects what no run can apply
        return {
            "flush": True,
            "reason": "window",
            "batched_until": now,
            "requests": sorted(deadlines),
            "deadlines": deadlines,
            "rejected": rejected,
        }
    decision = flush_decision(
        batch, now=now, policy=policy, expected_retrain_s=expected_retrain(store), force=bool(forced)
    )
    due, reason, interim = decision.due, decision.reason, None
    if rollback["enabled"]:  # exact at once: every affected run serves a checkpoint that never saw the ids
        # a damaged checkpoint an interim needs publishes nothing for that run and flushes now (never raises
        # out of the gate: every pass failed before claiming, and no request was ever attempted nor failed)
        if stop := lost("before publishing interim versions"):
            return stop
        interim = publish_interim(store, pending, floor_points=float(rollback["floor_points"]))
        if interim["flush_now"] and not due:
            due, reason = True, interim["flush_reason"]
        for name, refusal in interim["refused"].items():
            _logger().warning(
                "no interim version for %s; request(s) %s are retrained at once and stay unforgotten until it lands",
                refusal_words(f"run {name}", refusal),
                ", ".join(refusal["requests"]),
            )
        for name, failure in interim["failed"].items():
            _logger().warning(
                "no interim version for %s (requests %s): %s. %s",
                name,
                ", ".join(failure["requests"]),
                failure["error"],
                failure["mend"],
            )
    out = {
        "flush": due,
        "reason": reason,
        "interim": interim,
        # the figures of every interim not published (why, accuracy, floor, margin), kept in ledger/batch/open.json
        "rollback_refused": None if interim is None else interim["refused"] or None,
        "batched_until": decision.at,
        "requests": sorted(deadlines),
        "deadlines": deadlines,
        "rejected": rejected,
    }
    if stop := lost("before recording its batch at the gate"):
        return stop
    if due:
        for key in forced:
            store.delete(key)
        store.put_json(OPEN_BATCH_KEY, {**out, "flushed_at": now})
    else:
        store.put_json(OPEN_BATCH_KEY, {**out, "recorded_at": now})
    return out


def reject_at_gate(store: ObjectStore, pending: Sequence[Any], *, now: float | None = None) -> dict[str, str]:
    """Reject the requests joining the batch that no registered run can apply; returns request id -> reason.

    The rules are the pass's (:func:`flows.settle.runs_of`: ids that are no row of the dataset, no
    run of the dataset; ids of its rows no run trained on are accepted and wait in the batch like the
    others), so a request is refused when it arrives instead of when its batch flushes
    (a day later with ``--batch-window 1d``). Only requests not yet in the open batch are checked:
    one read of the batch record and of each run's spec per gate. A request whose runs cannot be
    known now (an unreadable spec), or any request while no run is registered at all, stays in the
    batch; the pass decides. One summary line is logged.
    """
    from flows.settle import load_specs, runs_of
    from obliviate.unlearning.service import RequestError
    from storage.ledger import PENDING, REJECTED, DeletionLedger

    now = time.time() if now is None else now
    try:
        previous = store.get_json(OPEN_BATCH_KEY)
        known = set() if previous.get("flush") else set(previous.get("requests") or [])
    except ObjectNotFound:
        known = set()
    joining = [e for e in pending if e.request_id not in known and e.status == PENDING]
    if not joining:
        return {}
    ledger = DeletionLedger(store)
    specs, spec_errors = load_specs(RunRegistry(store))
    if not specs and not spec_errors:  # no run registered yet (a first training may be under way): they wait
        return {}
    rejected: dict[str, str] = {}
    for entry in joining:
        reason = ""
        try:
            runs_of(entry, specs, spec_errors)
        except RequestError as err:
            reason = str(err)
        except Exception:  # noqa: BLE001, S110 -- not known to be refusable now: it waits, and its pass decides
            pass
        if not reason:
            continue
        details = {"reason": reason, "rejected_at": "batch gate", "finished_at": now}
        if ledger.transition(entry.request_id, status=REJECTED, details=details, allowed_from=(PENDING,)):
            rejected[entry.request_id] = reason
    if rejected:
        shown = "; ".join(f"{request_id}: {reason}" for request_id, reason in list(rejected.items())[:3])
        _logger().warning(
            "%d request(s) rejected as they joined the batch (not batched): %s%s",
            len(rejected),
            shown,
            f"; ... ({len(rejected) - 3} more; `obliviate forget --status <request>` gives each reason)"
            if len(rejected) > 3
            else "",
        )
    return rejected


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger inside a run (its log in the dashboard), else this module's."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 -- outside a flow or task run there is no run logger
        return logging.getLogger(__name__)


def open_batch(store: ObjectStore) -> dict[str, Any] | None:
    """The batch waiting to flush (its ``requests``, ``batched_until``, ``reason``), or ``None``."""
    try:
        batch = store.get_json(OPEN_BATCH_KEY)
    except ObjectNotFound:
        return None
    return None if batch.get("flush") else batch


def batch_holds_every_open_request(store: ObjectStore, *, now: float | None = None) -> bool:
    """Whether every open request waits in the open batch, not yet due and with no flush asked for.

    serve's watcher asks this every tick before reading any request: while it holds, a pass would
    only batch them again. It costs one read of the batch record and two listings (flush requests,
    open markers), however many requests wait; a request new since the batch was recorded makes it
    ``False`` (the caller then looks at the requests themselves).
    """
    from storage.ledger import DeletionLedger

    now = time.time() if now is None else now
    batch = open_batch(store)
    if batch is None or float(batch.get("batched_until") or 0.0) <= now or store.list(FLUSH_PREFIX):
        return False
    open_ids = DeletionLedger(store).open_request_ids()
    return bool(open_ids) and set(open_ids) <= set(batch.get("requests") or [])


def batch_status(store: ObjectStore, request_id: str) -> dict[str, Any] | None:
    """The open batch as seen by one request (``batched until T``), or ``None`` if it is not waiting in it."""
    batch = open_batch(store)
    if batch is None or request_id not in batch.get("requests", []):
        return None
    return {
        "batched_until": batch["batched_until"],
        "flush_rule": batch["reason"],
        "deadline": batch["deadlines"].get(request_id),
    }
