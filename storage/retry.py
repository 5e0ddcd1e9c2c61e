"""Retrying storage calls while the backend is unreachable, and saying so while it does not answer.

Only :class:`storage.errors.StorageUnavailable` is retried (a network or endpoint outage);
missing or corrupt objects and pointer conflicts are answers, not outages, and pass straight
through. Every write in the store is idempotent from a reader's point of view (data first,
commit record last; pointer versions are create-if-absent), so repeating a failed call is safe.

A backend that accepts connections but never replies (a frozen endpoint, a network path that
drops packets) used to keep a command silent for minutes. Two rules now hold for every call an
:class:`storage.objects.ObjectStore` makes on a network store (:func:`watched_call`):

* **It ends.** A call the store has not answered for :func:`call_limit_s` (:data:`CALL_LIMIT_S`,
  more for each byte it sends or reads) is abandoned as :class:`StorageUnavailable`; inside
  :func:`retry_unavailable` during an outage, at the retry deadline; once the store has answered
  nobody for :data:`CALL_LIMIT_S`, a new call gets :data:`KNOWN_OUTAGE_CALL_S`. Every HTTP answer of the
  store counts (:func:`heard_from`: each page of a listing, each part of an upload), so a long
  call that keeps getting answers is not cut.
* **The user hears of it.** One watchdog thread per process (started at the first network call,
  asleep while no call is in flight) reports a store that has not answered for
  :data:`STALL_NOTICE_AFTER_S`, again every :data:`STALL_NOTICE_EVERY_S` while it lasts, and once
  more when it answers again. Reports go to the callback given to :func:`set_stall_reporter` (the
  CLI prints them on stderr), else to the ``storage`` logger as warnings.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from storage.errors import StorageUnavailable

T = TypeVar("T")

# Seconds without an answer before the user is told, and between further notices.
STALL_NOTICE_AFTER_S = 10.0
STALL_NOTICE_EVERY_S = 30.0
# A write or read of N bytes is reported only after N / this rate more (bytes may still be flowing).
STALL_NOTICE_BYTES_PER_S = 1024 * 1024
# A backend call the store has not answered for this long is abandoned as StorageUnavailable; a
# transfer of N bytes gets N / SLOWEST_BYTES_PER_S more.
CALL_LIMIT_S = 120.0
SLOWEST_BYTES_PER_S = 64 * 1024  # 512 kbit/s: only a link slower than that would see a transfer cut
# During an outage a call inside retry_unavailable ends at the retry deadline, but gets at least this.
OUTAGE_CALL_MIN_S = 5.0
# A call made while the store has answered nobody for CALL_LIMIT_S (a known outage) gets this long:
# the clean-up after a failure (releasing a claim, a lease) then ends in seconds, not minutes each.
KNOWN_OUTAGE_CALL_S = 10.0
# An outage is one while callers keep asking; after this long with nobody asking, a new wait starts afresh.
_OUTAGE_GAP_S = 30.0

_log = logging.getLogger("storage")

#: How long an outage is retried before a call fails, unless a caller chooses otherwise.
DEFAULT_RETRY_DEADLINE_S = 300.0

# A writer that lost a compare-and-swap waits a random time up to this, doubling per loss up to the cap,
# before it reads again ("full jitter"): losers that retried at once met the same writers again, and
# one of four could lose 20 swaps in a row (CI of a78bd8b, a run's pruned record).
SWAP_FIRST_WAIT_S = 0.005
SWAP_MAX_WAIT_S = 0.25
# Jitter only spreads writers apart; it draws from the OS, so no seeded state anywhere is touched.
_swap_jitter = random.SystemRandom()


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off: waits ``first_wait_s``, doubling up to ``max_wait_s``, for ``deadline_s`` in all."""

    deadline_s: float = DEFAULT_RETRY_DEADLINE_S
    first_wait_s: float = 0.25
    max_wait_s: float = 5.0


