"""The deletion ledger: every deletion request and its status history, durable in the store.

Layout under the store:

* ``ledger/requests/<request>.json``: the request as received (ids, dataset, reason, time) and its
  ``deadline`` (an absolute time: receipt + the batch policy's ``deadline_s`` then, see
  :func:`policy_deadline_s`); written once, before any event is emitted, so nothing acknowledged
  can be lost. A record written before deadlines were recorded has none: the batch gate gives it
  receipt + the current policy's deadline (:func:`flows.batching.batch_gate`).
* ``ledger/status/<request>``: a pointer whose versions are the request's status history.
  Every transition is a compare-and-swap, so two flow runs can never both claim or both finish
  one request. The states (README "Request states"):

  - ``pending``: waiting for a pass; after a failed attempt it carries ``attempts``,
    ``last_error`` and ``next_attempt_at`` (back-off) and is not picked up before that time;
  - ``claimed``: a pass works on it (``holder``, ``attempt``); its lease
    (:mod:`storage.lease`) is renewed while it works, and a lapsed lease lets the next pass take
    it over (the lapse counts as a failed attempt);
  - ``done``: applied to every affected run (audit trail in ``details``);
  - ``rejected``: refused as a whole with the reason (unknown ids, no run of its dataset);
  - ``failed``: gave up after ``max_attempts`` attempts, with every error; ``--retry`` puts it
    back to ``pending``;
  - ``cancelled``: withdrawn before it was applied (``forget --cancel``).
* ``ledger/trained/<request>/<run>.json``: a run that applied the request by training without its
  ids (the request was accepted before or while it trained), with the version; written by the
  training before it reads the request's status, and merged into a ``done`` request's
  ``details.runs`` by :meth:`DeletionLedger.record_runs` (by the training, or by :meth:`settle`
  when the request becomes ``done`` later), so the audit trail names every run that applied it.
* ``ledger/events/<event>``: a pointer whose current version says what happened to each deletion
  event received (processed, a duplicate, or rejected with the reason) and lists each of its
  deliveries with its outcome, the audit trail of the event side; every change is a
  compare-and-swap (:meth:`DeletionLedger.record_event`). A store
  written before kept it in ``ledger/events/<event>.json``: read while the pointer has no version,
  removed once it has one.
* ``ledger/open/<request>.json``: a marker for every request not in a terminal state, so a pass
  (and a retrain polling for new holds after every block) reads the open requests only, not a
  month of settled history. Written *before* a request or a non-terminal status is stored, and
  removed *after* a terminal status is: a crash can leave a stale marker (skipped, and removed
  when read) but never an open request without one. ``ledger/open-index.json`` records that the
  markers are complete; a ledger written before they existed is indexed once, on first use.

A request whose status pointer is missing (a crash between the two writes) reads as ``pending``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from obliviate.unlearning.batching import DEFAULT_DEADLINE_S, BatchPolicy
from obliviate.unlearning.service import RequestError, check_name, retry_delay_s
from storage import lease
from storage.errors import CorruptObject, ObjectExists, ObjectNotFound, PointerConflict, StorageError
from storage.objects import ObjectStore
from storage.retry import swap_attempts

_log = logging.getLogger(__name__)

PENDING, CLAIMED, DONE, REJECTED = "pending", "claimed", "done", "rejected"
FAILED, CANCELLED = "failed", "cancelled"
TERMINAL = frozenset({DONE, REJECTED, FAILED, CANCELLED})
#: States of a request whose ids are erased rows of its dataset (:func:`erased_ids`): ``done``, or accepted and not
#: yet done (``pending``, ``claimed``, and ``failed``, which ``forget --retry`` puts back). A ``rejected`` or
#: ``cancelled`` request erased nothing.
STANDING = frozenset({PENDING, CLAIMED, DONE, FAILED})
#: In a ``failed`` request's details: failed because its record cannot be read (:meth:`DeletionLedger.fail_unreadable`).
DAMAGED_RECORD = "damaged_record"
_CAS_ATTEMPTS = 20
_OPEN_PREFIX, _OPEN_INDEX_KEY = "ledger/open", "ledger/open-index.json"
_EVENTS_PREFIX = "ledger/events"
#: The most deliveries one event's record lists (:meth:`DeletionLedger.record_event`): the first and the latest.
#: A sender that redelivers one event id without end must not grow its record, rewritten at each delivery, without end.
MAX_EVENT_DELIVERIES = 50
_TRAINED_PREFIX = "ledger/trained"
#: A pass's audit of a run whose current version already listed the request: a training record of that
#: run says how (trained without its ids, in which version) and replaces it.
_ALREADY_APPLIED = "already_applied"
#: A pass's audit of a registered run with no version yet (its training had not published): the
#: training leaves the request's ids out, and its record replaces this one too.
_NOT_TRAINED = "not_trained"

#: Where ``serve`` records its batch policy (:data:`flows.batching.POLICY_KEY`); its ``deadline_s`` dates new requests.
BATCH_POLICY_KEY = "service/batch_policy.json"

#: Lists of a run's audit that grow with its batch: stored once in the batch record, counted in each request's.
BATCH_LISTS = ("requests", "merged_with", "deleted_ids", "held_by", "not_held_below_floor")


def policy_deadline_s(store: ObjectStore) -> float:
    """Seconds from receipt a request accepted now must be exact by: the store's batch policy's ``deadline_s``.

    That is ``serve --deadline`` (default 30 days; 30 days too while no ``serve`` set a policy).
    """
    try:
        return BatchPolicy(**store.get_json(BATCH_POLICY_KEY)).deadline_s
    except ObjectNotFound:
        return DEFAULT_DEADLINE_S


def batch_key(batch_id: str) -> str:
    """Where a batch's record lives: ``ledger/batches/<batch id>.json``."""
    return f"ledger/batches/{check_name(batch_id, what='batch id')}.json"


@dataclass(frozen=True)
class RequestStatus:
    """One request with its latest status (``version`` 0: no status written yet = pending)."""

    request: dict[str, Any]
    status: str
    details: dict[str, Any]
    version: int
    updated_at: float

    @property
    def request_id(self) -> str:
        return str(self.request["request_id"])

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.request,
            "status": self.status,
            "status_version": self.version,
            "details": self.details,
            "updated_at": self.updated_at,
        }


