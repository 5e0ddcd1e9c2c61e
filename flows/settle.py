"""One pass over the deletion ledger with every request and every run isolated from the others.

:func:`run_pass` is what the ``unlearn`` (event) and ``reconcile`` (cron) flows run
(:func:`flows.unlearn.process_open_requests`):

1. claim each due request on its own (CAS; a request past its back-off, or a claim whose lease
   lapsed: :mod:`storage.lease`), and renew the leases of every claim held while the pass works;
2. check each claimed request on its own (ids re-validated, mapped to runs): a request breaking a
   rule is ``rejected`` with the reason; any other error while handling it is a failed attempt
   recorded on that request only;
3. fan out one unlearning per affected run on Ray actors; when a run that merged several requests
   fails, each of its requests is retried alone on that run, so one poison request cannot sink
   the good ones merged with it;
4. settle each request from its own runs' outcomes: ``done``, or a failed attempt (back to
   ``pending`` after a back-off, ``failed`` after ``max_attempts``) with the error.

:func:`run_until_quiet` repeats passes while a failed attempt's back-off ends soon, so bounded
retries happen within one flow run instead of waiting for the next cron.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from obliviate.unlearning.service import RequestError, RunSpec, parse_ids
from storage.erasure import InterruptedTrainings
from storage.errors import PointerConflict, StorageError
from storage.lease import (
    DEFAULT_LEASE_S,
    ClaimHeld,
    LeaseKeeper,
    PointerClaim,
    claim_free,
    holder_process_gone,
    lost_text,
    release_claim,
    take_claim,
)
from storage.ledger import (
    DONE,
    FAILED,
    PENDING,
    REJECTED,
    DeletionLedger,
    RequestStatus,
    request_part,
    request_purged_at,
)
from storage.objects import ObjectStore
from storage.registry import RunRegistry

#: Set when this process stops serving (``serve`` got SIGTERM or Ctrl-C): passes claim nothing new,
#: and a claim whose work the stop interrupted goes back to ``pending`` without counting an attempt.
STOPPING = threading.Event()
#: Set by a stopping ``serve`` before it ends this process's Ray connection (its Ray runtime gone): a pass's wait on
#: Ray ends then (:func:`flows.unlearn.fan_out_unlearning`), where a blocking ``ray.get`` could wait forever.
RAY_DISCONNECTING = threading.Event()

# The claims the passes of this process hold now: (store url, request id) -> (ledger, claim version, holder, how its
# keeper stops renewing it). ``serve`` hands them back itself (:func:`hand_back_open_claims`) when a pass cannot end
# on its own.
_OPEN_CLAIMS: dict[tuple[str, str], tuple[DeletionLedger, int, str, Callable[[], None]]] = {}
_OPEN_CLAIMS_LOCK = threading.Lock()
# The requests serve's stop handed back itself: (store url, request id). The pass it let go finds their claims moved,
# and says so as a hand-back, not as a claim another pass took over.
_HANDED_BACK_BY_STOP: set[tuple[str, str]] = set()


def hand_back_open_claims(reason: str) -> list[str]:
    """Hand back every claim a pass of this process still holds, attempts not counted; returns their ids.

    For ``serve`` stopping while its pass is stuck: a SIGTERM to serve's process group stops its own
    Ray runtime too, and the pass's wait on Ray then never returns, so the claims stayed ``claimed``
    until their leases lapsed. A claim the pass settles meanwhile is left as it settled it.
    """
    with _OPEN_CLAIMS_LOCK:
        open_claims = dict(_OPEN_CLAIMS)
        _OPEN_CLAIMS.clear()
    handed: list[str] = []
    for (_, request_id), (ledger, version, _holder, unkeep) in sorted(open_claims.items(), key=lambda item: item[0]):
        unkeep()  # its own hand-back moves the claim: not a claim lost to another pass
        with contextlib.suppress(Exception):  # a store that is gone too: the lease lapses, as before
            if ledger.hand_back(request_id, claim_version=version, reason=reason) is not None:
                handed.append(request_id)
                with _OPEN_CLAIMS_LOCK:
                    _HANDED_BACK_BY_STOP.add((ledger.store.url, request_id))
    return handed


#: The pointer whose compare-and-swap makes one pass at a time the one working on a store's ledger.
PASS_CLAIM_KEY = "service/pass-claim"
# The pass claims this process takes or holds (their tokens): to its other threads they are live.
_LIVE_PASSES: set[str] = set()
_LIVE_PASSES_LOCK = threading.Lock()
# The pass claim this thread holds now (store_pass): (store url, its keeper, the claim). run_pass checks it at each
# safe point, so a pass that stalled past its lease and was taken over stops there (a thread's own: serve runs passes
# of several stores, and other threads' work, side by side).
_HELD_PASS = threading.local()


def held_pass_claim(store: str) -> dict[str, Any] | None:
    """The pass claim on ``store`` this thread holds (``key``, ``version``, ``holder``), for the workers of its fan-out.

    Given to :meth:`actors.chains.ChainWorker.unlearn`, which reads the claim's pointer before each write: a pass
    that stalled past its lease and was taken over stops its runs' unlearning there, as its own safe points stop
    the pass. ``None`` outside :func:`store_pass`.
    """
    held = getattr(_HELD_PASS, "held", None)
    if held is None or held[0] != ObjectStore(store).url:
        return None
    claim = held[2]
    return {"key": claim.key, "version": claim.version, "holder": dict(claim.holder)}


def lost_pass_claim(store: ObjectStore, *, where: str) -> str | None:
    """The line to say when the pass claim this thread holds on ``store`` was taken over; ``None`` while it is its
    own, or outside :func:`store_pass`.

    The safe-point check of a pass's work before :func:`run_pass`, such as its batch gate's writes
    (:func:`flows.batching.batch_gate`); ``where`` names the point, as :func:`run_pass`'s own lines do. The caller
    says the line: it is the one line of the loss (the keeper's own is not said).
    """
    held = getattr(_HELD_PASS, "held", None)
    if held is None or held[0] != store.url or held[1].check(held[2]):
        return None
    held[1].said_lost(held[2].key)
    return lost_text(store, held[2], f"deletion pass {held[1].holder} ({where})")


@contextlib.contextmanager
def store_pass(
    store: ObjectStore, *, holder: str, lease_s: float = DEFAULT_LEASE_S, wait_s: float = 0.0
) -> Iterator[dict[str, Any] | None]:
    """Be the one pass working on ``store``'s ledger, or learn who is: yields ``None`` when this pass holds it.

    The cron ``reconcile`` (a runner subprocess) and ``serve``'s own passes (its watcher, its event
    runs) started together each claimed part of one flushed batch and each retrained every
    affected run with its part: every run was retrained twice for one batch, and their writes of
    the same records interleaved into a damaged store. Now a pass first takes ``service/pass-claim``
    by a compare-and-swap (:func:`storage.lease.take_claim`), renews its lease while it works and
    releases it at the end (the release drops the claim's older pointer versions and leases,
    :func:`storage.lease.tidy_claim`, so a pass every 5 minutes leaves a bounded folder). A pass
    that finds a live holder waits up to ``wait_s`` for it, then does nothing: the context yields
    that holder's record (``host``, ``pid``, ``holder``, ``claimed_at``, ``renewed_at``). A holder
    that died is taken over: at once when it was a process of this host that is gone (or a pass of
    this process that ended), else once its lease lapsed.
    """
    token = uuid.uuid4().hex
    me = {"host": socket.gethostname(), "pid": os.getpid(), "holder": holder, "token": token}

    def gone(other: dict[str, Any]) -> bool:
        if other.get("host") == me["host"] and other.get("pid") == me["pid"]:
            with _LIVE_PASSES_LOCK:  # a pass of this process: live while it holds (or takes) the claim
                return other.get("token") not in _LIVE_PASSES
        return holder_process_gone(other)

    with _LIVE_PASSES_LOCK:  # noted before claiming: to another thread of this process, the claim is live
        _LIVE_PASSES.add(token)
    try:
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                claim = take_claim(store, PASS_CLAIM_KEY, holder=me, lease_s=lease_s, gone=gone)
                break
            except ClaimHeld as held:
                if time.monotonic() >= deadline:
                    with _LIVE_PASSES_LOCK:
                        _LIVE_PASSES.discard(token)
                    yield {**held.holder, "renewed_at": held.renewed_at}
                    return
                time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))
        try:
            with LeaseKeeper(store, lease_s=lease_s, holder=holder) as keeper:
                keeper.hold_claim(claim, loss_said_by_holder=True)  # run_pass's stop line says it
                outer = getattr(_HELD_PASS, "held", None)
                _HELD_PASS.held = (store.url, keeper, claim)
                try:
                    yield None
                finally:
                    _HELD_PASS.held = outer
        finally:
            with contextlib.suppress(StorageError):  # not released: taken over once its lease lapses
                release_claim(store, claim)
    finally:
        with _LIVE_PASSES_LOCK:
            _LIVE_PASSES.discard(token)


#: How long a pass waits for another pass of the store to end before it leaves the work to that one.
PASS_WAIT_S = 2.0


def busy_result(
    ledger: DeletionLedger,
    other: Mapping[str, Any],
    *,
    lease_s: float,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> dict[str, Any]:
    """What a pass that found another pass holding the store returns: nothing claimed, the holder named.

    The due requests wait for the next pass (``serve``'s watcher starts one once the holder is done):
    ``batched`` says so with the rule ``pass_running``, so an event's record is finished when its
    request settles (as for a request waiting in a batch).
    """
    log = logger or logging.getLogger(__name__)
    # one that cannot be read waits too (the next pass records it failed), said by that pass, not here
    unreadable: dict[str, str] = {}
    waiting = sorted([*(e.request_id for e in ledger.due_entries(lease_s=lease_s, unreadable=unreadable)), *unreadable])
    log.info(
        "another pass holds store %s (%s, pid %s on %s, since %s); this pass does nothing and %s wait for the next",
        ledger.store.url,
        other.get("holder"),
        other.get("pid"),
        other.get("host"),
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(other.get("claimed_at") or 0.0))),
        summarise_ids(waiting),
    )
    gate = {"flush": False, "reason": "pass_running", "batched_until": None, "requests": waiting, "deadlines": {}}
    return {"claimed": [], "runs": {}, "settled": {}, "lost": [], "busy": dict(other), "batched": gate}


def held_pass(store: ObjectStore) -> dict[str, Any] | None:
    """The record of the pass holding ``store`` now (``None``: none, or its holder died: a new pass takes over)."""
    current = store.read_pointer(PASS_CLAIM_KEY)
    if current is None:
        return None
    record = dict(current.target)
    if record.get("host") == socket.gethostname() and record.get("pid") == os.getpid():
        with _LIVE_PASSES_LOCK:
            live = record.get("token") in _LIVE_PASSES and "released_at" not in record
        return record if live else None
    if claim_free(store, current, gone=holder_process_gone, now=time.time()):
        return None
    return record


def summarise_ids(ids: Sequence[str], *, first: int = 5) -> str:
    """``N request(s): a, b, c, ... (+K more)``: a log line's worth of ids, however many there are."""
    shown = ", ".join(str(i) for i in list(ids)[:first])
    more = f", ... (+{len(ids) - first} more)" if len(ids) > first else ""
    return f"{len(ids)} request(s): {shown}{more}" if ids else "0 requests"


def summarise_states(settled: Mapping[str, str], *, first: int = 5) -> str:
    """``done 998, failed 2 (failed: a, b)``: counts by state, and the first ids of each state other than done."""
    counts = Counter(settled.values())
    parts = [f"{state} {counts[state]}" for state in sorted(counts)]
    named = [
        f"{state}: {summarise_ids([r for r, s in settled.items() if s == state], first=first)}"
        for state in sorted(counts)
        if state != DONE
    ]
    return ", ".join(parts) + (f" ({'; '.join(named)})" if named else "") if settled else "nothing"


def _hold(ledger: DeletionLedger, entry: RequestStatus, holder: str, unkeep: Callable[[], None]) -> None:
    with _OPEN_CLAIMS_LOCK:
        _OPEN_CLAIMS[(ledger.store.url, entry.request_id)] = (ledger, entry.version, holder, unkeep)


def _drop(ledger: DeletionLedger, request_id: str) -> None:
    with _OPEN_CLAIMS_LOCK:
        _OPEN_CLAIMS.pop((ledger.store.url, request_id), None)


@dataclass(frozen=True)
class AttemptPolicy:
    """Leases and bounded retries of the deletion service (README "Request states").

    Attributes:
        lease_s: a claim not renewed for this long belongs to a dead holder and is taken over.
        max_attempts: attempts per request before it becomes ``failed``.
        first_backoff_s: wait after the first failed attempt; doubles per attempt.
        max_backoff_s: cap of that wait.
        retry_window_s: a flow run waits for a retry due within this long and runs it itself.
    """

    lease_s: float = DEFAULT_LEASE_S
    max_attempts: int = 3
    first_backoff_s: float = 5.0
    max_backoff_s: float = 60.0
    retry_window_s: float = 30.0


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


#: The state a pass reports for a request it could neither read nor record (its status is damaged too).
UNREADABLE = "unreadable"


def settle_unreadable(
    ledger: DeletionLedger,
    unreadable: Mapping[str, str],
    *,
    lease_s: float,
    log: logging.Logger | logging.LoggerAdapter,
) -> dict[str, dict[str, Any]]:
    """Record each open request that cannot be read as ``failed`` and say so loudly; the others are not held up.

    ``unreadable``: request id -> what :meth:`~storage.ledger.DeletionLedger.get` said (from
    ``due_entries(unreadable=...)``). A request whose record is damaged becomes ``failed`` with the
    error and the mend as its reason (:meth:`~storage.ledger.DeletionLedger.fail_unreadable`);
    nothing is applied for it. One whose current status is damaged (as well) cannot be recorded:
    it is reported ``unreadable``, left as it is, and the log says so once: it stays open, so every
    later pass meets it again, and only the first to meet that damage says it as an error (noted on
    the request, :meth:`~storage.ledger.DeletionLedger.report_unreadable`; the others at debug level).

    Returns:
        request id -> ``{"status": "failed" | "unreadable", "reason": ...}`` for each request this
        call recorded or could not record (a live claim or a settled request is left out); an
        ``unreadable`` one also has ``said_before``: whether an earlier pass said it already.
    """
    out: dict[str, dict[str, Any]] = {}
    for request_id, error in sorted(unreadable.items()):
        try:
            failed = ledger.fail_unreadable(request_id, error, lease_s=lease_s)
        except Exception as err:  # noqa: BLE001 -- its status cannot be recorded: said, and the pass goes on
            reason = f"{str(error).rstrip('.')}; and no status can be recorded: {err}"
            try:
                news = ledger.report_unreadable(request_id, reason)
            except Exception:  # noqa: BLE001 -- the note is only what keeps the log quiet: say it
                news = True
            out[request_id] = {"status": UNREADABLE, "reason": reason, "said_before": not news}
            log.log(
                logging.ERROR if news else logging.DEBUG,
                "request %s cannot be read and is left as it is (the other requests go on)%s: %s",
                request_id,
                "" if news else "; said when a pass first met it",
                reason,
            )
            continue
        if failed is not None:
            out[request_id] = {"status": FAILED, "reason": str(failed["reason"])}
            log.error("request %s failed (the other requests go on): %s", request_id, failed["reason"])
    return out


def run_pass(
    store: str,
    *,
    unlearn_runs: Callable[[dict[str, dict[str, list[int]]]], dict[str, dict[str, Any]]],
    attempts: AttemptPolicy = AttemptPolicy(),
    holder: str | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    batch: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Claim, check, unlearn and settle every due request of ``store`` once.

    Args:
        store: the store of runs and ledger.
        unlearn_runs: runs ``{run_id: {request_id: ids}}`` on workers and returns each run's audit
            (``{"status": "failed", "error": ...}`` for a run that raised).
        attempts: leases and retry bounds.
        holder: this pass's name in claims and leases.
        logger: where progress goes.
        batch: the flushed batch (``reason``, ``deadlines`` by request id, from
            :func:`flows.batching.batch_gate`); each done request records when it became exact
            against its deadline (``exact_at``, ``deadline``, ``late``).

    A pass run inside :func:`store_pass` checks, at each safe point (before it claims each request, before its
    fan-out, before each retry alone, before its batch record, before each request's erasure and settle), that the
    store's pass claim is still its own: one that stalled past its lease and was taken over stops there, writes
    nothing more, hands its request claims back (``pending``, due at once, attempt not counted) and says so in one
    line (``claim_lost``). Each request's own claim is renewed and checked the same way
    (:meth:`storage.ledger.DeletionLedger.request_claim`): one taken over is left to its new holder (``lost``).

    Returns:
        ``claimed`` request ids, ``runs`` (audits), ``settled`` (request id -> state), ``lost``
        (claims taken over by another pass while this one worked), ``claim_lost`` (the line said when this
        pass lost the store's pass claim and stopped; absent otherwise) and ``unreadable`` (open requests
        whose record or status is damaged, each ``failed`` with the mend in its reason or, its
        status damaged too, left as it is: :func:`settle_unreadable`; a ``failed`` one is in
        ``settled`` too). One damaged request never stops the others.
    """
    holder = holder or f"pass-{os.getpid()}-{time.time_ns()}"
    try:
        return _run_pass(store, unlearn_runs=unlearn_runs, attempts=attempts, holder=holder, logger=logger, batch=batch)
    finally:  # a pass that ended, however, holds nothing for hand_back_open_claims
        with _OPEN_CLAIMS_LOCK:
            for key in [key for key, held in _OPEN_CLAIMS.items() if held[2] == holder]:
                del _OPEN_CLAIMS[key]


class _PassWork:
    """What one deletion pass holds while it works, and its writes that need a claim (:func:`run_pass`).

    The store's pass claim, when the pass runs inside :func:`store_pass` (``held_pass``: the store's url, its
    keeper, the claim), the claims on the requests it took (renewed by ``keeper``), and the outcomes so far, shared
    with the caller (``settled``: request id -> state; ``lost``: requests whose claim another pass took). Each
    write of a request's state first checks the claims (:meth:`pass_lost`), so a pass that stalled past its lease
    and was taken over writes nothing more; each loss is said in one line.
    """

    def __init__(
        self,
        ledger: DeletionLedger,
        keeper: LeaseKeeper,
        *,
        holder: str,
        attempts: AttemptPolicy,
        log: logging.Logger | logging.LoggerAdapter,
        held_pass: tuple[str, LeaseKeeper, PointerClaim] | None,
        settled: dict[str, str],
        lost: list[str],
    ) -> None:
        self.ledger, self.keeper, self.holder, self.attempts, self.log = ledger, keeper, holder, attempts, log
        self.held_pass, self.settled, self.lost = held_pass, settled, lost
        self.claimed: list[RequestStatus] = []
        self.claims: dict[str, PointerClaim] = {}  # request id -> this pass's claim on it, while held
        self.claim_lost: list[str] = []  # the line said, once this pass found the store's pass claim taken over

    def pass_lost(self, where: str) -> bool:
        """The safe-point check: whether this pass lost the store's pass claim (said once, claims handed back)."""
        if self.claim_lost:
            return True
        held = self.held_pass
        if held is None or held[1].check(held[2]):
            return False
        handed: list[str] = []
        for request_id in list(self.claims):
            entry = next(c for c in self.claimed if c.request_id == request_id)
            _drop(self.ledger, request_id)
            self.keeper.release(self.claims.pop(request_id).key)
            with contextlib.suppress(StorageError, PointerConflict):
                reason = f"the pass {self.holder} lost its claim on the store {where}"
                outcome = self.ledger.hand_back(request_id, claim_version=entry.version, reason=reason)
                if outcome is not None:
                    handed.append(request_id)
                    self.settled[request_id] = outcome.status
            if request_id not in handed:
                self.lost.append(request_id)
        line = lost_text(self.ledger.store, held[2], f"deletion pass {self.holder} ({where})")
        if handed:
            line += f"; it handed its {summarise_ids(handed)} back to pending (attempt not counted)"
        self.claim_lost.append(line)
        self.log.warning("%s", line)
        held[1].said_lost(held[2].key)  # the one line of this loss
        return True

    def request_lost(self, entry: RequestStatus, what: str) -> bool:
        """Whether this pass's claim on ``entry`` was taken over by another pass (said, and left to it)."""
        claim = self.claims.get(entry.request_id)
        if claim is None or self.keeper.check(claim):
            return False
        _drop(self.ledger, entry.request_id)
        del self.claims[entry.request_id]
        self.lost.append(entry.request_id)
        self.log.warning("%s", lost_text(self.ledger.store, claim, f"{what} of request {entry.request_id}"))
        self.keeper.said_lost(claim.key)  # the one line of this loss
        return True

    def unkeep(self, entry: RequestStatus) -> None:
        """Stop renewing ``entry``'s claim before this pass's own write moves it (never then called lost)."""
        _drop(self.ledger, entry.request_id)
        claim = self.claims.pop(entry.request_id, None)
        if claim is not None:
            self.keeper.release(claim.key)

    def fail(self, entry: RequestStatus, error: str, extra: dict[str, Any] | None = None) -> None:
        """Record a failed attempt of ``entry`` (handed back instead while serve stops), if its claims still hold."""
        if self.pass_lost("before recording a failed attempt") or entry.request_id not in self.claims:
            return
        key = self.claims[entry.request_id].key
        self.unkeep(entry)
        stopping = STOPPING.is_set()
        if stopping:
            # the stop killed the workers: not a failed attempt; stored progress is resumed later
            outcome = self.ledger.hand_back(
                entry.request_id,
                claim_version=entry.version,
                reason=f"serve stopped during the work ({error[:300]})",
            )
        else:
            outcome = self.ledger.fail_attempt(
                entry.request_id,
                claim_version=entry.version,
                error=error,
                max_attempts=self.attempts.max_attempts,
                first_backoff_s=self.attempts.first_backoff_s,
                max_backoff_s=self.attempts.max_backoff_s,
                extra=extra,
            )
        if outcome is None and self.handed_back_by_stop(entry):
            self.settled[entry.request_id] = PENDING
            self.log.warning(
                "request %s was handed back by serve's stop already; its attempt is not counted", entry.request_id
            )
        elif outcome is None:
            self.lost.append(entry.request_id)
            self.log.warning(
                "request %s: claim taken over by another pass; its attempt is left to it", entry.request_id
            )
            self.keeper.said_lost(key)
        elif stopping:
            self.settled[entry.request_id] = outcome.status
            self.log.warning("request %s handed back (serve is stopping); its attempt is not counted", entry.request_id)
        else:
            self.settled[entry.request_id] = outcome.status
            self.log.warning("request %s attempt failed (%s): %s", entry.request_id, outcome.status, error[:300])

    def settle(self, entry: RequestStatus, status: str, details: dict[str, Any]) -> None:
        """Settle ``entry`` as ``status``, if its claims still hold."""
        if self.pass_lost(f"before settling request {entry.request_id}") or entry.request_id not in self.claims:
            return
        key = self.claims[entry.request_id].key
        self.unkeep(entry)
        outcome = self.ledger.settle(entry.request_id, claim_version=entry.version, status=status, details=details)
        if outcome is None and self.handed_back_by_stop(entry):
            self.settled[entry.request_id] = PENDING
            self.log.warning(
                "request %s was handed back by serve's stop before this pass settled it; the next pass does it again",
                entry.request_id,
            )
        elif outcome is None:
            self.lost.append(entry.request_id)
            self.log.warning("request %s: claim taken over by another pass; its result is left to it", entry.request_id)
            self.keeper.said_lost(key)
        else:
            self.settled[entry.request_id] = status

    def handed_back_by_stop(self, entry: RequestStatus) -> bool:
        """Whether serve's stop handed ``entry`` back itself while this pass was stuck (its claim moved by that)."""
        with _OPEN_CLAIMS_LOCK:
            return (self.ledger.store.url, entry.request_id) in _HANDED_BACK_BY_STOP


def _run_pass(
    store: str,
    *,
    unlearn_runs: Callable[[dict[str, dict[str, list[int]]]], dict[str, dict[str, Any]]],
    attempts: AttemptPolicy = AttemptPolicy(),
    holder: str,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    batch: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`run_pass`, its claims noted for :func:`hand_back_open_claims` while it holds them."""
    log = logger or logging.getLogger(__name__)
    object_store = ObjectStore(store)
    ledger, registry = DeletionLedger(object_store), RunRegistry(object_store)
    settled: dict[str, str] = {}
    lost: list[str] = []
    found: dict[str, str] = {}
    due = [] if STOPPING.is_set() else ledger.due_entries(lease_s=attempts.lease_s, unreadable=found)
    unreadable = settle_unreadable(ledger, found, lease_s=attempts.lease_s, log=log)
    settled.update({r: u["status"] for r, u in unreadable.items() if u["status"] == FAILED})
    held_pass = getattr(_HELD_PASS, "held", None)
    if held_pass is not None and held_pass[0] != object_store.url:
        held_pass = None
    with LeaseKeeper(object_store, lease_s=attempts.lease_s, holder=holder) as keeper:
        work = _PassWork(
            ledger, keeper, holder=holder, attempts=attempts, log=log, held_pass=held_pass, settled=settled, lost=lost
        )
        for entry in due:
            if work.pass_lost("before claiming more requests"):
                break
            try:
                taken = ledger.claim(
                    entry.request_id, holder=holder, lease_s=attempts.lease_s, max_attempts=attempts.max_attempts
                )
                if taken is None:
                    continue
                if taken.status == FAILED:
                    settled[entry.request_id] = FAILED
                    log.warning("request %s failed: %s", entry.request_id, taken.details.get("reason"))
                    continue
                claim = ledger.request_claim(taken, lease_s=attempts.lease_s)
                work.claims[entry.request_id] = claim
                work.claimed.append(taken)
                _hold(ledger, taken, holder, lambda key=claim.key: keeper.release(key))
                keeper.hold_claim(claim, loss_said_by_holder=True)  # said where the pass finds it lost
            except Exception as err:  # noqa: BLE001 -- one unreadable entry must not stop the others
                log.warning("request %s could not be claimed: %s", entry.request_id, _error_text(err))
        if not work.claimed or work.claim_lost:
            return {
                "claimed": [c.request_id for c in work.claimed],
                "runs": {},
                "settled": settled,
                "lost": lost,
                "unreadable": unreadable,
                **({"claim_lost": work.claim_lost[0]} if work.claim_lost else {}),
            }
        log.info("claimed %s", summarise_ids([c.request_id for c in work.claimed]))

        specs, spec_errors = load_specs(registry)
        per_run: dict[str, dict[str, list[int]]] = {}
        affected_of: dict[str, tuple[RequestStatus, list[str]]] = {}
        not_trained_of: dict[str, list[int]] = {}  # ids no registered run trained on: accepted, nothing to forget now
        refused: dict[str, str] = {}  # one log line for all of them (it was a WARNING per request)
        for entry in work.claimed:
            try:
                request_runs = runs_of(entry, specs, spec_errors)
            except RequestError as err:
                refused[entry.request_id] = str(err)
                work.settle(entry, REJECTED, {"reason": str(err), "attempt": entry.details.get("attempt")})
                continue
            except Exception as err:  # noqa: BLE001 -- anything else is a failed attempt of this request only
                work.fail(entry, _error_text(err))
                continue
            affected = request_runs.runs
            affected_of[entry.request_id] = (entry, affected)
            if request_runs.not_trained_on:
                not_trained_of[entry.request_id] = request_runs.not_trained_on
            ids = [int(i) for i in entry.request["ids"]]
            for run_id in affected:
                per_run.setdefault(run_id, {})[entry.request_id] = ids

        if refused:
            first = next(iter(refused))
            log.warning(
                "rejected %s (first: %s); `obliviate forget --status <request>` gives each reason",
                summarise_ids(list(refused)),
                refused[first],
            )
        if work.pass_lost("before its fan-out"):
            per_run = {}
        results = _guarded(unlearn_runs, per_run) if per_run else {}
        # A run that merged several requests and failed: each request alone on that run, so a poison
        # request only fails itself.
        split = {
            run_id: requests
            for run_id, requests in per_run.items()
            if len(requests) > 1
            and results.get(run_id, {}).get("status") == "failed"
            and not STOPPING.is_set()
            and not work.pass_lost("before retrying a run's requests alone")
        }
        alone: dict[tuple[str, str], dict[str, Any]] = {}
        for run_id, requests in split.items():
            log.warning("run %s failed with %d merged requests; retrying each alone", run_id, len(requests))
            for request_id, ids in sorted(requests.items()):
                if work.pass_lost(f"before retrying run {run_id} with request {request_id} alone"):
                    break
                alone[(run_id, request_id)] = _guarded(unlearn_runs, {run_id: {request_id: ids}}).get(run_id, {})

        lost_now = work.pass_lost("before recording its batch")
        batch_id = None if lost_now else _record_batch(ledger, results, affected_of, batch, holder=holder, log=log)
        # SPEC 5 reaches the checkpoints of trainings that stopped before publishing (so before registering
        # their run): only registered runs were unlearned above, and those chains kept the ids for good.
        interrupted = InterruptedTrainings(object_store, command=f"obliviate deletion pass {holder}")
        deleted_of = {run_id: {int(i) for i in audit.get("deleted_ids") or ()} for run_id, audit in results.items()}
        for request_id, (entry, affected) in affected_of.items():
            if work.pass_lost(f"before settling request {request_id}"):
                break
            if work.request_lost(entry, "the erasure and settle"):
                continue
            ids = [int(i) for i in entry.request["ids"]]
            audits = {
                run_id: request_part(
                    alone.get((run_id, request_id)) or results.get(run_id, {}),
                    request_id,
                    ids=ids,
                    deleted=(
                        {int(i) for i in alone[(run_id, request_id)].get("deleted_ids") or ()}
                        if (run_id, request_id) in alone
                        else deleted_of.get(run_id, set())
                    ),
                    batch_id=None if (run_id, request_id) in alone else batch_id,
                )
                for run_id in affected
            }
            failed = {run_id: a for run_id, a in audits.items() if a.get("status") in ("failed", None)}
            erased: dict[str, Any] = {}
            if not failed:
                try:
                    erased = interrupted.erase(request_id, str(entry.request["dataset"]), ids)
                except StorageError as err:
                    failed = {"(interrupted trainings)": {"error": f"their checkpoints could not be listed: {err}"}}
            if failed:
                error = "; ".join(f"run {r}: {a.get('error', 'no result')}" for r, a in sorted(failed.items()))
                work.fail(entry, error, {"runs": audits})
            else:
                _say_erased(request_id, erased, log)
                not_trained_on = not_trained_of.get(request_id, [])
                if not_trained_on:
                    _say_not_trained_on(entry, not_trained_on, retrained=bool(affected), log=log)
                exact_at = time.time()
                # the deadline recorded when the request was accepted (an older record has none: the gate's,
                # receipt + the policy's deadline)
                deadline = entry.request.get("deadline", (batch or {}).get("deadlines", {}).get(request_id))
                timing = {
                    "exact_at": exact_at,
                    # when its data left storage: every run's superseded versions purged (SPEC 5); None while
                    # a purge is pending or the store keeps them (each run's audit says which and why)
                    "purged_at": request_purged_at(audits),
                    "deadline": deadline,
                    "late": deadline is not None and exact_at > deadline,
                }
                work.settle(
                    entry,
                    DONE,
                    {
                        "runs": audits,
                        "finished_at": exact_at,
                        "attempt": entry.details.get("attempt"),
                        "batch": (batch or {}).get("reason"),
                        **({"batch_id": batch_id, "batch_requests": len(affected_of)} if batch_id else {}),
                        **({"interrupted_trainings": erased} if erased else {}),
                        **({"not_trained_on": not_trained_on} if not_trained_on else {}),
                        **timing,
                    },
                )
    log.info("settled %d request(s): %s", len(settled), summarise_states(settled))
    news = {r: u for r, u in unreadable.items() if not u.get("said_before")}  # each said once, not every pass
    if news:
        log.error(
            "%s could not be read (`obliviate forget --status <request>` says how to mend each): %s",
            summarise_ids(sorted(news)),
            summarise_states({r: u["status"] for r, u in news.items()}),
        )
    return {
        "claimed": [c.request_id for c in work.claimed],
        "runs": results,
        "settled": settled,
        "lost": lost,
        "unreadable": unreadable,
        **({"claim_lost": work.claim_lost[0]} if work.claim_lost else {}),
    }


def _say_erased(request_id: str, erased: Mapping[str, Any], log: logging.Logger | logging.LoggerAdapter) -> None:
    """Log what a request's settle deleted of interrupted trainings' checkpoints, and what it left to a live one."""
    for run_id, chains in sorted(erased.get("purged", {}).items()):
        for chain, what in sorted(chains.items()):
            log.info(
                "request %s: deleted checkpoints %s of run %s (an interrupted training, not published), chain %s: "
                "trained on %d of its ids (SPEC 5); the checkpoints before block %d never saw them, and a rerun of "
                "`obliviate train` resumes from them",
                request_id,
                ", ".join(str(b) for b in what["blocks"]),
                run_id,
                chain,
                what["ids_count"],
                what["first_block"],
            )
    for run_id in sorted(erased.get("left_to_training", {})):
        log.info("request %s: run %s is being trained now; that training leaves its ids out", request_id, run_id)
    for run_id, error in sorted(erased.get("unreadable", {}).items()):
        log.warning(
            "request %s: what run %s (an interrupted training) holds of its ids is unknown: %s; "
            "`obliviate store check` reports the damage",
            request_id,
            run_id,
            error,
        )


def _say_not_trained_on(
    entry: RequestStatus, ids: Sequence[int], *, retrained: bool, log: logging.Logger | logging.LoggerAdapter
) -> None:
    """Log a done request's ids no registered run trained on: accepted with nothing to forget now."""
    dataset = entry.request["dataset"]
    which = f"{len(ids)} of its ids" if retrained else f"any of its {len(ids)} id(s)"
    outcome = "nothing to forget for them now" if retrained else "done with nothing to forget now, no run retrained"
    log.info(
        "request %s: no registered run of dataset %r trained on %s %s (held out or never used): %s; every later "
        "training of %r leaves them out",
        entry.request_id,
        dataset,
        which,
        _some(ids),
        outcome,
        dataset,
    )


def run_until_quiet(
    store: str, *, attempts: AttemptPolicy, run_once: Callable[[], dict[str, Any]], max_passes: int | None = None
) -> dict[str, Any]:
    """Run passes while a retry is due within ``attempts.retry_window_s``; merge their results."""
    ledger = DeletionLedger(ObjectStore(store))
    merged: dict[str, Any] = {"claimed": [], "runs": {}, "settled": {}, "lost": [], "unreadable": {}, "passes": 0}
    for _ in range(max_passes or attempts.max_attempts + 1):
        result = run_once()
        merged["passes"] += 1
        merged["claimed"] += [r for r in result["claimed"] if r not in merged["claimed"]]
        merged["runs"].update(result.get("runs", {}))
        merged["settled"].update(result.get("settled", {}))
        merged["lost"] += result.get("lost", [])
        if result.get("claim_lost"):  # this pass lost the store to another: it does nothing more
            merged["claim_lost"] = result["claim_lost"]
            break
        for request_id, said in result.get("unreadable", {}).items():  # as the first pass that met it said
            merged["unreadable"].setdefault(request_id, said)
        merged["fanout"] = result.get("fanout", merged.get("fanout"))
        retrying = [r for r, status in result.get("settled", {}).items() if status == PENDING]
        if not retrying or STOPPING.is_set():
            break
        soonest = min(float(ledger.get(r).details.get("next_attempt_at", 0.0)) for r in retrying)
        wait = soonest - time.time()
        if wait > attempts.retry_window_s:
            break
        time.sleep(max(0.0, wait) + 0.1)
    return merged


def _guarded(
    unlearn_runs: Callable[[dict[str, dict[str, list[int]]]], dict[str, dict[str, Any]]],
    per_run: dict[str, dict[str, list[int]]],
) -> dict[str, dict[str, Any]]:
    """``unlearn_runs``, with a failure of the fan-out itself (no Ray, no workers) recorded on every run."""
    try:
        return unlearn_runs(per_run)
    except Exception as err:  # noqa: BLE001 -- becomes a failed attempt of each request, never a stuck claim
        return {run_id: {"run_id": run_id, "status": "failed", "error": _error_text(err)} for run_id in per_run}
    except SystemExit as err:
        # serve stopping with its Ray runtime gone ends the wait on Ray by ray.shutdown(), which
        # raises SystemExit here: a stop, so the claims are handed back (it crashed the flow run
        # and left them claimed). Anywhere else SystemExit goes on as it is.
        if not STOPPING.is_set():
            raise
        error = f"the Ray connection was shut down ({type(err).__name__})"
        return {run_id: {"run_id": run_id, "status": "failed", "error": error} for run_id in per_run}


def load_specs(registry: RunRegistry) -> tuple[dict[str, RunSpec], dict[str, str]]:
    """Every registered run's spec; an unreadable one is noted, not fatal (its requests retry later)."""
    specs: dict[str, RunSpec] = {}
    errors: dict[str, str] = {}
    for run_id in registry.run_ids():
        try:
            specs[run_id] = registry.spec(run_id)
        except Exception as err:  # noqa: BLE001 -- a damaged spec affects only requests that might need it
            errors[run_id] = _error_text(err)
    return specs, errors


@dataclass(frozen=True)
class RequestRuns:
    """What a request asks of the registered runs of its dataset (:func:`runs_of`).

    Attributes:
        runs: the runs that trained on at least one of its ids (each retrains without them).
        not_trained_on: its ids that are rows of the dataset no registered run trained on (a run's held-out
            set, or never used): nothing to forget now. The request still stands for them: every later training
            of the dataset leaves out the ids of every pending, claimed, failed and done request
            (:func:`storage.ledger.erased_ids`), these included.
    """

    runs: list[str]
    not_trained_on: list[int]


def runs_of(entry: RequestStatus, specs: dict[str, RunSpec], spec_errors: dict[str, str]) -> RequestRuns:
    """The runs a request affects and its ids none trained on, after re-checking its ids (an entry may predate the rules).

    A data subject's erasure covers a row no run trained on too (SPEC 5): such an id is accepted, not a
    reason to refuse the whole request; only an id that is no row of the dataset is refused.

    Raises:
        RequestError: the request breaks a rule: an id past the dataset's rows, or no run of its dataset (reject it).
        RuntimeError: a run spec could not be read, or the dataset's row count is unknown here for an id past every
            row its runs name, so the answer is unknown (retry later).
    """
    ids = list(parse_ids(list(entry.request["ids"])))
    dataset = entry.request["dataset"]
    if spec_errors:
        raise RuntimeError(
            f"run specs unreadable, so the runs trained on these ids are unknown: {spec_errors}; "
            "`obliviate store check` reports the damage."
        )
    runs = [spec for spec in specs.values() if spec.dataset == dataset]
    if not runs:
        raise RequestError(
            f"no registered run was trained on dataset {dataset!r} (registered datasets: "
            f"{sorted({s.dataset for s in specs.values()})}); nothing changed."
        )
    rows = _dataset_rows(dataset)
    outside = [i for i in ids if rows is not None and i >= rows]
    if outside:
        raise RequestError(
            f"rule: a sample id is a row index of dataset {dataset!r} ({rows} rows: ids 0..{rows - 1}); got "
            f"{_some(outside)}, no row of it. The request is rejected as a whole and nothing changed. "
            "Resubmit without them."
        )
    known: set[int] = set()
    affected = []
    for spec in runs:
        positions, _ = spec.positions(ids)
        if positions.size:
            affected.append(spec.run_id)
            known.update(spec.dataset_ids(positions))
    not_trained_on = sorted(set(ids) - known)
    if rows is None and not_trained_on:
        # Without the row count, only the rows some run names (trained on or held out) are known to exist.
        named = max(max(spec.train_ids + spec.heldout_ids, default=-1) for spec in runs)
        unsure = [i for i in not_trained_on if i > named]
        if unsure:
            raise RuntimeError(
                f"dataset {dataset!r} does not load where this pass runs, so whether ids {_some(unsure)} are rows of "
                f"it is unknown (no registered run trained on them, and its runs name rows up to {named} only). "
                "Make the dataset load where `obliviate serve` runs (the --data its runs were trained with), or "
                "resubmit without them."
            )
    return RequestRuns(runs=affected, not_trained_on=not_trained_on)


def _dataset_rows(dataset: str) -> int | None:
    """Rows of ``dataset`` where this pass runs, or ``None`` when it does not load here."""
    from flows.unlearn import dataset_rows  # flows.unlearn runs these passes: imported when first needed

    return dataset_rows(dataset)


def _some(ids: Sequence[int]) -> str:
    """Up to 20 ids as a list, with ``...`` when there are more."""
    return f"{list(ids[:20])}{' ...' if len(ids) > 20 else ''}"


def _record_batch(
    ledger: DeletionLedger,
    results: Mapping[str, Mapping[str, Any]],
    affected_of: Mapping[str, Any],
    batch: Mapping[str, Any] | None,
    *,
    holder: str,
    log: logging.Logger | logging.LoggerAdapter,
) -> str | None:
    """Store the pass's batch once (``ledger/batches/<id>.json``: every run's full audit); returns its id.

    ``None`` when there was no fan-out or the record could not be written (each request then keeps
    its own part only; the settle goes on).
    """
    if not results:
        return None
    batch_id = f"b{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:10]}"
    try:
        ledger.record_batch(
            batch_id,
            {
                "requests": sorted(affected_of),
                "reason": (batch or {}).get("reason"),
                **({"rollback_refused": batch["rollback_refused"]} if (batch or {}).get("rollback_refused") else {}),
                "holder": holder,
                "runs": {run_id: dict(audit) for run_id, audit in sorted(results.items())},
            },
        )
    except StorageError as err:
        log.warning(
            "the record of batch %s could not be written (%s); its requests keep their own parts", batch_id, err
        )
        return None
    return batch_id