def retry_unavailable(
    call: Callable[[], T],
    *,
    policy: RetryPolicy = RetryPolicy(),
    on_retry: Callable[[int, Exception], None] | None = None,
) -> T:
    """Run ``call``; while it raises :class:`StorageUnavailable`, wait and retry until the deadline.

    While an outage lasts, each storage call ``call`` makes ends by the deadline at the latest (so
    a frozen endpoint cannot hold the retries past it), and the stall notices name the deadline.

    Raises:
        StorageUnavailable: still unreachable after ``policy.deadline_s`` (the last error).
    """
    began = time.monotonic()
    wait = policy.first_wait_s
    attempt = 0
    retrying = _Retrying(deadline=began + policy.deadline_s)
    stack = _retry_stack()
    stack.append(retrying)
    try:
        while True:
            attempt += 1
            try:
                return call()
            except StorageUnavailable as err:
                if time.monotonic() - began + wait > policy.deadline_s:
                    raise
                retrying.in_outage = True
                if on_retry is not None:
                    on_retry(attempt, err)
                with _WATCH.backing_off():
                    time.sleep(wait)
                wait = min(wait * 2, policy.max_wait_s)
    finally:
        stack.remove(retrying)


def swap_attempts(count: int) -> Iterator[int]:
    """The attempt numbers ``0 .. count - 1`` of a compare-and-swap loop, with a random pause before each retry.

    The pause before attempt ``n`` is drawn uniformly from ``[0, min(SWAP_MAX_WAIT_S, SWAP_FIRST_WAIT_S * 2**(n-1)))``,
    so writers that collided spread apart instead of colliding again; ``count`` attempts wait at most about
    ``count * SWAP_MAX_WAIT_S`` in all. The first attempt does not wait.
    """
    for attempt in range(count):
        if attempt:
            time.sleep(_swap_jitter.uniform(0.0, min(SWAP_MAX_WAIT_S, SWAP_FIRST_WAIT_S * 2 ** (attempt - 1))))
        yield attempt


def call_limit_s(payload_bytes: int = 0) -> float:
    """How long the store may leave one backend call unanswered before it is abandoned as unavailable."""
    return CALL_LIMIT_S + max(0, payload_bytes) / SLOWEST_BYTES_PER_S


def call_overdue() -> bool:
    """Whether the watched call of this thread has gone unanswered past its limit (never outside one)."""
    current: tuple[_Store, _Waiter] | None = getattr(_local, "current", None)
    if current is None:
        return False
    entry, waiter = current
    return time.monotonic() > max(waiter.began, entry.heard_at) + waiter.limit


def unanswered_s() -> float | None:
    """How long the store of this thread's watched call has not answered (for the message when it is abandoned)."""
    current: tuple[_Store, _Waiter] | None = getattr(_local, "current", None)
    if current is None:
        return None
    entry, waiter = current
    since = entry.since if entry.since is not None else max(waiter.began, entry.heard_at)
    return time.monotonic() - since


def heard_from(store: str, endpoint: str | None) -> None:
    """The store answered a request (any HTTP answer, an error status too): it is not stalled."""
    _WATCH.heard(store, endpoint)


def set_stall_reporter(report: Callable[[str], None] | None) -> Callable[[str], None] | None:
    """Send stall notices to ``report(line)`` (``None``: the ``storage`` logger); returns the previous one."""
    global _reporter
    previous, _reporter = _reporter, report
    return previous


def watched_call(
    store: str, endpoint: str | None, *, payload_bytes: int = 0
) -> contextlib.AbstractContextManager[None]:
    """Around one backend call on ``store``: limits its time (:func:`call_overdue`) and reports it if unanswered.

    ``payload_bytes``: bytes the call sends or reads (it gets more time, and is reported later).
    An exception other than :class:`StorageUnavailable` is an answer (a missing object is one);
    :class:`StorageUnavailable` is not, and neither is an interruption.
    """
    return _WATCH.call(store, endpoint, payload_bytes=payload_bytes)