def erased_ids(entry: RequestStatus, dataset: str) -> list[int]:
    """The dataset ids request ``entry`` erases from ``dataset``: its ids when it names it and stands, else none.

    The one rule of which rows nothing may use again but the deletion itself (SPEC 5: once X is deleted, no
    stored checkpoint trained on X remains): no training learns them
    (:meth:`actors.chains.ChainWorker._training_exclusions`), no audit queries them
    (:class:`storage.serving.DatasetErasures`). A ``failed`` request stands: its unlearning failed, not its
    erasure, so a training started before its retry must not learn the ids the retry then deletes.
    Which checkpoints are a breach is narrower (``done`` requests only: :func:`storage.erasure.settled_deletions`).

    Args:
        entry: one request of the ledger, as :meth:`DeletionLedger.get` reads it.
        dataset: the dataset whose rows are asked about (requests name it, ``forget --data``).

    Returns:
        the request's ids when it names ``dataset`` and its status is in :data:`STANDING`, else ``[]``.
    """
    if str(entry.request.get("dataset")) != dataset or entry.status not in STANDING:
        return []
    return [int(i) for i in entry.request.get("ids", [])]


class DeletionLedger:
    """Append, claim and settle deletion requests in one :class:`ObjectStore`."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._indexed = False

    def _request_key(self, request_id: str) -> str:
        return f"ledger/requests/{check_name(request_id, what='request id')}.json"

    def _status_key(self, request_id: str) -> str:
        return f"ledger/status/{check_name(request_id, what='request id')}"

    def _trained_key(self, request_id: str, run_id: str) -> str:
        return f"{_TRAINED_PREFIX}/{check_name(request_id, what='request id')}/{check_name(run_id, what='run id')}.json"

    def _open_key(self, request_id: str) -> str:
        return f"{_OPEN_PREFIX}/{check_name(request_id, what='request id')}.json"

    def _mark_open(self, request_id: str) -> None:
        # who wrote it: a request half-filed by a process of this host that is gone is no filing in flight
        # (storage.check.filings_in_flight), and `store check --repair` need not wait for its marker to age
        mark = {"at": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
        self.store.put_json(self._open_key(request_id), mark)

    def _unmark_open(self, request_id: str) -> None:
        """Drop a terminal request's marker; put it back if the request was reopened meanwhile (``--retry``).

        Only the status is read (not the request's record), so a request whose record is damaged can be settled too.
        """
        self.store.delete(self._open_key(request_id))
        if self.current_status(request_id) not in TERMINAL:
            self._mark_open(request_id)

    def _swap_status(self, request_id: str, status: str, details: Mapping[str, Any], *, expected_version: int) -> None:
        """The one place a status is written (CAS), keeping the open markers true (module docstring)."""
        if status not in TERMINAL:
            self._mark_open(request_id)
        self.store.swap_pointer(
            self._status_key(request_id),
            {"status": status, "details": dict(details)},
            expected_version=expected_version,
        )
        if status in TERMINAL:
            self._unmark_open(request_id)

    def _update_status(
        self,
        request_id: str,
        compute: Callable[[RequestStatus], tuple[str, Mapping[str, Any]] | None],
        *,
        read: Callable[[str], RequestStatus] | None = None,
    ) -> tuple[RequestStatus, tuple[str, Mapping[str, Any]] | None]:
        """Write ``compute(current)`` as the request's next status by compare-and-swap, retried from a fresh read.

        Two writers never both move one status: each reads it, decides, and swaps from the version it
        read; the loser reads again and decides again.

        Args:
            compute: the ``(status, details)`` to write over the status read, or ``None`` to write nothing.
            read: how the status is read (default :meth:`get`; :meth:`_status_alone` skips the request's record).

        Returns:
            the status read last and the ``(status, details)`` written over it, or ``None`` when ``compute``
            wrote nothing.

        Raises:
            PointerConflict: the status moved under every one of the attempts (the message says to retry).
        """
        for _ in swap_attempts(_CAS_ATTEMPTS):
            current = (read or self.get)(request_id)
            target = compute(current)
            if target is None:
                return current, None
            try:
                self._swap_status(request_id, target[0], target[1], expected_version=current.version)
            except PointerConflict:
                continue
            return current, target
        raise PointerConflict(f"request {request_id}: status kept moving under {_CAS_ATTEMPTS} attempts; retry later.")

    def _status_alone(self, request_id: str) -> RequestStatus:
        """The request's current status from its pointer alone: its record (maybe damaged) is not read.

        The :class:`RequestStatus` carries only the request id as its ``request``.

        Raises:
            CorruptObject: its current status version is damaged (the message says how to mend it).
        """
        key = self._status_key(request_id)
        try:
            pointer = self.store.read_pointer(key)
        except CorruptObject as err:
            versions = self.store.pointer_versions(key)
            raise CorruptObject(f"{damaged_current_status(request_id, versions[-1], err)}.") from err
        if pointer is None:
            return RequestStatus({"request_id": request_id}, PENDING, {}, 0, 0.0)
        details = dict(pointer.target.get("details") or {})
        return RequestStatus(
            {"request_id": request_id}, str(pointer.target["status"]), details, pointer.version, pointer.created_at
        )

    def _ensure_open_index(self) -> None:
        """Index a ledger written before the open markers existed (once per store)."""
        if self._indexed or self.store.exists(_OPEN_INDEX_KEY):
            self._indexed = True
            return
        unreadable: dict[str, str] = {}
        for entry in self.entries(unreadable=unreadable):
            if entry.status not in TERMINAL:
                self._mark_open(entry.request_id)
        for request_id in unreadable:  # a request that cannot be read counts as open: a pass says what it is
            self._mark_open(request_id)
        # created once: two first uses indexing at once could interleave their writes into a damaged object
        with contextlib.suppress(ObjectExists):
            self.store.put_json_once(_OPEN_INDEX_KEY, {"built_at": time.time()})
        self._indexed = True

    def append(
        self,
        *,
        request_id: str,
        ids: Sequence[int],
        dataset: str,
        reason: str | None,
        deadline_s: float | None = None,
    ) -> tuple[RequestStatus, bool]:
        """Record a request durably; returns ``(its status, whether it is new)``.

        The record carries the request's ``deadline``: receipt + ``deadline_s`` (default: the
        store's batch policy's, :func:`policy_deadline_s`), fixed now, so restarting ``serve`` with
        another ``--deadline`` moves no deadline already given. Repeating a request id with the
        same ids is a no-op (the existing entry, with its deadline, comes back); reusing it for
        other ids is refused.

        Raises:
            RequestError: the request id already names a different request, or ``deadline_s`` is
                not a finite number of seconds > 0.
        """
        if deadline_s is not None and (
            isinstance(deadline_s, bool)
            or not isinstance(deadline_s, (int, float))
            or not math.isfinite(deadline_s)
            or deadline_s <= 0
        ):
            raise RequestError(
                f"rule: a request's deadline is a finite number of seconds > 0 after receipt; got {deadline_s!r}. "
                "Give one such as 86400 (1 day), or none for the batch policy's (serve --deadline). Nothing written."
            )
        key = self._request_key(request_id)
        body = {"request_id": request_id, "ids": [int(i) for i in ids], "dataset": dataset, "reason": reason or ""}
        if self.store.exists(key):
            return self._repeated(request_id, body)
        allowed_s = policy_deadline_s(self.store) if deadline_s is None else float(deadline_s)
        self._mark_open(request_id)
        requested_at = time.time()
        try:
            # created only if absent: of two filings of one request id racing past the check above, one
            # files it and the other is answered as a repeat, never both acknowledged with one lost
            self.store.put_json_once(key, {**body, "requested_at": requested_at, "deadline": requested_at + allowed_s})
        except ObjectExists:
            return self._repeated(request_id, body)
        self.transition(request_id, status=PENDING, details={}, allowed_from=(PENDING,))
        current = self.get(request_id)
        if current.status == FAILED and current.details.get(DAMAGED_RECORD):
            # filed again after a pass failed it for its damaged record (the mend): due at the next pass
            details = {"attempts": 0, "refiled_at": time.time(), "errors": current.details.get("errors") or []}
            self.transition(request_id, status=PENDING, details=details, allowed_from=(FAILED,))
        return self.get(request_id), True

    def _repeated(self, request_id: str, body: Mapping[str, Any]) -> tuple[RequestStatus, bool]:
        """A request id filed again: the stored request if ``body`` names the same ids, else the refusal.

        Raises:
            RequestError: the request id holds other ids or another dataset.
            CorruptObject: its stored record is damaged (the message says how to mend it).
        """
        try:
            stored = self.store.get_json(self._request_key(request_id))
        except CorruptObject as err:
            raise CorruptObject(f"{damaged_request_record(request_id, err)}.") from err
        if not isinstance(stored, dict) or not isinstance(stored.get("ids"), list) or "dataset" not in stored:
            said = f"it holds no ids and dataset: {json.dumps(stored)[:120]}"
            raise CorruptObject(f"{damaged_request_record(request_id, said)}.")
        if stored["ids"] != body["ids"] or stored["dataset"] != body["dataset"]:
            raise RequestError(
                f"rule: a request id names one request; {request_id!r} already holds {len(stored['ids'])} ids of "
                f"{stored['dataset']!r}. Use a new request id (or omit it to get one). Nothing changed."
            )
        return self.get(request_id), False

    def get(self, request_id: str) -> RequestStatus:
        """The request and its latest status.

        Raises:
            ObjectNotFound: no such request in the ledger.
            CorruptObject: its record or its current status is damaged (the message says how to mend it).
        """
        key = self._request_key(request_id)
        try:
            request = self.store.get_json(key)
        except CorruptObject as err:
            raise CorruptObject(f"{damaged_request_record(request_id, err)}.") from err
        try:
            pointer = self.store.read_pointer(self._status_key(request_id))
        except CorruptObject as err:
            versions = self.store.pointer_versions(self._status_key(request_id))
            raise CorruptObject(f"{damaged_current_status(request_id, versions[-1], err)}.") from err
        if pointer is None:
            return RequestStatus(request, PENDING, {}, 0, float(request["requested_at"]))
        return RequestStatus(
            request,
            pointer.target["status"],
            dict(pointer.target.get("details", {})),
            pointer.version,
            pointer.created_at,
        )

    def current_status(self, request_id: str) -> str:
        """The request's status from its status pointer alone (its record is not read; none yet: ``pending``).

        Raises:
            CorruptObject: its current status version is damaged.
        """
        pointer = self.store.read_pointer(self._status_key(request_id))
        return PENDING if pointer is None else str(pointer.target["status"])

    def exists(self, request_id: str) -> bool:
        return self.store.exists(self._request_key(request_id))

    def refused(self, request_id: str) -> bool:
        """Whether the request was rejected or cancelled before it was applied (it holds no rollback back)."""
        return self.exists(request_id) and self.get(request_id).status in (REJECTED, CANCELLED)

    def history(self, request_id: str) -> list[dict[str, Any]]:
        """Every status the request went through, oldest first.

        A damaged version is listed with status ``unreadable`` and, in its details, the error and how
        to mend it: the rest of the history stays readable.
        """
        key = self._status_key(request_id)
        versions = self.store.pointer_versions(key)
        out: list[dict[str, Any]] = []
        for version in range(1, (versions[-1] if versions else 0) + 1):
            try:
                raw = self.store.read_pointer_version(key, version)
            except CorruptObject as err:
                error = f"{str(err).rstrip('.')}; restore {key}/v{version:09d}.json from a backup"
                out.append({"version": version, "status": "unreadable", "at": None, "details": {"error": error}})
                continue
            out.append(
                {
                    "version": version,
                    "status": raw.target["status"],
                    "at": raw.created_at,
                    "details": raw.target.get("details", {}),
                }
            )
        return out

    def request_ids(self) -> list[str]:
        return [key.rsplit("/", 1)[-1][: -len(".json")] for key in self.store.list("ledger/requests")]

    def open_request_ids(self) -> list[str]:
        """Requests not in a terminal state, from their markers (a superset: stale markers are filtered on read)."""
        self._ensure_open_index()
        return [key.rsplit("/", 1)[-1][: -len(".json")] for key in self.store.list(_OPEN_PREFIX)]

    def entries(self, *, open_only: bool = False, unreadable: dict[str, str] | None = None) -> list[RequestStatus]:
        """Every request with its status, oldest request first; ``open_only``: pending and claimed ones only.

        ``open_only`` reads only the open markers, so its cost follows the open requests, not the
        ledger's whole history. A request whose record or current status is damaged is left out,
        never the end of the listing: it goes into ``unreadable`` (request id -> what is damaged and
        how to mend it) for the caller to report (a pass records it ``failed``:
        :meth:`fail_unreadable`), or is logged as a warning when no ``unreadable`` is given.
        """
        found = []
        for request_id in self.open_request_ids() if open_only else self.request_ids():
            try:
                entry = self.get(request_id)
            except ObjectNotFound:  # a marker whose request is being appended (or never was): not yet a request
                continue
            except CorruptObject as err:  # one damaged request hides only itself
                if unreadable is None:
                    _log.warning("deletion request %s left out: %s", request_id, err)
                else:
                    unreadable[request_id] = str(err)
                continue
            if open_only and entry.status in TERMINAL:  # a marker a crash left behind
                self._unmark_open(request_id)
                continue
            found.append(entry)
        return sorted(found, key=lambda entry: (entry.request.get("requested_at", 0.0), entry.request_id))

    def open_entries(self, *, stale_after_s: float) -> list[RequestStatus]:
        """Requests not settled: pending ones, and claims older than ``stale_after_s`` (a crashed worker)."""
        now = time.time()
        return [
            entry
            for entry in self.entries(open_only=True)
            if entry.status == PENDING or (entry.status == CLAIMED and now - entry.updated_at > stale_after_s)
        ]

    def transition(
        self,
        request_id: str,
        *,
        status: str,
        details: Mapping[str, Any],
        allowed_from: Sequence[str],
        stale_claim_after_s: float | None = None,
    ) -> RequestStatus | None:
        """Move a request to ``status`` if its current status is in ``allowed_from`` (CAS, retried).

        A ``claimed`` status also counts as movable once it is older than ``stale_claim_after_s``.

        Returns:
            the new status, or ``None`` when the request was in another status (someone else
            claimed or settled it): the caller must then leave it alone.
        """

        def moved(current: RequestStatus) -> tuple[str, Mapping[str, Any]] | None:
            movable = current.status in allowed_from or (
                current.status == CLAIMED
                and stale_claim_after_s is not None
                and time.time() - current.updated_at > stale_claim_after_s
            )
            return (status, details) if movable else None

        _, written = self._update_status(request_id, moved)
        return self.get(request_id) if written else None

    def record_event(self, event_id: str, body: Mapping[str, Any]) -> bool:
        """Record what one delivery of a deletion event did with it (kept for the audit trail), by compare-and-swap.

        Every delivery is kept: ``deliveries`` lists them in the order they were first recorded, each
        with what its last record said and ``recorded_at`` (``body["delivery"]`` names the delivery: a
        record naming one already listed replaces that entry, as a delivery's ``processing`` becomes
        its outcome; a record naming none is listed as a delivery of its own). The first delivery and
        the latest ``MAX_EVENT_DELIVERIES - 1`` are kept; ``deliveries_dropped`` counts those between.

        The record's own fields are those of the delivery that speaks for the event. Rule: a
        ``processed`` record speaks until a later delivery takes the request up again after a
        ``forget --retry``: a ``processed`` or ``batched`` record that saw a newer status of the
        request (``body["status_version"]``, greater than the one speaking). A delivery that found the
        work done (``duplicate``), started after it (``processing``) or was batched beside the pass that
        did it replaces it no more. Any other record replaces the one before it, so a ``processed`` one
        replaces ``duplicate`` and ``processing``. Each delivery reads the record, decides, and swaps
        from the version it read; a writer that loses the swap reads again and decides again, so two
        deliveries racing can no more lose the ``processed`` record or a delivery's entry. A damaged
        record is replaced (its deliveries are lost with it).

        Returns:
            whether ``body`` now speaks for the event (``False``: it was only listed in ``deliveries``).

        Raises:
            PointerConflict: the record kept moving under every attempt (the message says to retry).
        """
        key, legacy = self._event_key(event_id), self._legacy_event_key(event_id)
        for _ in swap_attempts(_CAS_ATTEMPTS):
            version, current, plain = self._event_record(key, legacy, damaged_ok=True)
            delivery = {**_event_fields(body), "recorded_at": time.time()}
            deliveries, dropped = _listed_delivery(current, delivery)
            speaks = current is None or _speaks_over(delivery, current)
            fields = delivery if speaks else _event_fields(current or {})
            record = {**fields, "event_id": str(event_id), "deliveries": deliveries}
            if dropped:
                record["deliveries_dropped"] = dropped
            try:
                self.store.swap_pointer(key, record, expected_version=version)
            except PointerConflict:
                continue
            if plain:  # the pointer holds what the plain record held now (or replaces its damage)
                with contextlib.suppress(StorageError):
                    self.store.delete(legacy)
            return speaks
        raise PointerConflict(f"event {event_id}: its record kept moving under {_CAS_ATTEMPTS} attempts; retry later.")

    def event(self, event_id: str) -> dict[str, Any] | None:
        """The record of a deletion event (:meth:`record_event`), or ``None`` if none was written.

        Raises:
            CorruptObject: its current version (or its plain record, on a store written before) is damaged.
        """
        return self._event_record(self._event_key(event_id), self._legacy_event_key(event_id))[1]

    def events(self) -> list[dict[str, Any]]:
        """Every deletion event's record, by event key; a store's plain records of before are read too.

        Raises:
            CorruptObject: a record is damaged.
        """
        names = {key.rsplit("/", 1)[-1] for key in self.store.list_pointers(_EVENTS_PREFIX)}
        names |= {key.rsplit("/", 1)[-1].removesuffix(".json") for key in self.store.list(_EVENTS_PREFIX)}
        found = []
        for name in sorted(names):
            key = f"{_EVENTS_PREFIX}/{name}"
            _, record, _ = self._event_record(key, f"{key}.json")
            if record is not None:  # moved to its pointer (and its plain record removed) since the listing
                found.append(record)
        return found

    def _event_key(self, event_id: str) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(event_id))[:80] or "unknown"
        return f"{_EVENTS_PREFIX}/{safe}"

    def _legacy_event_key(self, event_id: str) -> str:
        return f"{self._event_key(event_id)}.json"

    def _event_record(
        self, key: str, legacy: str, *, damaged_ok: bool = False
    ) -> tuple[int, dict[str, Any] | None, bool]:
        """An event's record, the pointer version it was read from, and whether it is a plain record of before.

        Version 0: no record yet, or the plain record of a store written before the pointer.
        ``damaged_ok``: a damaged record reads as none, at the version it damaged, for a new record to replace it
        (as one replaced it before the pointer).

        Raises:
            CorruptObject: the record is damaged (unless ``damaged_ok``).
        """
        try:
            pointer = self.store.read_pointer(key)
        except CorruptObject:
            if not damaged_ok:
                raise
            return self.store.pointer_versions(key)[-1], None, False
        if pointer is not None:
            return pointer.version, dict(pointer.target), False
        try:
            return 0, dict(self.store.get_json(legacy)), True
        except ObjectNotFound:
            pointer = self.store.read_pointer(key)  # moved to the pointer between the two reads
            return (pointer.version, dict(pointer.target), False) if pointer is not None else (0, None, False)
        except CorruptObject:
            if not damaged_ok:
                raise
            return 0, None, True

    # ----- batches: what one retrain applied for many requests, stored once ----------------------

    def record_batch(self, batch_id: str, body: Mapping[str, Any]) -> str:
        """Store a batch's full record once (every run's audit with its request and id lists); returns its key.

        Each request of the batch keeps only its own part and ``batch_id`` (:func:`flows.settle.run_pass`):
        copying the batch's lists into each request made the ledger grow with the square of the batch.
        """
        key = batch_key(batch_id)
        self.store.put_json(key, {**body, "batch_id": batch_id, "recorded_at": time.time()})
        return key

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The record of batch ``batch_id`` (``ledger/batches/<batch id>.json``).

        Raises:
            ObjectNotFound: no such batch.
        """
        return dict(self.store.get_json(batch_key(batch_id)))

    # ----- attempts, leases, terminal states (the pass in flows.settle uses these) -------------

    def claim_lapsed(self, entry: RequestStatus, *, lease_s: float, now: float) -> bool:
        """Whether ``entry`` is a claim whose lease lapsed (its holder died): a pass may take it over."""
        return entry.status == CLAIMED and lease.lapsed(
            self.store,
            entry.request_id,
            claim_version=entry.version,
            claimed_at=entry.updated_at,
            lease_s=lease_s,
            now=now,
        )

    def due_entries(
        self, *, lease_s: float, now: float | None = None, unreadable: dict[str, str] | None = None
    ) -> list[RequestStatus]:
        """Requests a pass should take now: pending ones past their back-off, claims whose lease lapsed.

        An open request that cannot be read is left out and named in ``unreadable`` (:meth:`entries`).
        """
        now = time.time() if now is None else now
        due = []
        for entry in self.entries(open_only=True, unreadable=unreadable):
            if (
                entry.status == PENDING
                and float(entry.details.get("next_attempt_at", 0.0)) <= now
                or self.claim_lapsed(entry, lease_s=lease_s, now=now)
            ):
                due.append(entry)
        return due

    def fail_unreadable(
        self, request_id: str, error: str, *, lease_s: float, now: float | None = None
    ) -> dict[str, Any] | None:
        """Record ``failed`` on an open request whose record cannot be read (``error``: what :meth:`get` said).

        No pass can apply a request whose ids cannot be read, and none may guess them: it is failed
        (``details.damaged_record``, the error and how to mend it in ``reason``), nothing applied,
        and its status history kept. Filed again under its id (:meth:`append`, the mend) it is
        ``pending`` at once; a record restored from a backup is taken up by ``forget --retry``.
        Only the status pointer is read and written.

        Returns:
            the ``failed`` details written, or ``None`` when the request is settled already (a
            stale open marker, then removed) or claimed by a holder whose lease is live.

        Raises:
            CorruptObject: its current status cannot be read either (nothing written).
        """
        now = time.time() if now is None else now

        def failed(current: RequestStatus) -> tuple[str, Mapping[str, Any]] | None:
            status, details = current.status, current.details
            if status in TERMINAL:
                return None
            if status == CLAIMED and not self.claim_lapsed(current, lease_s=lease_s, now=now):
                return None
            attempts = int(details.get("attempt", 0) if status == CLAIMED else details.get("attempts", 0))
            text = str(error).rstrip(".")
            return FAILED, {
                "attempts": attempts,
                "errors": [*(details.get("errors") or []), {"attempt": attempts, "error": text[:2000], "at": now}][
                    -10:
                ],
                "last_error": text[:2000],
                DAMAGED_RECORD: True,
                "reason": f"{text}. Its ids cannot be read, so no pass can apply it: failed, nothing applied, its status "
                "history kept. Filed again as said above, it is pending for the next pass; its record restored from a "
                f"backup, `obliviate forget --retry {request_id}` takes it up.",
            }

        try:
            current, written = self._update_status(request_id, failed, read=self._status_alone)
        except PointerConflict:  # it kept moving: someone else is settling it
            return None
        if written is None:
            if current.status in TERMINAL:  # a stale marker
                self._unmark_open(request_id)
            return None
        if current.status == CLAIMED:
            lease.drop(self.store, request_id)
        return dict(written[1])

    def report_unreadable(self, request_id: str, reason: str, *, now: float | None = None) -> bool:
        """Note that a pass reported this open request as unreadable for ``reason``; whether that is news.

        A request whose current status is damaged cannot be recorded ``failed``
        (:meth:`fail_unreadable`), so it stays open and every pass met it again: each one logged it
        as an error, every cron tick, until it was mended. The note is kept in the request's open
        marker (``ledger/open/<id>.json``, ``unreadable_reported``: the reason and when it was first
        said), which exists exactly while the request is open and is written afresh by every status
        written for it. Only the pass that first meets the damage, or meets another damage of the
        same request, is told to say it; ``store check`` and ``forget --status`` still show it with
        its mend. A note that cannot be read or written counts as none (said again: never silenced
        by a fault).

        Returns:
            ``True`` when ``reason`` was not noted yet for this request (the caller says it).
        """
        key = self._open_key(request_id)
        try:
            marker = self.store.get_json(key)
        except ObjectNotFound:  # not open (settled meanwhile): nothing to note it on
            return True
        except (CorruptObject, StorageError):
            marker = {"at": time.time()}
        noted = marker.get("unreadable_reported")
        if isinstance(noted, Mapping) and noted.get("reason") == reason:
            return False
        now = time.time() if now is None else now
        with contextlib.suppress(StorageError):  # a read-only store: said again next time
            self.store.put_json(key, {**marker, "unreadable_reported": {"reason": reason, "at": now}})
        return True

    def claim(
        self, request_id: str, *, holder: str, lease_s: float, max_attempts: int, now: float | None = None
    ) -> RequestStatus | None:
        """Claim a due request for one attempt (CAS); ``None`` if it is not due or someone else won.

        A lapsed claim is taken over and its lapse counted as a failed attempt; a request out of
        attempts becomes ``failed`` instead (returned, so the caller sees it was settled).
        """
        now = time.time() if now is None else now

        def claimed(current: RequestStatus) -> tuple[str, Mapping[str, Any]] | None:
            details = current.details
            errors = list(details.get("errors") or [])
            if current.status == PENDING:
                if float(details.get("next_attempt_at", 0.0)) > now:
                    return None
                attempt = int(details.get("attempts", 0)) + 1
            elif self.claim_lapsed(current, lease_s=lease_s, now=now):
                attempt = int(details.get("attempt", 1)) + 1
                errors.append(
                    {
                        "attempt": attempt - 1,
                        "error": f"holder {details.get('holder')!r} stopped renewing its {lease_s:.0f} s lease "
                        "(crashed or killed); its stored progress is resumed",
                        "at": now,
                    }
                )
            else:
                return None
            if attempt > max_attempts:
                return (
                    FAILED,
                    {
                        "attempts": attempt - 1,
                        "errors": errors[-10:],
                        "reason": f"gave up after {attempt - 1} attempt(s) (max {max_attempts}); last error: "
                        f"{str(errors[-1]['error']).rstrip('.') if errors else 'unknown'}. Fix the cause, then "
                        f"`obliviate forget --retry {request_id}`.",
                    },
                )
            return CLAIMED, {"holder": holder, "claimed_at": now, "attempt": attempt, "errors": errors[-10:]}

        try:
            _, written = self._update_status(request_id, claimed)
        except PointerConflict:  # it kept moving: others are claiming it
            return None
        return self.get(request_id) if written else None

    def request_claim(self, claimed: RequestStatus, *, lease_s: float) -> lease.PointerClaim:
        """A claim this caller took (:meth:`claim`) as a pointer claim: its status pointer and its leases' folder.

        Held with :meth:`storage.lease.LeaseKeeper.hold_claim`, its renewals check that its ``claimed`` status is
        still the newest (another pass takes it over once its lease lapsed), as those of every other claim do.
        """
        request_id = claimed.request_id
        return lease.PointerClaim(
            key=self._status_key(request_id),
            version=claimed.version,
            holder={
                "holder": claimed.details.get("holder"),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "lease_s": float(lease_s),
            },
            leases=f"ledger/leases/{request_id}",
        )

    def settle(
        self, request_id: str, *, claim_version: int, status: str, details: Mapping[str, Any]
    ) -> RequestStatus | None:
        """Move a claim this caller holds to ``status``; ``None`` if the claim was taken over meanwhile.

        A request becoming ``done`` also gets the runs that applied it by training without its ids
        (:meth:`record_training`) in ``details.runs``; a pass may not have known those runs yet.
        """
        current = self.get(request_id)
        if current.status != CLAIMED or current.version != claim_version:
            return None
        try:
            self._swap_status(request_id, status, details, expected_version=claim_version)
        except PointerConflict:
            return None
        if status != CLAIMED:
            lease.drop(self.store, request_id)
        if status == DONE:
            # Best effort: the request is settled either way, and its training records stay readable
            # (trained_runs, forget --status) until the next training or settle merges them.
            with contextlib.suppress(StorageError, PointerConflict):
                trained = self.trained_runs(request_id)
                if trained:
                    self.record_runs(request_id, trained)
        return self.get(request_id)

    def trained_runs(self, request_id: str) -> dict[str, dict[str, Any]]:
        """Run id -> record of each run that applied the request by training without its ids."""
        found: dict[str, dict[str, Any]] = {}
        for key in self.store.list(f"{_TRAINED_PREFIX}/{check_name(request_id, what='request id')}"):
            with contextlib.suppress(ObjectNotFound, CorruptObject):  # one unreadable record hides only itself
                body = self.store.get_json(key)
                found[str(body["run_id"])] = body
        return found

    def record_training(self, request_id: str, run_id: str, entry: Mapping[str, Any]) -> RequestStatus | None:
        """Record that run ``run_id`` applied the request by training without its ids (``entry``: how, which version).

        The record (``ledger/trained/<request>/<run>.json``) is written before the status is read;
        :meth:`settle` reads the records after it writes ``done``: whichever comes second puts the run
        in ``details.runs`` (:meth:`record_runs`), so no run is missed however the two interleave.

        Returns:
            the request's status after, or ``None`` when it is not ``done`` yet (its pass records it).
        """
        self.store.put_json(self._trained_key(request_id, run_id), {**entry, "run_id": run_id})
        return self.record_runs(request_id, {run_id: entry})

    def record_runs(self, request_id: str, runs: Mapping[str, Mapping[str, Any]]) -> RequestStatus | None:
        """Add per-run audit entries to a ``done`` request's ``details.runs`` (CAS, retried; status stays ``done``).

        A run already listed keeps its entry, except a pass's ``already_applied`` or ``not_trained``,
        which a record of how the run applied the request replaces. Nothing is written when nothing is new.

        Returns:
            the request's status after, or ``None`` when it is not ``done`` (nothing written).
        """

        def merged(current: RequestStatus) -> tuple[str, Mapping[str, Any]] | None:
            if current.status != DONE:
                return None
            listed = dict(current.details.get("runs") or {})
            fresh = {
                run_id: dict(entry)
                for run_id, entry in runs.items()
                if run_id not in listed or listed[run_id].get("status") in (_ALREADY_APPLIED, _NOT_TRAINED)
            }
            return (DONE, {**current.details, "runs": {**listed, **fresh}}) if fresh else None

        current, written = self._update_status(request_id, merged)
        if written:
            return self.get(request_id)
        return current if current.status == DONE else None

    def record_interrupted_training(
        self, request_id: str, run_id: str, chain: str, purged: Mapping[str, Any]
    ) -> RequestStatus | None:
        """Say on a ``done`` request that a later sweep deleted what run ``run_id``'s chain ``chain`` held of its ids.

        The pass that settled it left the run to a live training (``details.interrupted_trainings``,
        ``left_to_training``), and that training died before it published (SPEC 5;
        :func:`storage.erasure.sweep_dead_trainings`): ``purged[run][chain]`` says it as the pass
        does, and the run leaves ``left_to_training`` (CAS, retried; the status stays ``done``).
        Nothing is written when the request is not ``done`` or already says it.

        Returns:
            the request's status after, or ``None`` when nothing was written.

        Raises:
            ObjectNotFound: no such request in the ledger.
            CorruptObject: its record or current status is damaged (the message says how to mend it).
        """

        def noted(current: RequestStatus) -> tuple[str, Mapping[str, Any]] | None:
            said = dict(current.details.get("interrupted_trainings") or {})
            purged_runs = {run: dict(chains) for run, chains in (said.get("purged") or {}).items()}
            if current.status != DONE or chain in purged_runs.get(run_id, {}):
                return None
            purged_runs.setdefault(run_id, {})[chain] = dict(purged)
            left = {run: holder for run, holder in (said.get("left_to_training") or {}).items() if run != run_id}
            said = {**said, "purged": purged_runs, "left_to_training": left}
            said = {key: value for key, value in said.items() if value}
            return DONE, {**current.details, "interrupted_trainings": said}

        _, written = self._update_status(request_id, noted)
        return self.get(request_id) if written else None

    def record_purge(
        self, request_id: str, run_id: str, purged: Mapping[str, Any], *, purged_at: float
    ) -> RequestStatus | None:
        """A later purge finished what a ``done`` request's run entry said was ``kept`` or ``pending`` (SPEC 5).

        Sets the run's ``superseded_versions`` (``purged``) and ``purged_at``, and the request's
        ``purged_at`` once every run that records one has it (CAS, retried). Nothing is written when
        the request is not ``done`` or its run entry says nothing is left to purge. Only the status is
        read and written (the run entries live there): a request whose record is damaged is told too,
        so its damage (which ``store check`` reports with its mend) holds no purge back.

        Returns:
            the request's status after (its ``request`` holds only the request id), or ``None`` when
            nothing was written.

        Raises:
            ObjectNotFound: no such request in the ledger (neither a record nor a status).
            CorruptObject: its current status is damaged (the message says how to mend it).
        """

        def finished(current: RequestStatus) -> tuple[str, Mapping[str, Any]] | None:
            runs = dict(current.details.get("runs") or {})
            entry = runs.get(run_id)
            if current.status != DONE or not isinstance(entry, Mapping):
                return None
            if (entry.get("superseded_versions") or {}).get("status") not in ("kept", "pending"):
                return None
            runs[run_id] = {**entry, "superseded_versions": dict(purged), "purged_at": purged_at}
            return DONE, {**current.details, "runs": runs, "purged_at": request_purged_at(runs)}

        def status_alone(request_id: str) -> RequestStatus:
            current = self._status_alone(request_id)
            if current.version == 0 and not self.exists(request_id):
                raise ObjectNotFound(f"no deletion request {request_id} in the ledger of {self.store.uri()}.")
            return current

        _, written = self._update_status(request_id, finished, read=status_alone)
        return self._status_alone(request_id) if written else None

    def fail_attempt(
        self,
        request_id: str,
        *,
        claim_version: int,
        error: str,
        max_attempts: int,
        first_backoff_s: float,
        max_backoff_s: float,
        extra: Mapping[str, Any] | None = None,
    ) -> RequestStatus | None:
        """Record a failed attempt on a held claim: back to ``pending`` after a back-off, or ``failed``."""
        current = self.get(request_id)
        if current.status != CLAIMED or current.version != claim_version:
            return None
        attempt = int(current.details.get("attempt", 1))
        now = time.time()
        errors = [*(current.details.get("errors") or []), {"attempt": attempt, "error": error[:2000], "at": now}][-10:]
        if attempt >= max_attempts:
            status = FAILED
            details: dict[str, Any] = {
                "attempts": attempt,
                "errors": errors,
                "last_error": error[:2000],
                "reason": f"gave up after {attempt} attempt(s) (max {max_attempts}); last error: "
                f"{error[:500].rstrip('.')}. "
                f"Fix the cause, then `obliviate forget --retry {request_id}`.",
            }
        else:
            status = PENDING
            delay = retry_delay_s(attempt, first_s=first_backoff_s, max_s=max_backoff_s)
            details = {
                "attempts": attempt,
                "errors": errors,
                "last_error": error[:2000],
                "next_attempt_at": now + delay,
            }
        return self.settle(request_id, claim_version=claim_version, status=status, details={**(extra or {}), **details})

    def hand_back(self, request_id: str, *, claim_version: int, reason: str) -> RequestStatus | None:
        """Return a held claim to ``pending``, due at once, without counting its attempt.

        For work its holder abandons on purpose (``serve`` stopping): the attempt did not fail, so
        it must not bring the request closer to ``failed``. ``None`` if the claim was taken over.
        """
        current = self.get(request_id)
        if current.status != CLAIMED or current.version != claim_version:
            return None
        attempt = int(current.details.get("attempt", 1))
        details = {
            "attempts": attempt - 1,
            "errors": list(current.details.get("errors") or [])[-10:],
            "next_attempt_at": 0.0,
            "handed_back": {"attempt": attempt, "reason": reason, "at": time.time()},
        }
        return self.settle(request_id, claim_version=claim_version, status=PENDING, details=details)

    def cancel(self, request_id: str, *, applied_to: Sequence[str]) -> RequestStatus:
        """Withdraw a request that no run has applied yet (``pending`` or ``failed``).

        Args:
            applied_to: runs whose current version already lists the request (from the registry).

        Raises:
            RequestError: it is being worked on, already settled, or (partly) applied.
        """
        current = self.get(request_id)
        if applied_to:
            now = " (a pass is applying it now)" if current.status == CLAIMED else ""
            raise RequestError(
                f"rule: only a request no model has applied can be cancelled; {request_id} is applied to runs "
                f"{sorted(applied_to)}{now}. Nothing changed: a deletion a model applied is not undone by cancelling"
                f" (`obliviate forget --status {request_id}` shows where it stands)."
            )
        if current.status not in (PENDING, FAILED):
            raise RequestError(
                f"rule: a request can be cancelled while pending or failed; {request_id} is {current.status!r}"
                + (" (a pass is applying it now; wait for it)" if current.status == CLAIMED else "")
                + ". Nothing changed."
            )
        moved = self.transition(
            request_id,
            status=CANCELLED,
            details={
                "cancelled_at": time.time(),
                "previous": current.status,
                "errors": current.details.get("errors") or [],
            },
            allowed_from=(current.status,),
        )
        if moved is None:
            raise RequestError(f"request {request_id} changed status while cancelling; look again with --status.")
        return moved

    def retry(self, request_id: str) -> RequestStatus:
        """Put a ``failed`` request back to ``pending`` with a fresh attempt budget.

        Raises:
            RequestError: the request is not ``failed``.
        """
        current = self.get(request_id)
        if current.status != FAILED:
            raise RequestError(
                f"rule: only a failed request can be retried; {request_id} is {current.status!r}. Nothing changed."
            )
        moved = self.transition(
            request_id,
            status=PENDING,
            details={"attempts": 0, "retried_at": time.time(), "errors": current.details.get("errors") or []},
            allowed_from=(FAILED,),
        )
        if moved is None:
            raise RequestError(f"request {request_id} changed status while retrying; look again with --status.")
        return moved


