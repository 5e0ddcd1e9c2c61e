"""The ``unlearn`` flow: settle deletion requests across every registered run, and how requests reach it.

``unlearn`` runs on a deletion event (see :mod:`flows.deployments`). It checks the payload, then
processes every open ledger request, so requests that arrived meanwhile are merged into the same
pass; ``reconcile`` (cron) does the same without an event, so a lost event or a crashed run loses
nothing. One pass:

1. claim due requests (CAS on each request's status: a request is processed by one pass only;
   a claim whose lease lapsed, :mod:`storage.lease`, is taken over and the work it left in
   storage is resumed);
2. validate each against the registry: a request naming ids no registered run of its dataset
   trained on is rejected with the reason, nothing changed;
3. fan out one unlearning per affected run on Ray actors in parallel
   (:meth:`actors.chains.ChainWorker.unlearn`), each publishing a new model version by CAS;
4. settle each request on its own: ``done`` with the audit trail of every affected run, or a
   failed attempt recorded on that request (``pending`` after a back-off, ``failed`` after the
   last attempt); finished runs are skipped on a retry because their version lists the request.

Every request and run is isolated from the others (:mod:`flows.settle`).

Requests reach it through the ledger first, then a Prefect event (the Python API behind
`obliviate forget`): :func:`submit_deletion` appends the request to the store's ledger (durable before anything else
happens), then emits ``obliviate.deletion.requested`` for the store's resource id. An
``obliviate serve`` watching that store runs the ``unlearn`` flow on the event; if no event gets
through (no server, network), the cron reconciliation finds the pending ledger entry later, so an
acknowledged request is never lost. Other systems may send the event with the ids instead
(``{"ids": [...], "dataset": ...}``): the flow appends the request itself (:func:`event_request`;
the contract is in ``docs/unlearning.md``, "Deletion events from other systems").
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import functools
import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.artifacts import publish_request_artifacts, utc_text
from flows.batching import batch_gate
from flows.progress import PROGRESS_LOG_SECONDS
from flows.request_wait import wait_outcome  # noqa: F401 -- its home until forget --wait stopped importing Prefect
from flows.runtime import quiet_foreseen_tracebacks
from flows.settle import (
    PASS_WAIT_S,
    RAY_DISCONNECTING,
    STOPPING,
    UNREADABLE,
    AttemptPolicy,
    busy_result,
    held_pass_claim,
    run_pass,
    run_until_quiet,
    settle_unreadable,
    store_pass,
)
from flows.train import termination_behind, worker_pool
from obliviate.defaults import DEFAULT_MIN_POINTS, DEFAULT_STOP_RULE
from obliviate.errors import DataError
from obliviate.unlearning.deepobliviate import DEFAULT_EPSILON
from obliviate.unlearning.service import RequestError, check_name, parse_event_payload, parse_ids, request_id_for
from storage import retry
from storage.errors import CorruptObject, StorageUnavailable
from storage.lease import DEFAULT_LEASE_S
from storage.ledger import CLAIMED, FAILED, PENDING, REJECTED, TERMINAL, DeletionLedger, RequestStatus
from storage.objects import ObjectStore


def process_open_requests(
    store: str,
    *,
    policy: str = "exact",
    epsilon: float = DEFAULT_EPSILON,
    verify: bool = False,
    workers: int | None = None,
    attempts: AttemptPolicy | None = None,
    holder: str | None = None,
    stop_rule: str = DEFAULT_STOP_RULE,
    min_points: int = DEFAULT_MIN_POINTS,
) -> dict[str, Any]:
    """Claim, validate, fan out and settle every due request of ``store``, retrying soon-due failures.

    Each request and each run is isolated (:func:`flows.settle.run_pass`); the Ray fan-out is here.
    """
    attempts = attempts or AttemptPolicy()
    logger = get_run_logger()
    holder = holder or f"{flow_run.get_id() or 'local'}-{os.getpid()}"
    fanouts: list[dict[str, Any]] = []

    def unlearn_runs(per_run: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, Any]]:
        results, fanout = fan_out_unlearning(
            store,
            per_run,
            policy=policy,
            epsilon=epsilon,
            verify=verify,
            workers=workers,
            stop_rule=stop_rule,
            min_points=min_points,
            logger=logger,
            claim=held_pass_claim(store),  # called by the pass, in the thread that holds the store's pass claim
        )
        fanouts.append(fanout)
        logger.info(
            "fan-out of %d run(s) on %d worker(s) finished in %.1f s",
            len(per_run),
            fanout["workers"],
            fanout["seconds"],
        )
        return results

    object_store = ObjectStore(store)
    ledger = DeletionLedger(object_store)
    # One pass at a time per store (cron, serve's watcher, events): another pass's batch is its own.
    with store_pass(object_store, holder=holder, lease_s=attempts.lease_s, wait_s=PASS_WAIT_S) as other:
        if other is not None:
            return busy_result(ledger, other, lease_s=attempts.lease_s, logger=logger)
        # A request that cannot be read is failed with how to mend it (or, its status damaged too, named), before
        # the gate: it never joins a batch nor stops the others.
        found: dict[str, str] = {}
        due = ledger.due_entries(lease_s=attempts.lease_s, unreadable=found)
        unreadable = settle_unreadable(ledger, found, lease_s=attempts.lease_s, log=logger)
        # Deadline-aware batching (flows/batching.py): due requests wait until their batch flushes.
        gate = batch_gate(object_store, due)
        if gate.get("claim_lost"):  # another pass holds the store now (said by the gate): the batch is its own
            return {
                "claimed": [],
                "runs": {},
                "settled": {r: u["status"] for r, u in unreadable.items() if u["status"] == FAILED},
                "lost": [],
                "unreadable": unreadable,
                "claim_lost": gate["claim_lost"],
                "rejected_at_gate": gate.get("rejected", {}),
            }
        if gate["requests"] and not gate["flush"]:
            logger.info(
                "%d request(s) batched until %s (%s rule)",
                len(gate["requests"]),
                utc_text(gate["batched_until"]),
                gate["reason"],
            )
            finish_batched_events(object_store, logger=logger)  # e.g. a batched request cancelled meanwhile
            return {
                "claimed": [],
                "runs": {},
                "settled": {r: u["status"] for r, u in unreadable.items() if u["status"] == FAILED},
                "unreadable": unreadable,
                "batched": gate,
                "rejected_at_gate": gate.get("rejected", {}),
            }
        # rollback_refused: why no interim was published for a run, with its figures (the batch record keeps them)
        batch = {
            "reason": gate["reason"],
            "deadlines": gate["deadlines"],
            "rollback_refused": gate.get("rollback_refused"),
        }
        result = run_until_quiet(
            store,
            attempts=attempts,
            run_once=lambda: run_pass(
                store, unlearn_runs=unlearn_runs, attempts=attempts, holder=holder, logger=logger, batch=batch
            ),
        )
        result["unreadable"] = {**result.get("unreadable", {}), **unreadable}  # as said when first met
        result["settled"] = {
            **{r: u["status"] for r, u in unreadable.items() if u["status"] == FAILED},
            **result["settled"],
        }
        if result.get("claim_lost"):  # another pass holds the store now: its artifacts and events are its own
            return {**result, "fanout": fanouts[0] if fanouts else {}, "fanouts": fanouts}
        try:  # a request that cannot be read has no entry to show
            readable = {r: state for r, state in result["settled"].items() if r not in result["unreadable"]}
            publish_request_artifacts(object_store, ledger, readable)
        except Exception as err:  # noqa: BLE001 -- the ledger is settled; a dashboard artifact must not undo that
            logger.warning("could not publish the dashboard artifacts of %s: %s", sorted(result["settled"]), err)
        finish_batched_events(object_store, logger=logger)
        fanout = fanouts[0] if fanouts else {}
        return {**result, "fanout": fanout, "fanouts": fanouts, "rejected_at_gate": gate.get("rejected", {})}


# While a fan-out waits on its runs, what it waits on (and whether the store answers) is said this often.
FAN_OUT_LOG_S = PROGRESS_LOG_SECONDS
# A heartbeat's question to the store that is unanswered after this long counts as the store not answering
# (a refused connection is answered in 1-2 s; botocore's connect timeout is 5 s, tried twice).
STORE_PROBE_WAIT_S = 12.0


def fan_out_unlearning(
    store: str,
    per_run: dict[str, dict[str, list[int]]],
    *,
    policy: str,
    epsilon: float = DEFAULT_EPSILON,
    verify: bool,
    workers: int | None,
    stop_rule: str = DEFAULT_STOP_RULE,
    min_points: int = DEFAULT_MIN_POINTS,
    logger: Any = None,
    claim: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """One unlearning per run on pooled Ray actors in parallel; a run that raised is reported ``failed``.

    ``claim``: the pass claim of the pass fanning out (:func:`flows.settle.held_pass_claim`), checked by each worker
    before each write; a run whose worker found it taken over is ``failed`` with the :class:`ClaimLost` line, and
    the pass, finding its claim lost too, hands its requests back.

    While the runs unlearn, ``logger`` (default: this module's) hears every :data:`FAN_OUT_LOG_S` which runs
    are still waited on and, when the store does not answer, that it is unreachable and until when the
    workers retry it; and when it answers again (:class:`_FanOutWatch`).
    """
    import ray

    from flows.runtime import cluster_cpus, ensure_ray

    ensure_ray()
    pool_size = max(1, min(len(per_run), workers or cluster_cpus()))
    actors = worker_pool(store, pool_size)
    started = time.time()
    futures = {
        run_id: actors[i % pool_size].unlearn.remote(
            run_id,
            per_run[run_id],
            policy=policy,
            verify=verify,
            epsilon=epsilon,
            stop_rule=stop_rule,
            min_points=min_points,
            claim=claim,
        )
        for i, run_id in enumerate(sorted(per_run))
    }
    results: dict[str, dict[str, Any]] = {}
    # The workers' storage retries are silent here (Ray does not forward their logs), so a thread of its own
    # says what this wait waits on. A stop ends the wait: a SIGTERM comes out of Ray's wait, and a stopping serve
    # whose Ray runtime is gone says it disconnects (RAY_DISCONNECTING) before its ray.shutdown(); a blocking
    # ray.get then waited on after the shutdown returned, for ever in one of two runs, and the flow run had no
    # final state. The flag is looked at before each call: a call after the shutdown would start a new runtime.
    watch = _FanOutWatch(store, logger or logging.getLogger(__name__), list(futures), started=started)
    try:
        for run_id, future in futures.items():
            try:
                results[run_id] = _result_of(ray, future)
            except Exception as err:  # noqa: BLE001 -- any failure of one run is recorded on it; the others go on
                signal = termination_behind(err)
                if signal is not None:
                    # a SIGTERM during the wait: a stop of the pass, not this run's failure (recorded, it used
                    # up an attempt with a meaningless SystemError as the request's reason)
                    raise signal from None
                cause = getattr(err, "cause", None) or err  # a RayTaskError wraps the worker's own exception
                results[run_id] = {
                    "run_id": run_id,
                    "status": "failed",
                    "error": f"{type(cause).__name__}: {cause}"[:4000],
                }
            watch.done(run_id)
    except BaseException:
        watch.stop()  # a stop of the pass: not a word more, and nothing waited on
        raise
    watch.finish()
    return results, {"workers": pool_size, "runs": len(per_run), "seconds": time.time() - started}


#: How long one wait on a worker lasts before the fan-out looks again whether serve disconnects from Ray.
RESULT_WAIT_STEP_S = 1.0


def _result_of(ray: Any, future: Any) -> Any:
    """``ray.get(future)``, ended by a ``SystemExit`` (a stop: :func:`flows.settle._guarded`) once a stopping
    serve disconnects from its gone Ray runtime (:data:`flows.settle.RAY_DISCONNECTING`)."""
    while True:
        if RAY_DISCONNECTING.is_set():
            raise SystemExit("serve is stopping and disconnects from its Ray runtime")
        ready, _ = ray.wait([future], timeout=RESULT_WAIT_STEP_S)
        if ready:
            return ray.get(future)


class _FanOutWatch:
    """What a fan-out waits on, said every :data:`FAN_OUT_LOG_S` from a thread; and whether the store answers.

    Each heartbeat asks the store one cheap question (does its bucket or folder exist) on a thread of
    its own, waiting at most :data:`STORE_PROBE_WAIT_S` for the answer: a store that refuses it, or
    leaves it unanswered, is said to be unreachable, with until when the workers retry it; a store
    that answers again after that is said to. A question still unanswered is waited on again, not asked again.
    The heartbeat says nothing once :meth:`stop` or :meth:`finish` was called, nor while ``serve`` stops
    (:data:`flows.settle.STOPPING`): that stop ends the wait, and nothing of this class may stand in its way
    (no lock the fan-out's thread takes is held while a line is said). Only :meth:`finish` says, then, that a
    store seen unreachable answers again.
    """

    def __init__(self, store: str, logger: Any, run_ids: list[str], *, started: float) -> None:
        self._store = ObjectStore(store)
        self._logger = logger
        self._waiting = list(run_ids)
        self._total = len(run_ids)
        self._started = started
        self._lock = threading.Lock()  # guards the runs still waited on, never held while a line is said
        self._stopped = threading.Event()
        self._probe: threading.Thread | None = None
        self._outcome: list[str | None] = []
        self._asked_at = self._asked_wall = 0.0
        self._down_since: float | None = None
        self._thread = _thread_of_this_context(self._beat, name="fan-out-watch")
        self._thread.start()

    def done(self, run_id: str) -> None:
        with self._lock:
            self._waiting.remove(run_id)

    def stop(self) -> None:
        self._stopped.set()

    def finish(self) -> None:
        """The fan-out is over: a store seen unreachable and not since is said to have answered (its runs did)."""
        self._stopped.set()
        self._thread.join(STORE_PROBE_WAIT_S + 1.0)  # a heartbeat under way ends first
        if self._down_since is not None and self._probe is not None:
            self._probe.join(STORE_PROBE_WAIT_S)  # a question asked during the outage: ask afresh
        if self._down_since is not None and self._ask() is None:
            self._logger.info(
                "storage %s answers again, after %.0f s unreachable", self._store.url, time.time() - self._down_since
            )
        self._down_since = None

    def _beat(self) -> None:
        while not self._stopped.wait(FAN_OUT_LOG_S) and not STOPPING.is_set():
            try:
                self._heartbeat()
            except Exception:  # a heartbeat that cannot be said must never touch the fan-out
                logging.getLogger(__name__).debug("fan-out heartbeat failed", exc_info=True)

    def _heartbeat(self) -> None:
        failure = self._ask()
        now = time.time()
        with self._lock:
            run_ids = sorted(self._waiting)
        if self._stopped.is_set() or STOPPING.is_set() or not run_ids:
            return
        done = self._total - len(run_ids)
        runs = f"run{'s' if len(run_ids) > 1 else ''} {', '.join(run_ids)}"
        waited_s = now - self._started
        if failure is not None:
            if self._down_since is None:
                self._down_since = self._asked_wall  # it has not answered since the question that found it down
            deadline_s = retry.DEFAULT_RETRY_DEADLINE_S
            self._logger.warning(
                "storage %s is unreachable (%s), for %.0f s now; the unlearning of %s (waited on for %.0f s) "
                "retries its storage calls until about %s UTC (%.0f s after the outage was first seen), then that "
                "run fails and its requests' attempt is recorded",
                self._store.url,
                failure,
                now - self._down_since,
                runs,
                waited_s,
                _utc_clock(self._down_since + deadline_s),
                deadline_s,
            )
            return
        if self._down_since is not None:
            self._logger.info(
                "storage %s answers again, after %.0f s unreachable; the unlearning of %s goes on",
                self._store.url,
                now - self._down_since,
                runs,
            )
            self._down_since = None
        self._logger.info(
            "waiting on the unlearning of %s for %.0f s (%d of %d run(s) done)", runs, waited_s, done, self._total
        )

    def _ask(self) -> str | None:
        """Why the store did not answer a cheap question (``None``: it answered); a question in flight is waited on."""
        if self._probe is None or not self._probe.is_alive():
            self._outcome = []
            self._asked_at, self._asked_wall = time.monotonic(), time.time()
            self._probe = _thread_of_this_context(self._question, self._outcome, name="fan-out-store-probe")
            self._probe.start()
        self._probe.join(STORE_PROBE_WAIT_S)
        if self._outcome:
            return self._outcome[0]
        return f"it has not answered a question asked {time.monotonic() - self._asked_at:.0f} s ago"

    def _question(self, outcome: list[str | None]) -> None:
        try:
            self._store.container_exists()
            outcome.append(None)
        except StorageUnavailable as err:
            cause = err.__cause__ or err
            outcome.append(f"{type(cause).__name__}: {cause}"[:300])
        except Exception:  # noqa: BLE001 -- any other answer is an answer: the store is reachable
            outcome.append(None)


def _thread_of_this_context(target: Any, *args: Any, name: str) -> threading.Thread:
    """A daemon thread running ``target(*args)`` in a copy of the calling thread's context variables.

    Prefect keeps its settings (the API URL among them) and the flow run in context variables, and a new
    thread starts without them: a Prefect logger called there saw the settings of import time, so under
    ``serve`` (its own server, no ``PREFECT_API_URL``) each of its lines started a temporary Prefect server
    whose log lines never reached serve's dashboard (probe 113).
    """
    return threading.Thread(target=contextvars.copy_context().run, args=(target, *args), name=name, daemon=True)


def _utc_clock(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%H:%M:%S")


@flow(name="unlearn")
def unlearn_flow(
    store: str,
    payload: Any = None,
    event_id: str | None = None,
    policy: str = "exact",
    verify: bool = False,
    workers: int | None = None,
    lease_s: float = DEFAULT_LEASE_S,
    max_attempts: int = 3,
    epsilon: float = DEFAULT_EPSILON,
    stop_rule: str = DEFAULT_STOP_RULE,
    min_points: int = DEFAULT_MIN_POINTS,
) -> dict[str, Any]:
    """Handle one deletion event: check it, then settle every open request (merged).

    The event's outcome is kept in ``ledger/events/<event id>`` (:meth:`~storage.ledger.DeletionLedger.record_event`):
    ``rejected`` with the reason, ``duplicate`` (the request was already settled or being worked on),
    ``processed``, or ``batched`` (the request waits in the open batch until ``batched_until``), each
    with the request's status after this run (``status``, ``status_version``, and ``reason`` when it
    was refused). This delivery is one entry of the record's ``deliveries``, named by its flow run's
    id. A ``batched`` record is finished by the pass that settles its request (:func:`finish_batched_events`). A refused event, or one whose request ends ``rejected`` or ``failed``, ends the flow
    run ``Failed`` with the reason as its message (a :class:`RequestError`, no traceback).

    An event for a request whose ledger record is damaged is handled like any other: the pass
    records the request ``failed`` with how to mend it (:func:`flows.settle.settle_unreadable`) and
    settles the other requests, the event's record says so, and the run ends ``Failed`` with that
    reason, as for any request that ended ``failed``. One whose current status is damaged too is
    recorded ``unreadable`` in the event's record (the ledger cannot take a status for it), and the
    run ends ``Failed`` with what is damaged and how to mend it. The damage never ends the run as
    an error of its own, and never stops the pass: an event of another request ends ``Completed``.

    Args:
        store: the store of runs and ledger.
        payload: the event payload: ``{"request_id": ...}`` naming a ledger entry, or
            ``{"ids": [...], "dataset": ..., "request_id"?: ..., "reason"?: ...}`` which appends the
            request first (:func:`record_deletion`; the request id defaults to one derived from
            the event id, so a redelivered event is one request).
        event_id: the event's id (for the ledger's event log).
        policy: ``exact`` (default) or ``deepobliviate``.
        verify: also retrain naively and report consistency (costs a full retrain per run).
        workers: Ray workers for the fan-out (default: cluster CPUs).
        lease_s: a claim whose lease was not renewed for this long is taken over.
        max_attempts: attempts per request before it becomes ``failed``.
        epsilon: DeepObliviate's stop threshold ε (``policy="deepobliviate"`` only).
        stop_rule: DeepObliviate's stop rule, ``residual_ratio`` (default), ``ratio`` or ``slope``.
        min_points: DeepObliviate's m, the fewest Δ points before the fit and the rule are tried (default 5).

    Raises:
        RequestError: the event was refused, or the request it names ended ``rejected`` or ``failed``.
    """
    quiet_foreseen_tracebacks()  # a refused event is a sentence, also in a runner's subprocess log
    logger = get_run_logger()
    ledger = DeletionLedger(ObjectStore(store))
    event_id = event_id or f"manual-{uuid.uuid4().hex[:12]}"
    received_at = time.time()
    # Names this delivery in the event's record: its flow run, so the record leads to its logs.
    delivery = str(flow_run.get_id() or f"local-{uuid.uuid4().hex[:12]}")
    try:
        request_id = event_request(store, payload, event_id=event_id)
    except RequestError as err:
        logger.warning("deletion event %s rejected: %s", event_id, err)
        ledger.record_event(
            event_id,
            {
                "outcome": REJECTED,
                "reason": str(err),
                "payload": repr(payload)[:500],
                "received_at": received_at,
                "delivery": delivery,
            },
        )
        raise RequestError(f"deletion event {event_id} refused, nothing changed: {err}") from None
    entry = request_entry(ledger, request_id)
    live_claim = entry.status == CLAIMED and not ledger.claim_lapsed(entry, lease_s=lease_s, now=received_at)
    if entry.status in TERMINAL or live_claim:
        ledger.record_event(event_id, _event_record("duplicate", entry, received_at=received_at, delivery=delivery))
        logger.info("event %s: request %s is already %s; nothing to do", event_id, request_id, entry.status)
        _fail_if_refused(event_id, entry)
        return {"event_id": event_id, "outcome": "duplicate", "request_id": request_id, "status": entry.status}
    ledger.record_event(
        event_id,
        {"outcome": "processing", "request_id": request_id, "received_at": received_at, "delivery": delivery},
    )
    attempts = AttemptPolicy(lease_s=lease_s, max_attempts=max_attempts)
    result = process_open_requests(
        store,
        policy=policy,
        epsilon=epsilon,
        verify=verify,
        workers=workers,
        attempts=attempts,
        stop_rule=stop_rule,
        min_points=min_points,
    )
    gate = result.get("batched") or {}
    if request_id not in result["claimed"] and request_id in gate.get("requests", []):
        # Waiting in the open batch (serve --batch-window): not a duplicate. The pass that settles the
        # request later finishes this record with what became of it (finish_batched_events).
        waiting = request_entry(ledger, request_id)
        record = {
            **_event_record(BATCHED, waiting, received_at=received_at, delivery=delivery),
            "batched_until": gate.get("batched_until"),
            "flush_rule": gate.get("reason"),
            "deadline": gate.get("deadlines", {}).get(request_id),
        }
        ledger.record_event(event_id, record)
        final = _note_batched_event(ledger, event_id, record)
        logger.info(
            "event %s: request %s is batched until %s (%s rule)",
            event_id,
            request_id,
            utc_text(gate["batched_until"]) if gate.get("batched_until") else "its batch flushes",
            gate.get("reason"),
        )
        _fail_if_refused(event_id, final)
        return {"event_id": event_id, "outcome": BATCHED, "request_id": request_id, "status": final.status, **result}
    unreadable = result.get("unreadable", {})
    handled = (
        request_id in result["claimed"]
        or request_id in result.get("rejected_at_gate", {})
        or (request_id in unreadable)
    )
    outcome = "processed" if handled else "duplicate"
    # The record said "processing" for good before: now it says what became of the request.
    settled = request_entry(ledger, request_id)
    if settled.status == UNREADABLE and request_id in unreadable:  # the pass said what it could not record
        settled = replace(settled, details={"reason": unreadable[request_id]["reason"]})
    ledger.record_event(event_id, _event_record(outcome, settled, received_at=received_at, delivery=delivery))
    _fail_if_refused(event_id, settled)
    return {"event_id": event_id, "outcome": outcome, "request_id": request_id, "status": settled.status, **result}


def _event_record(outcome: str, entry: RequestStatus, *, received_at: float, delivery: str | None) -> dict[str, Any]:
    """One delivery's record of an event whose request is in the ledger: the outcome and the request's status.

    ``status_version`` (the request's status version read) tells a delivery that took the request up
    after a ``forget --retry`` from one that met the same pass (:meth:`~storage.ledger.DeletionLedger.record_event`).
    """
    body: dict[str, Any] = {
        "outcome": outcome,
        "request_id": entry.request_id,
        "status": entry.status,
        "status_version": entry.version,
        "received_at": received_at,
        "delivery": delivery,
    }
    why = entry.details.get("reason") or entry.details.get("last_error")
    if entry.status in (REJECTED, FAILED, UNREADABLE) and why:
        body["reason"] = str(why)[:2000]
    return body


def request_entry(ledger: DeletionLedger, request_id: str) -> RequestStatus:
    """The request's entry (:meth:`~storage.ledger.DeletionLedger.get`), also when it cannot be read.

    An event may name a request whose record is damaged; reading it raised ``CorruptObject`` and
    the event's run ended as a crash, before any pass recorded the request. Here such a request is
    its status history alone: its latest status (``failed`` with the mend once a pass recorded it),
    with ``{"request_id": ..., "unreadable": <what get said>}`` as its request; a request whose
    current status is damaged too is :data:`~flows.settle.UNREADABLE`, with what ``get`` said as
    its reason.
    """
    try:
        return ledger.get(request_id)
    except CorruptObject as err:
        damaged = str(err)
    request = {"request_id": request_id, UNREADABLE: damaged}
    history = ledger.history(request_id)
    if not history:  # no status written yet: pending
        return RequestStatus(request, PENDING, {}, 0, time.time())
    last = history[-1]
    if last["status"] == UNREADABLE:
        return RequestStatus(request, UNREADABLE, {"reason": damaged}, int(last["version"]), time.time())
    return RequestStatus(request, str(last["status"]), dict(last["details"]), int(last["version"]), float(last["at"]))


BATCHED = "batched"
BATCHED_EVENTS_PREFIX = "ledger/batch/events"  # one note per event whose request waits in a batch


def _batched_note_key(event_id: str) -> str:
    return f"{BATCHED_EVENTS_PREFIX}/{hashlib.sha256(str(event_id).encode()).hexdigest()[:24]}.json"


def _note_batched_event(ledger: DeletionLedger, event_id: str, record: dict[str, Any]) -> RequestStatus:
    """Note an event recorded ``batched`` for :func:`finish_batched_events`; returns its request's entry now.

    The note is written before the request is read again: a pass that settled the request before
    the note existed is seen here (and the record finished at once), one that settles it after
    finds the note.
    """
    key = _batched_note_key(event_id)
    ledger.store.put_json(key, {"event_id": str(event_id), "record": record})
    entry = request_entry(ledger, str(record["request_id"]))
    if entry.status in TERMINAL:
        _finish_batched_event(ledger, key, {"event_id": str(event_id), "record": record}, entry)
    return entry


def _finish_batched_event(ledger: DeletionLedger, key: str, note: Mapping[str, Any], entry: RequestStatus) -> None:
    """Rewrite a ``batched`` event record with its settled request's final status, then drop its note."""
    record = dict(note["record"])
    final = _event_record(
        BATCHED, entry, received_at=float(record.get("received_at", 0.0)), delivery=record.get("delivery")
    )
    ledger.record_event(str(note["event_id"]), {**record, **final, "settled_at": entry.updated_at})
    ledger.store.delete(key)


def finish_batched_events(store: ObjectStore, *, logger: Any = None) -> list[str]:
    """Finish the records of events whose request waited in a batch and is now settled; returns their event ids.

    An event that found its request batched is recorded ``batched`` with ``status: pending``; the
    pass that later settles the request (or any pass after a cancel) calls this, and the record
    then says what became of the request (``status``, ``reason`` when rejected or failed,
    ``settled_at``), keeping ``outcome: batched`` and ``batched_until``. Costs one listing of the
    notes of events still waiting.
    """
    ledger = DeletionLedger(store)
    finished: list[str] = []
    for key in store.list(BATCHED_EVENTS_PREFIX):
        try:
            note = store.get_json(key)
            entry = request_entry(ledger, str(note["record"]["request_id"]))
            if entry.status in TERMINAL:
                _finish_batched_event(ledger, key, note, entry)
                finished.append(str(note["event_id"]))
        except Exception as err:  # noqa: BLE001 -- the requests are settled; an audit note must not undo that
            if logger is not None:
                logger.warning("batched event note %s could not be finished: %s", key, err)
    return finished


def _fail_if_refused(event_id: str, entry: RequestStatus) -> None:
    """End the event's flow run ``Failed`` when its request was rejected or failed (or cannot be read), with the reason."""
    if entry.status not in (REJECTED, FAILED, UNREADABLE):
        return
    why = str(entry.details.get("reason") or entry.details.get("last_error") or "no reason recorded").rstrip(". ")
    raise RequestError(
        f"deletion event {event_id}: request {entry.request_id} is {entry.status}: {why}. "
        f"`obliviate forget --status {entry.request_id}` shows its entry."
    )


def event_request(store: str, payload: Any, *, event_id: str) -> str:
    """The ledger request a deletion event stands for; an ``ids`` payload is appended to the ledger first.

    An ``ids`` payload naming a request whose record is damaged stands for that request (its
    record cannot be compared with the ids): the event's pass records it ``failed`` with how to mend it.

    Raises:
        RequestError: a payload of neither form, a ``request_id`` not in the ledger, or ids that
            :func:`record_deletion` refuses (nothing written).
    """
    ledger = DeletionLedger(ObjectStore(store))
    if isinstance(payload, Mapping) and "ids" in payload:
        dataset = payload.get("dataset")
        if not isinstance(dataset, str) or not dataset:
            raise RequestError(
                f"rule: a deletion event with 'ids' names the dataset they index in 'dataset' (as runs were trained "
                f"with --data); got {dataset!r}. Send {{'ids': [...], 'dataset': 'digits'}}, or write the request "
                "first and send {'request_id': ...}."
            )
        given = payload.get("request_id")
        request_id = None if given is None else check_name(given, what="request id")
        reason = payload.get("reason")
        try:
            record = record_deletion(
                store,
                payload["ids"],
                dataset=dataset,
                reason=None if reason is None else str(reason)[:2000],
                request_id=request_id,
                salt=f"event-{event_id}",
            )
        except CorruptObject:
            # The request is in the ledger, its record damaged (it cannot be compared with these ids): the event
            # stands for it, and its pass records it failed with how to mend it (refiling it is the mend).
            if request_id is None:
                values = parse_ids(payload["ids"], dataset_size=dataset_rows(dataset), dataset=dataset)
                request_id = new_request_id(values, dataset=dataset, salt=f"event-{event_id}")
            return request_id
        return str(record["request_id"])
    request_id = parse_event_payload(payload)
    if not ledger.exists(request_id):
        raise RequestError(
            f"rule: a deletion event names a request already in the ledger; {request_id!r} is not there. "
            "Write the ledger entry first (`obliviate forget --no-event`, or "
            "flows.unlearn.submit_deletion(..., emit=False)), or send {'ids': [...], 'dataset': ...} instead."
        )
    return request_id


EVENT_NAME = "obliviate.deletion.requested"
ENDPOINT_KEY = "service/endpoint.json"
HEARTBEAT_KEY = "service/heartbeat.json"


def store_resource_id(store_url: str) -> str:
    """The Prefect resource id of a store: the events of one store trigger only its own `serve`."""
    return "obliviate.store." + hashlib.sha256(ObjectStore(store_url).url.encode()).hexdigest()[:16]


ENDPOINT_STALE_S = 30.0  # serve renews its announcement every few seconds; older means it is gone
SERVE_LIVE = "announced by a live `obliviate serve`"  # served_endpoint's reason when a serve is live


def served_api_url(store: ObjectStore) -> str | None:
    """The Prefect API URL a live ``obliviate serve`` of this store announced, if any."""
    return served_endpoint(store)[0]


def served_endpoint(store: ObjectStore) -> tuple[str | None, str]:
    """``(API URL of a live serve or None, why not)``: an announcement whose heartbeat stopped is stale."""
    from storage.errors import CorruptObject, ObjectNotFound

    try:
        body = store.get_json(ENDPOINT_KEY)  # a read racing a rewrite is read again by the store
    except ObjectNotFound:
        return None, "no `obliviate serve` announced itself for this store"
    except CorruptObject:
        return None, "the serve announcement in the store is unreadable"
    api_url = str(body.get("api_url") or "") or None
    if body.get("stopped_at"):
        return None, f"the `obliviate serve` that served this store{f' through {api_url}' if api_url else ''} stopped"
    heartbeat = float(body.get("started_at", 0.0))
    with contextlib.suppress(ObjectNotFound, CorruptObject):  # no readable heartbeat: the start counts
        beat = store.get_json(HEARTBEAT_KEY)
        if beat.get("pid") == body.get("pid"):
            heartbeat = max(heartbeat, float(beat.get("heartbeat_at", 0.0)))
    age = time.time() - heartbeat
    if age > ENDPOINT_STALE_S:
        return None, (
            f"the `obliviate serve` that served this store{f' through {api_url}' if api_url else ''} stopped renewing "
            f"its announcement {age:.0f} s ago"
        )
    return api_url, SERVE_LIVE


SERVE_CLAIM_KEY = "service/serve-claim"  # a pointer: moved by compare-and-swap, so two serves never both win
SERVE_START_ALLOWANCE_S = 120.0  # a serve that claimed a store announces itself within this (Prefect, Ray start)


def claim_serving(store: ObjectStore, *, pid: int, host: str) -> None:
    """Become the one ``obliviate serve`` of ``store``, or raise naming the one that is.

    Checking for a live announcement and then announcing let two serves started together both
    run, each overwriting the other's announcement (the store then said nobody served it). The
    claim is a compare-and-swap from the version read before the check: of two serves starting
    together one wins. A claim whose serve never announced itself within
    :data:`SERVE_START_ALLOWANCE_S`, or whose announcement went stale or stopped, is taken over.

    Raises:
        ConfigError: a live serve holds the store, one is starting, or another claimed it just now.
    """
    from obliviate.errors import ConfigError
    from storage.errors import PointerConflict

    fix = "one serve per store. Stop that one first (Ctrl-C), or serve another --store."
    claim = store.read_pointer(SERVE_CLAIM_KEY)
    live_api, _ = served_endpoint(store)
    if live_api is not None:
        raise ConfigError(
            f"store {store.url} is already served by a live `obliviate serve` (announced through {live_api}); {fix}"
        )
    if claim is not None:
        holder = claim.target
        age = time.time() - float(holder.get("claimed_at", 0.0))
        announced = False
        with contextlib.suppress(Exception):  # no readable announcement: not announced
            announced = int(store.get_json(ENDPOINT_KEY).get("pid", -1)) == int(holder.get("pid", -2))
        if not announced and age < SERVE_START_ALLOWANCE_S:
            raise ConfigError(
                f"store {store.url} is being claimed by another `obliviate serve` that is starting (pid "
                f"{holder.get('pid')} on {holder.get('host')}, {age:.0f} s ago); {fix} If that serve died while "
                f"starting, the store is free {SERVE_START_ALLOWANCE_S - age:.0f} s from now."
            )
    target = {"pid": pid, "host": host, "claimed_at": time.time()}
    try:
        store.swap_pointer(SERVE_CLAIM_KEY, target, expected_version=claim.version if claim else 0)
    except PointerConflict:
        raise ConfigError(f"another `obliviate serve` claimed store {store.url} at the same moment; {fix}") from None


def renew_serving(store: ObjectStore, *, announcement: Mapping[str, Any], host: str) -> tuple[str, str]:
    """Keep a running serve's claim and announcement in ``store``, or learn that another serve holds the store now.

    A store that lost its objects while serve ran (an S3 server restarted empty, its bucket or ``service/`` folder
    deleted and made again) lost serve's claim and announcement with them: ``forget`` then said that no serve ran
    while this one still worked, and a second serve was let claim the store. serve's heartbeat calls this each tick.
    The claim (:data:`SERVE_CLAIM_KEY`) decides, as in :func:`claim_serving`: a claim another serve took after this
    one started is that serve's while it is live or starting; any other claim (none, a dead serve's, one older than
    this serve) is taken back by a compare-and-swap, and the announcement is written back when it is missing,
    unreadable or names another process.

    Args:
        store: the served store.
        announcement: this serve's announcement (its ``pid`` and ``started_at`` identify it).
        host: this serve's host name (a claim names ``pid`` and ``host``).

    Returns:
        ``("kept", "")``: nothing was missing; ``("restored", line)``: the claim or the announcement was written
        back (``line`` says which, for serve's log); ``("lost", line)``: another serve holds the store now (``line``
        names it); this serve must stop.

    Raises:
        StorageError: the store did not answer; the next tick tries again.
        PointerConflict: another process moved the claim during this call; the next tick decides again.
    """
    from storage.errors import ObjectNotFound

    pid, started_at = int(announcement["pid"]), float(announcement.get("started_at", 0.0))
    claim = store.read_pointer(SERVE_CLAIM_KEY)
    holder = claim.target if claim is not None else {}
    claim_is_mine = claim is not None and int(holder.get("pid", -1)) == pid and holder.get("host") == host
    if claim is not None and not claim_is_mine and float(holder.get("claimed_at", 0.0)) >= started_at:
        live_api, _ = served_endpoint(store)
        announced_by_holder = False
        with contextlib.suppress(Exception):  # no readable announcement: not announced
            announced_by_holder = int(store.get_json(ENDPOINT_KEY).get("pid", -1)) == int(holder.get("pid", -2))
        live = announced_by_holder and live_api is not None
        claim_age = time.time() - float(holder.get("claimed_at", 0.0))
        starting = not announced_by_holder and claim_age < SERVE_START_ALLOWANCE_S
        if live or starting:
            through = f", announced through {live_api}" if live else ", starting"
            return "lost", (
                f"store {store.url} is held by another `obliviate serve` now (pid {holder.get('pid')} on "
                f"{holder.get('host')}{through}), which claimed it at {utc_text(float(holder.get('claimed_at', 0.0)))} "
                "while this serve's claim or announcement was gone or stale (store reset? outage?); one serve per "
                "store, so this one stops"
            )
    if not claim_is_mine:  # none (lost with the store), a dead serve's, or one from before this serve started
        target = {"pid": pid, "host": host, "claimed_at": time.time()}
        store.swap_pointer(SERVE_CLAIM_KEY, target, expected_version=claim.version if claim else 0)
    try:
        body: dict[str, Any] | None = store.get_json(ENDPOINT_KEY)
        state = "missing (store reset?)" if body is None else ""
    except ObjectNotFound:
        body, state = None, "missing (store reset?)"
    except CorruptObject:
        body, state = None, "unreadable"
    if body is not None and int(body.get("pid", -1)) != pid:
        state = f"another process's (pid {body.get('pid')}), though this serve holds the store's claim"
    elif body is not None and body.get("stopped_at"):
        state = "marked stopped"
    if state:
        # the heartbeat first: an announcement read before it would look as old as serve's start
        store.put_json(HEARTBEAT_KEY, {"pid": pid, "heartbeat_at": time.time()})
        store.put_json(ENDPOINT_KEY, dict(announcement))
        return "restored", f"the store's serve announcement was {state}; announced again"
    if claim is None:
        return "restored", "the store's serve claim (service/serve-claim) was missing (store reset?); claimed again"
    return "kept", ""


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
        # Draining logs "Still processing items: 1 items remaining..." as a WARNING while it sends the
        # one event it is asked to send; the event's id is the outcome, so that line is noise here.
        drain_logger = logging.getLogger(EventsWorker.__name__)
        level = drain_logger.level
        drain_logger.setLevel(logging.ERROR)
        try:
            EventsWorker.drain_all(timeout=30)
        finally:
            drain_logger.setLevel(level)
    return str(event.id) if event is not None else None


def dataset_rows(dataset: str) -> int | None:
    """Rows of ``dataset``, or ``None`` when it does not load here (a path only serve's machine has).

    Loaded once per process (a file or folder again when its modification time or size changes):
    ``mnist5k`` takes 1-2 s to load, and a service submits many requests.
    """
    from obliviate.data import BUILTIN_DATASETS

    path = Path(dataset).expanduser()
    stamp: tuple[int, int] | None = None
    if dataset not in BUILTIN_DATASETS and path.exists():
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    return _dataset_rows(dataset, stamp)


@functools.lru_cache(maxsize=16)
def _dataset_rows(dataset: str, stamp: tuple[int, int] | None) -> int | None:
    from obliviate.data import load_dataset

    try:
        return len(load_dataset(dataset))
    except DataError:
        return None


def new_request_id(ids: Sequence[int], *, dataset: str, salt: str | None = None) -> str:
    """The id a new deletion request gets when its sender names none.

    Derived from the ids and the dataset, made unique by ``salt`` (default: the time and a random
    token), so two requests for the same ids are two requests unless the sender reuses an id.
    """
    salt = salt if salt is not None else f"{time.time_ns()}-{uuid.uuid4().hex}"
    return request_id_for(ids, dataset=dataset, salt=salt)


def record_deletion(
    store_url: str,
    ids: Any,
    *,
    dataset: str,
    reason: str | None = None,
    request_id: str | None = None,
    salt: str | None = None,
    deadline_s: float | None = None,
) -> dict[str, Any]:
    """Append a deletion request to the store's ledger, checked as ``obliviate forget`` checks it.

    The ids are checked by :func:`obliviate.unlearning.service.parse_ids` against the dataset's
    rows when the dataset loads here (:func:`dataset_rows`), else against int64. Idempotent on
    ``request_id``: the same id with the same ids returns the stored entry.

    Args:
        store_url: the store holding the ledger.
        ids: dataset sample ids, a list or ``"3,17,42"``.
        dataset: the dataset the ids index.
        reason: free text kept in the ledger.
        request_id: idempotency key; default derived from the ids, the dataset and ``salt``.
        salt: what makes a derived request id unique (default: the time and a random token).
        deadline_s: seconds from receipt the request must be exact by (default: the store's batch
            policy's, ``serve --deadline``); recorded as its ``deadline`` and kept through policy changes.

    Returns:
        ``request_id``, ``status``, ``new`` (False for a repeat), ``ids`` (sorted) and ``dataset``.

    Raises:
        RequestError: malformed or out-of-range ids, or a request id reused for other ids (nothing written).
    """
    values = parse_ids(ids, dataset_size=dataset_rows(dataset), dataset=dataset)
    ledger = DeletionLedger(ObjectStore(store_url))
    request_id = request_id or new_request_id(values, dataset=dataset, salt=salt)
    entry, created = ledger.append(
        request_id=request_id, ids=values, dataset=dataset, reason=reason, deadline_s=deadline_s
    )
    return {"request_id": request_id, "status": entry.status, "new": created, "ids": list(values), "dataset": dataset}


def submit_deletion(
    store_url: str,
    ids: Any,
    *,
    dataset: str,
    reason: str | None = None,
    request_id: str | None = None,
    emit: bool = True,
    api_url: str | None = None,
    deadline_s: float | None = None,
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
        deadline_s: seconds from receipt the request must be exact by (default: the store's batch
            policy's, ``serve --deadline``; see :func:`record_deletion`).

    Returns:
        ``request_id``, ``status``, ``new`` (False for a repeat), ``event_id`` (or ``None``) and a note.

    Raises:
        RequestError: malformed ids, ids past the dataset's rows (when ``dataset`` loads here, as
            ``obliviate forget`` checks them), or a request id reused for other ids (nothing written).
    """
    store = ObjectStore(store_url)
    record = record_deletion(
        store.url, ids, dataset=dataset, reason=reason, request_id=request_id, deadline_s=deadline_s
    )
    request_id = record["request_id"]
    out: dict[str, Any] = {**{k: record[k] for k in ("request_id", "status", "new")}, "event_id": None}
    out |= {"ids": record["ids"], "dataset": dataset}
    if not out["new"] and out["status"] in TERMINAL:
        out["note"] = f"request {request_id} was already {out['status']}; nothing changed."
        return out
    if not emit:
        out["note"] = "recorded in the ledger; the reconciliation schedule will process it."
        return out
    served, why = served_endpoint(store)
    target = api_url or os.environ.get("PREFECT_API_URL") or served
    if not target:
        out["note"] = (
            f"recorded in the ledger; no Prefect API is configured and {why}, so it waits for the next "
            "serve's reconciliation."
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