# ----- internals -------------------------------------------------------------------------------

_local = threading.local()
_reporter: Callable[[str], None] | None = None


@dataclass
class _Retrying:
    deadline: float
    in_outage: bool = False


def _retry_stack() -> list[_Retrying]:
    stack: list[_Retrying] | None = getattr(_local, "retrying", None)
    if stack is None:
        stack = _local.retrying = []
    return stack


@dataclass
class _Waiter:
    began: float
    notice_at: float  # not reported before this (a transfer may still be moving bytes)
    limit: float  # abandoned once unanswered this long
    retry_deadline: float  # the retries around it go on until then (0: none)
    payload_bytes: int


@dataclass
class _Store:
    label: str
    since: float | None = None  # unanswered since
    heard_at: float = 0.0  # its last answer
    left_at: float = 0.0  # when the last waiter left without an answer
    noticed_at: float | None = None
    waiters: dict[int, _Waiter] = field(default_factory=dict)


class _StallWatch:
    """Calls in flight per store, and the one thread that reports those gone unanswered."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._stores: dict[tuple[str, str | None], _Store] = {}
        self._in_flight = 0
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def call(self, store: str, endpoint: str | None, *, payload_bytes: int) -> Iterator[None]:
        now = time.monotonic()
        limit = call_limit_s(payload_bytes)
        stack = _retry_stack()
        retry_deadline = 0.0
        if stack:
            if stack[-1].in_outage:  # the retries end at their deadline: so does this call (plus its transfer time)
                transfer = max(0, payload_bytes) / SLOWEST_BYTES_PER_S
                limit = min(limit, max(stack[-1].deadline - now, OUTAGE_CALL_MIN_S) + transfer)
            retry_deadline = max(retrying.deadline for retrying in stack)
        # A transfer may still be moving bytes: it is reported that much later. Any other call is due as soon as
        # the store has not answered for STALL_NOTICE_AFTER_S (an outage that began before it counts).
        notice_after = STALL_NOTICE_AFTER_S + payload_bytes / STALL_NOTICE_BYTES_PER_S if payload_bytes > 0 else 0.0
        key = (store, endpoint)
        waiter = _Waiter(now, now + notice_after, limit, retry_deadline, payload_bytes)
        token = self._enter(key, waiter, now)
        since = self._stores[key].since
        if since is not None and now - since >= CALL_LIMIT_S:
            waiter.limit = min(limit, KNOWN_OUTAGE_CALL_S + max(0, payload_bytes) / SLOWEST_BYTES_PER_S)
        outer = getattr(_local, "current", None)
        _local.current = (self._stores[key], waiter)
        answered: bool | None = None
        try:
            yield
            answered = True
        except StorageUnavailable:
            answered = False
            _local.unavailable = key
            raise
        except Exception:
            answered = True
            raise
        finally:
            _local.current = outer
            self._leave(key, token, answered)
            if answered:
                _local.unavailable = None
                if stack:
                    stack[-1].in_outage = False

    @contextlib.contextmanager
    def backing_off(self) -> Iterator[None]:
        """A retry's wait counts as waiting on the store whose call just failed."""
        key = getattr(_local, "unavailable", None)
        stack = _retry_stack()
        if key is None or not stack:
            yield
            return
        now = time.monotonic()
        deadline = max(retrying.deadline for retrying in stack)
        token = self._enter(key, _Waiter(now, now, 0.0, deadline, 0), now)
        try:
            yield
        finally:
            self._leave(key, token, None)

    def _enter(self, key: tuple[str, str | None], waiter: _Waiter, now: float) -> int:
        token = next(self._tokens)
        with self._lock:
            entry = self._stores.get(key)
            if entry is None:
                entry = self._stores[key] = _Store(label=_label(*key))
            if entry.since is None or (not entry.waiters and now - entry.left_at > _OUTAGE_GAP_S):
                entry.since, entry.noticed_at = now, None
            entry.waiters[token] = waiter
            self._in_flight += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="storage-stall-watch", daemon=True)
                self._thread.start()
            if self._in_flight == 1:
                self._lock.notify()
        return token

    def heard(self, store: str, endpoint: str | None) -> None:
        now = time.monotonic()
        line = None
        with self._lock:
            entry = self._stores.get((store, endpoint))
            if entry is None:
                return
            entry.heard_at = now
            if entry.noticed_at is not None and entry.since is not None:
                line = f"storage {entry.label} answers again, after {now - entry.since:.0f} s without an answer."
            entry.since, entry.noticed_at = (now if entry.waiters else None), None
        if line is not None:
            _report(line)

    def _leave(self, key: tuple[str, str | None], token: int, answered: bool | None) -> None:
        now = time.monotonic()
        line = None
        with self._lock:
            entry = self._stores[key]
            entry.waiters.pop(token, None)
            self._in_flight -= 1
            if answered:
                if entry.noticed_at is not None and entry.since is not None:
                    line = f"storage {entry.label} answers again, after {now - entry.since:.0f} s without an answer."
                # Calls still in flight wait for an answer from now on: the store has just given one.
                entry.since, entry.noticed_at = (now if entry.waiters else None), None
            elif not entry.waiters:
                entry.left_at = now
        if line is not None:
            _report(line)

    def _watch(self) -> None:
        while True:
            with self._lock:
                while self._in_flight == 0:
                    self._lock.wait()
                self._lock.wait(timeout=1.0)
                lines = self._due(time.monotonic())
            for line in lines:
                _report(line)

    def _due(self, now: float) -> list[str]:
        lines = []
        for entry in self._stores.values():
            if not entry.waiters or entry.since is None:
                continue
            if not any(
                now >= max(waiter.notice_at, entry.since + STALL_NOTICE_AFTER_S) for waiter in entry.waiters.values()
            ):
                continue
            if entry.noticed_at is not None and now - entry.noticed_at < STALL_NOTICE_EVERY_S:
                continue
            entry.noticed_at = now
            lines.append(_stall_line(entry, now))
        return lines