def _event_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """What one delivery said of an event: ``record`` without the fields the event's record keeps of them all."""
    return {k: v for k, v in record.items() if k not in ("event_id", "deliveries", "deliveries_dropped")}


def _listed_delivery(current: Mapping[str, Any] | None, delivery: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """The event's deliveries with ``delivery`` in its place (its entry replaced, or appended), and how many are dropped.

    A record written before deliveries were listed is the one delivery it tells of.
    """
    if current is None:
        listed: list[dict[str, Any]] = []
    elif "deliveries" in current:
        listed = [dict(entry) for entry in current["deliveries"]]
    else:
        listed = [_event_fields(current)]
    dropped = int((current or {}).get("deliveries_dropped", 0))
    name = delivery.get("delivery")
    at = next((i for i, entry in enumerate(listed) if name is not None and entry.get("delivery") == name), None)
    if at is None:
        listed.append(delivery)
    else:
        listed[at] = delivery
    if len(listed) > MAX_EVENT_DELIVERIES:  # the first tells how the event began; the latest, where it stands
        over = len(listed) - MAX_EVENT_DELIVERIES
        listed = listed[:1] + listed[1 + over :]
        dropped += over
    return listed, dropped


def _speaks_over(delivery: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether ``delivery``'s record replaces the fields of the event's record ``current`` (:meth:`DeletionLedger.record_event`)."""
    if current.get("outcome") != "processed":
        return True
    if delivery.get("outcome") not in ("processed", "batched"):
        return False
    # Only a pass that took the request up after the one speaking saw a newer status of it (a retried request).
    return int(delivery.get("status_version", -1)) > int(current.get("status_version", -1))


def request_record_mend(request_id: str) -> str:
    """How to mend a damaged or lost request record (``ledger/requests/<request>.json``), in words."""
    key = f"ledger/requests/{request_id}.json"
    return (
        f"restore {key} and {key}.sha256 from a backup; or remove both and file the request again with the ids it "
        f"was filed with, `obliviate forget --ids IDS --data DATASET --request-id {request_id} --no-event`, which "
        "rewrites the record and keeps the status history"
    )


def current_status_mend(request_id: str, version: int) -> str:
    """How to mend a request's damaged current status version, in words."""
    key = f"ledger/status/{request_id}/v{version:09d}.json"
    back = f"makes version {version - 1} current again" if version > 1 else "leaves no status (pending)"
    return (
        f"restore {key} from a backup; without one, removing it {back} and the next pass takes the request up from "
        "there (a request already applied is found applied and settles done; one cancelled in the lost version would "
        "be applied after all)"
    )


def damaged_request_record(request_id: str, err: Exception | str) -> str:
    """What a damaged request record loses and how to mend it, in words (``err``: the checksum failure)."""
    said = str(err).rstrip(".").split(" (`obliviate store check`", 1)[0].removesuffix("; the object is damaged")
    return (
        f"the record of deletion request {request_id} is damaged ({said}): the ids, dataset and reason it was filed "
        f"with cannot be read; its status history (ledger/status/{request_id}) is kept. To mend: "
        f"{request_record_mend(request_id)} (`obliviate store check` lists every damaged record)"
    )


def damaged_current_status(request_id: str, version: int, err: Exception | str) -> str:
    """What a request's damaged current status version loses and how to mend it, in words."""
    return (
        f"the current status of deletion request {request_id} is damaged ({str(err).rstrip('.')}), so where the "
        f"request stands is unknown. To mend: {current_status_mend(request_id, version)}"
    )


def request_purged_at(runs: Mapping[str, Any]) -> float | None:
    """When a request's data left storage (SPEC 5), from its per-run audits (``details.runs``).

    A run's audit records ``purged_at`` when the run stored something trained on the deleted ids:
    the time its superseded versions were purged, or ``None`` while that purge is pending or the
    store keeps them. The request's is the latest of those once every run that records one has it;
    ``None`` while one has not, and ``None`` too when no run records one (nothing says its data left:
    e.g. every run had forgotten the ids for an earlier request, whose own entry says when).
    """
    times = [run["purged_at"] for run in runs.values() if isinstance(run, Mapping) and "purged_at" in run]
    if not times or any(at is None for at in times):
        return None
    return max(float(at) for at in times)


def request_part(
    audit: Mapping[str, Any],
    request_id: str,
    *,
    ids: Sequence[int] = (),
    deleted: set[int] | frozenset[int] = frozenset(),
    batch_id: str | None = None,
) -> dict[str, Any]:
    """A run's audit as one of the requests it applied keeps it: its own part, of a size independent of the batch.

    The batch's lists (its ``requests``, all its ``deleted_ids``, the ``held_by`` and
    ``not_held_below_floor`` requests) are in the batch record (``batch_id``,
    :meth:`DeletionLedger.batch`); here they are counted (``batch_requests``,
    ``merged_with_count``, ``batch_deleted_ids``, ``held_by_count``, ``not_held_below_floor_count``), and
    ``deleted_ids`` lists this request's own ids that the run's retrain removed.
    """
    out = {key: value for key, value in audit.items() if key not in BATCH_LISTS}
    requests = audit.get("requests")
    if isinstance(requests, list):
        out["batch_requests"] = len(requests)
        out["merged_with_count"] = len([r for r in requests if r != request_id])
    if isinstance(audit.get("deleted_ids"), list):
        out["batch_deleted_ids"] = len(audit["deleted_ids"])
        out["deleted_ids"] = sorted({int(i) for i in ids} & deleted)
    for key in ("held_by", "not_held_below_floor"):
        if isinstance(audit.get(key), list):
            out[f"{key}_count"] = len(audit[key])
    if batch_id is not None:
        out["batch_id"] = batch_id
    return out