def _label(store: str, endpoint: str | None) -> str:
    return f"{store} (endpoint {endpoint})" if endpoint else store


def _stall_line(entry: _Store, now: float) -> str:
    since = entry.since if entry.since is not None else now
    call_ends_at = max(max(waiter.began, entry.heard_at) + waiter.limit for waiter in entry.waiters.values())
    retries_end_at = max(waiter.retry_deadline for waiter in entry.waiters.values())
    gives_up_at = max(call_ends_at, retries_end_at)
    left = max(0.0, gives_up_at - now)
    clock = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=left)
    moving = max(waiter.payload_bytes for waiter in entry.waiters.values())
    transfer = (
        f" (a transfer of {moving / 2**20:.0f} MiB is in flight: on a slow link its bytes may still be moving)"
        if moving >= STALL_NOTICE_BYTES_PER_S
        else ""
    )
    if retries_end_at >= call_ends_at:
        bound = (
            f"still waiting and retrying until {clock:%H:%M:%S} UTC at the latest (in {left:.0f} s), "
            "then the call fails"
        )
    else:
        # No retry around the call (serve's own checks, a command's single try): the time is this one call's bound;
        # a flow retrying its work on the same store says its own, later one, which this must not pass for.
        bound = (
            f"still waiting until {clock:%H:%M:%S} UTC at the latest (in {left:.0f} s), this one call's bound, "
            "then it fails"
        )
    return f"storage {entry.label} has not answered for {now - since:.0f} s{transfer}; {bound}. Ctrl-C stops it now."


def _report(line: str) -> None:
    report = _reporter
    if report is None:
        _log.warning(line)
        return
    try:
        report(line)
    except (OSError, ValueError):  # a closed or broken stderr must never break the call a notice is about
        _log.warning(line)


_WATCH = _StallWatch()
