"""Leases on claimed deletion requests: a claim stays valid only while its holder renews it.

A claim (``claimed`` status version ``c`` of a request in :mod:`storage.ledger`) carries a lease
that its worker renews every few seconds while it works, in ``ledger/leases/<request>/c<c>.json``
(one object per claim, so a former holder that wakes up late can never overwrite its
successor's lease). A claim whose lease has lapsed belongs to a dead holder (a crashed ``serve``,
a killed flow run) and may be taken over by the next pass: seconds to a minute after the crash,
instead of a fixed 10-minute stale limit.

The same leases keep a :class:`PointerClaim` alive: one process's claim on a pointer, such as a
run's training (``runs/<run>/train-claim``, :func:`flows.train.training_claim`), taken by a
compare-and-swap (:func:`take_claim`) and free again once released or once its lease lapsed. A holder that
stalled past its lease and was taken over learns so at its next renewal (:func:`renew_claim`): it writes no lease
and removes its own, and its :class:`LeaseKeeper` stops renewing and says so (:attr:`LeaseKeeper.lost`). Its work
learns it at its next safe point (:meth:`LeaseKeeper.check`, :class:`ClaimGuard`: :class:`ClaimLost`) and stops
there, writing nothing more of what the new holder now owns. A claim on a deletion request (a ``claimed`` status
version) is a :class:`PointerClaim` too (its pointer ``ledger/status/<request>``, its leases in
``ledger/leases/<request>``), renewed and checked the same way. Each
take and release adds a version to that pointer and each take a lease, so a release (and a take-over)
drops the versions but the newest :data:`CLAIM_VERSIONS_KEPT` and the leases of the claims below them
(:func:`tidy_claim`): serve's cron alone takes the store's pass claim every 5 minutes, forever.

Clocks: the lease records the holder's wall time; holders and takers are expected to share a
clock to within a fraction of the lease (NTP). :data:`DEFAULT_LEASE_S` leaves room for that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

from obliviate.errors import ObliviateError
from storage.errors import CorruptObject, ObjectNotFound, PointerConflict, StorageError
from storage.objects import ObjectStore, Pointer, not_shared_text

DEFAULT_LEASE_S = 20.0
#: Versions of a claim's pointer kept when :func:`tidy_claim` drops the older ones: the newest (which every
#: compare-and-swap of the claim is decided by) and the one before, for a reader that listed just before a swap.
CLAIM_VERSIONS_KEPT = 2
# Deletes one tidy_claim makes at most, of versions and of leases each: a store written before claims were tidied holds
# two versions and a lease per claim ever taken (about 200,000 after a year of serve's cron), which later releases
# then drop this many at a time (a few seconds on S3) instead of one release spending an hour on them.
_TIDY_MOST = 200
# A claim's lease in its folder (lease_key): c<claim version>.json.
_CLAIM_LEASE = re.compile(r"^c(?P<version>\d{9})\.json$")

_log = logging.getLogger(__name__)


def lease_key(request_id: str, claim_version: int, *, folder: str | None = None) -> str:
    """Where a claim's lease lives: ``folder`` (default ``ledger/leases/<request>``) ``/c<claim version>.json``."""
    return f"{folder or f'ledger/leases/{request_id}'}/c{claim_version:09d}.json"


@dataclass(frozen=True)
class Lease:
    """The newest renewal of one claim: who holds it and until when (holder's wall clock)."""

    holder: str
    claim_version: int
    renewed_at: float
    lease_s: float

    @property
    def expires_at(self) -> float:
        return self.renewed_at + self.lease_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "holder": self.holder,
            "claim_version": self.claim_version,
            "renewed_at": self.renewed_at,
            "lease_s": self.lease_s,
        }


def renew(
    store: ObjectStore, request_id: str, *, claim_version: int, holder: str, lease_s: float, folder: str | None = None
) -> Lease:
    """Write (or extend) the lease of one claim (``folder``: see :func:`lease_key`)."""
    lease = Lease(holder=holder, claim_version=claim_version, renewed_at=time.time(), lease_s=float(lease_s))
    store.put_json(lease_key(request_id, claim_version, folder=folder), lease.as_dict())
    return lease


def read(store: ObjectStore, request_id: str, *, claim_version: int, folder: str | None = None) -> Lease | None:
    """The lease of a claim, or ``None`` if the holder never wrote one (or it is being rewritten)."""
    try:
        body = store.get_json(lease_key(request_id, claim_version, folder=folder))
    except (ObjectNotFound, CorruptObject):  # a rewrite in flight reads as damaged: the claim's own time counts
        return None
    return Lease(
        holder=str(body["holder"]),
        claim_version=int(body["claim_version"]),
        renewed_at=float(body["renewed_at"]),
        lease_s=float(body["lease_s"]),
    )


def lapsed(
    store: ObjectStore,
    request_id: str,
    *,
    claim_version: int,
    claimed_at: float,
    lease_s: float,
    now: float,
    folder: str | None = None,
) -> bool:
    """Whether a claim's holder stopped renewing: no renewal within its lease (or since the claim)."""
    lease = read(store, request_id, claim_version=claim_version, folder=folder)
    expires = lease.expires_at if lease is not None else claimed_at + lease_s
    return now > expires


def drop(store: ObjectStore, request_id: str) -> None:
    """Remove every lease object of a settled request, and its folder on a file store (best effort: leftovers
    are orphans for `store check`)."""
    folder = f"ledger/leases/{request_id}"
    with contextlib.suppress(StorageError):
        for key in store.list(folder):
            store.delete(key)
        store.remove_empty_folder(folder)


class ClaimLost(ObliviateError):
    """This holder's claim was taken over (it stalled past its lease): its work stops, writing nothing more.

    The message is the one line said where the work stopped: ``claim on <pointer> (version v) was lost to <new
    holder> at <when it took it>; <what> stopped without writing``. One argument only, so it crosses Ray as itself.
    """


def lost_text(store: ObjectStore, claim: PointerClaim, what: str) -> str:
    """The line a holder says when it stops because ``claim`` was taken over (reads the pointer once, best effort).

    A claim's pointer that has no version at all was never taken in the store this process reads: a claim keeps
    its newest versions whoever releases or takes it (:func:`tidy_claim`). That is said as such
    (:func:`missing_claim_text`), not as a take-over by an unknown holder.
    """
    try:
        current = store.read_pointer(claim.key)
    except (StorageError, CorruptObject):
        current = None
    else:
        if current is None:
            return missing_claim_text(store, claim, what)
    who, when = "another holder", "an unknown time"
    if current is not None:
        who = f"{holder_text(current.target)} (version {current.version})"
        when = _utc(float(current.target.get("claimed_at") or current.created_at))
    return f"claim on {store.uri(claim.key)} (version {claim.version}) was lost to {who} at {when}; {what} stopped without writing"


def missing_claim_text(store: ObjectStore, claim: PointerClaim, what: str) -> str:
    """The line a holder says when its claim's pointer is not in the store at all, as this process reads it.

    A claim keeps its newest versions whoever releases or takes it, so none at all is not a take-over: this
    process's node does not see the store the claim was taken in (:func:`storage.objects.not_shared_text`).
    """
    return not_shared_text(
        store,
        missing=f"claim on {store.uri(claim.key)} (version {claim.version})",
        written_in="the claim was taken in",
        what=what,
    )


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def holder_text(target: Mapping[str, Any]) -> str:
    """Who holds a claim pointer's version now, as its target records it (a request's status names its holder)."""
    if "status" in target:  # a deletion request's status: claimed by another pass, or moved on
        details = target.get("details") or {}
        if target["status"] == "claimed":
            return f"pass {details.get('holder')!r}"
        return f"its status {target['status']!r}"
    if "released_at" in target:
        return "nobody (released)"
    who = target.get("holder") or target.get("command") or "another process"
    return f"{who}, pid {target.get('pid')} on {target.get('host')}"


class ClaimGuard:
    """A holder's check, at each safe point of its work, that its claim is still its own (one pointer read each).

    For a worker that holds no :class:`LeaseKeeper` itself, such as the Ray actor training a run for
    ``obliviate train`` (whose process renews the claim): it reads the claim's pointer through the store, so a
    stalled driver cannot keep it writing. Once lost, every later check raises at once.

    Args:
        store: the claim's store.
        claim: the claim (its ``key`` and ``version`` matter).
        what: the work, as the stop line names it (``training of run r1``).
    """

    def __init__(self, store: ObjectStore, claim: PointerClaim, *, what: str) -> None:
        self.store, self.claim, self.what = store, claim, what
        self.lost: ClaimLost | None = None

    def check(self) -> None:
        """Raise :class:`ClaimLost` if the claim was taken over; an unreadable pointer (an outage) lets work go on.

        Raises:
            ClaimLost: the claim's pointer moved past it.
        """
        if self.lost is None:
            try:
                current = _claim_current(self.store, self.claim)
            except (StorageError, CorruptObject):  # its writes meet the outage too; the lease has slack
                return
            if current:
                return
            self.lost = ClaimLost(lost_text(self.store, self.claim, self.what))
            _log.warning("%s", self.lost)
        raise self.lost


class LeaseKeeper:
    """Renews the leases of the claims a pass holds, from a daemon thread, until :meth:`stop`.

    A claim on a pointer (:meth:`hold_claim`: the store's pass claim, a run's train-claim, a deletion request's
    claim) is renewed only while it is still this holder's: once another process took it over (this one stalled
    past its lease), the keeper stops renewing it, its key goes to :attr:`lost` and a warning names the new holder;
    :func:`release_claim` then returns ``False`` for it. The holder's work asks :meth:`check` at each safe point.

    Args:
        store: the ledger's store.
        lease_s: lease length; renewals happen every ``lease_s / 4``.
        holder: the holder's name (recorded for the audit trail).
    """

    def __init__(self, store: ObjectStore, *, lease_s: float, holder: str) -> None:
        self.store, self.lease_s, self.holder = store, float(lease_s), holder
        self._claims: dict[str, tuple[int, str | None, PointerClaim | None]] = {}
        # claim key -> wall time of its newest lease found still its own after the write
        self._confirmed: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
        self.renewals = 0
        self.failures = 0
        #: Keys of the pointer claims found taken over by another holder at a renewal (no longer renewed).
        self.lost: list[str] = []
        #: Set once any claim of :attr:`lost` was found lost.
        self.lost_event = threading.Event()
        self._holder_says: set[str] = set()  # keys held with loss_said_by_holder
        self._unsaid: dict[str, PointerClaim] = {}  # of those, lost and not yet said by their holder

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hold(self, request_id: str, claim_version: int, *, folder: str | None = None) -> None:
        """Start renewing a claim, unchecked (renewed once now, so it is never younger than its claim).

        A claim with a pointer is held with :meth:`hold_claim` instead, whose renewals check it is still this
        holder's.
        """
        with self._lock:
            self._claims[request_id] = (claim_version, folder, None)
        renew(
            self.store, request_id, claim_version=claim_version, holder=self.holder, lease_s=self.lease_s, folder=folder
        )

    def hold_claim(self, claim: PointerClaim, *, loss_said_by_holder: bool = False) -> bool:
        """Start renewing a claim on a pointer (renewed once now); ``False`` if it was taken over already.

        ``loss_said_by_holder``: the holder's work says the claim's loss in its own line, which names what stopped
        (a deletion pass: :func:`flows.settle.run_pass`), and acknowledges it with :meth:`said_lost`; the keeper's
        line, found at a renewal, is then said only if the keeper stops with the loss unacknowledged, so the user
        reads one line per lost claim, not two.

        Raises:
            StorageError: the first renewal could not be made (an outage).
        """
        with self._lock:
            self._claims[claim.key] = (claim.version, claim.folder, claim)
            if loss_said_by_holder:
                self._holder_says.add(claim.key)
        return self._renew_claim(claim)

    def said_lost(self, key: str) -> None:
        """The holder said the loss of its claim on ``key`` in its own line: the keeper says nothing of it at stop."""
        with self._lock:
            self._unsaid.pop(key, None)

    def release(self, request_id: str) -> None:
        """Stop renewing a claim: before the holder's own write that moves its pointer (a settle), not after, else a
        renewal in between would find it moved and call it lost."""
        with self._lock:
            self._claims.pop(request_id, None)

    def stop(self) -> None:
        """Stop renewing; say the loss of every claim held with ``loss_said_by_holder`` whose holder never did."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            unsaid, self._unsaid = list(self._unsaid.values()), {}
        for claim in unsaid:
            _log.warning("%s", _taken_over_line(self.store, claim))

    def check(self, claim: PointerClaim) -> bool:
        """Whether ``claim``, held here, is still this holder's: the safe-point check of its work.

        No read while its newest lease is younger than half the lease (no taker can have judged it lapsed, clocks
        agreeing to within that); else the pointer is read once. A claim found lost goes to :attr:`lost`, as at a
        renewal. An unreadable pointer (an outage) answers ``True``: the work's own writes meet the outage too.
        """
        with self._lock:
            if claim.key in self.lost and self._claims.get(claim.key, (None, None, None))[2] != claim:
                return False
            if time.time() - self._confirmed.get(claim.key, float("-inf")) < self.lease_s / 2:
                return True
        try:
            if _claim_current(self.store, claim):
                return True
        except (StorageError, CorruptObject):
            return True
        return not self._lose(claim)

    def _renew_claim(self, claim: PointerClaim) -> bool:
        lease = _renew_if_current(self.store, claim, holder=self.holder, lease_s=self.lease_s)
        if lease is not None:
            with self._lock:
                self._confirmed[claim.key] = lease.renewed_at
            return True
        return not self._lose(claim)

    def _lose(self, claim: PointerClaim) -> bool:
        """Note ``claim`` lost, unless this holder released it meanwhile (then its own write moved the pointer)."""
        with self._lock:
            if self._claims.get(claim.key, (None, None, None))[2] != claim:
                return False
            del self._claims[claim.key]
            self._confirmed.pop(claim.key, None)
            self.lost.append(claim.key)
            self.lost_event.set()
            deferred = claim.key in self._holder_says
            if deferred:
                self._unsaid[claim.key] = claim
        _claim_lost(self.store, claim, say=not deferred)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            with self._lock:
                claims = dict(self._claims)
            for request_id, (version, folder, claim) in claims.items():
                try:
                    if claim is not None:
                        if not self._renew_claim(claim):
                            continue
                    else:
                        renew(
                            self.store,
                            request_id,
                            claim_version=version,
                            holder=self.holder,
                            lease_s=self.lease_s,
                            folder=folder,
                        )
                    self.renewals += 1
                except (StorageError, CorruptObject):  # an outage: the next renewal tries again; the lease has slack
                    self.failures += 1


# ----- claims of one thing by one process (a run's training), with the same leases ------------------------


@dataclass(frozen=True)
class PointerClaim:
    """A claim on ``key`` (a pointer moved by compare-and-swap), held while its lease is renewed.

    ``version``: the pointer version this claim wrote; its lease is ``<key>-leases/c<version>.json``
    (:func:`lease_key`), so a former holder that wakes up late never renews its successor's claim.
    ``leases``: another folder of its leases (a deletion request's: ``ledger/leases/<request>``).
    """

    key: str
    version: int
    holder: dict[str, Any]
    leases: str | None = None

    @property
    def folder(self) -> str:
        return self.leases or claim_leases(self.key)


def claim_leases(key: str) -> str:
    """The folder of the leases of the claims on pointer ``key``."""
    return f"{key}-leases"


class ClaimHeld(Exception):
    """A live holder has the claim: ``holder`` (as it recorded itself), when it claimed and last renewed."""

    def __init__(self, key: str, holder: dict[str, Any], *, claimed_at: float, renewed_at: float | None) -> None:
        super().__init__(f"{key} is held by {holder}")
        self.key, self.holder, self.claimed_at, self.renewed_at = key, holder, claimed_at, renewed_at


def take_claim(
    store: ObjectStore,
    key: str,
    *,
    holder: dict[str, Any],
    lease_s: float = DEFAULT_LEASE_S,
    gone: Callable[[dict[str, Any]], bool] | None = None,
) -> PointerClaim:
    """Claim ``key`` for ``holder`` by a compare-and-swap from the version read, unless a live holder has it.

    The claim is free when it was released, when its holder stopped renewing its lease (no
    renewal for the lease it recorded: it died), or when ``gone(holder)`` says its process is no
    more. Of two takers starting together one wins the swap; the other re-reads and finds it live.
    The caller renews the lease (:meth:`LeaseKeeper.hold_claim`) and releases it
    (:func:`release_claim`).

    Raises:
        ClaimHeld: a live holder has it.
    """
    for _ in range(3):
        current = store.read_pointer(key)
        if current is not None and not claim_free(store, current, gone=gone, now=time.time()):
            renewal = read(store, key, claim_version=current.version, folder=claim_leases(key))
            raise ClaimHeld(
                key,
                dict(current.target),
                claimed_at=float(current.target.get("claimed_at", current.created_at)),
                renewed_at=renewal.renewed_at if renewal is not None else None,
            )
        target = {**holder, "claimed_at": time.time(), "lease_s": float(lease_s)}
        if current is not None and "released_at" not in current.target:
            target["took_over"] = {k: v for k, v in current.target.items() if k != "took_over"}
        try:
            pointer = store.swap_pointer(key, target, expected_version=current.version if current else 0)
        except PointerConflict:
            continue  # another taker moved it: read again and judge its holder
        name = " ".join(f"{k}={v}" for k, v in holder.items())
        renew(store, key, claim_version=pointer.version, holder=name, lease_s=lease_s, folder=claim_leases(key))
        if "took_over" in target:  # a holder that died released nothing: holders that always die grow it too
            _tidy_after(store, key, "take-over")
        return PointerClaim(key=key, version=pointer.version, holder=dict(target))
    raise PointerConflict(f"claim {store.uri(key)} kept moving over 3 attempts; try again.")


def claim_free(
    store: ObjectStore, current: Pointer, *, gone: Callable[[dict[str, Any]], bool] | None, now: float
) -> bool:
    """Whether the claim ``current`` is free to take: released, its holder ``gone``, or its lease lapsed."""
    target = dict(current.target)
    if "released_at" in target:
        return True
    if gone is not None and gone(target):
        return True
    return lapsed(
        store,
        current.key,
        claim_version=current.version,
        claimed_at=float(target.get("claimed_at", current.created_at)),
        lease_s=float(target.get("lease_s", DEFAULT_LEASE_S)),
        now=now,
        folder=claim_leases(current.key),
    )


def holder_process_gone(holder: Mapping[str, Any]) -> bool:
    """Whether a claim's holder was another process of this host that is no more (a ``gone`` for :func:`take_claim`)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def renew_claim(store: ObjectStore, claim: PointerClaim, *, holder: str, lease_s: float) -> Lease | None:
    """Renew ``claim``'s lease if the claim is still this holder's; ``None`` if it was taken over (or released).

    A holder that stalled past its lease may have been taken over (:func:`take_claim`) meanwhile: its claim
    is then no longer the pointer's newest version, and its lease must not be written again. The pointer is
    read before the write, and again after it, since a take-over can land between the two: found moved
    either time, the holder's own lease (``c<its version>.json``) is deleted, as nobody judges a claim the
    pointer moved past (a taker that read that version loses its compare-and-swap), and ``None`` returned.

    Raises:
        StorageError: the pointer could not be read or the lease written (an outage: try again later).
    """
    lease = _renew_if_current(store, claim, holder=holder, lease_s=lease_s)
    if lease is None:
        _claim_lost(store, claim)
    return lease


def _renew_if_current(store: ObjectStore, claim: PointerClaim, *, holder: str, lease_s: float) -> Lease | None:
    """:func:`renew_claim` without what follows a loss."""
    if _claim_current(store, claim):
        lease = renew(
            store, claim.key, claim_version=claim.version, holder=holder, lease_s=lease_s, folder=claim.folder
        )
        if _claim_current(store, claim):
            return lease
    return None


def _claim_current(store: ObjectStore, claim: PointerClaim) -> bool:
    """Whether ``claim`` is its pointer's newest version: a number only the swap that wrote it can hold there.

    (A stalled writer may re-create a dropped lower number, never the newest one: :meth:`ObjectStore.swap_pointer`.)
    """
    current = store.read_pointer(claim.key)
    return current is not None and current.version == claim.version


def _claim_lost(store: ObjectStore, claim: PointerClaim, *, say: bool = True) -> None:
    """Delete the lease of ``claim``, taken over (a failure of that left to :func:`tidy_claim`), and say so.

    ``say``: ``False`` when the holder's work says the loss in its own line (:meth:`LeaseKeeper.hold_claim`'s
    ``loss_said_by_holder``): then only the debug log hears it here.
    """
    try:
        store.delete(lease_key(claim.key, claim.version, folder=claim.folder))
    except StorageError as err:
        _log.debug("lease of lost claim %s (version %d) not deleted: %s", store.uri(claim.key), claim.version, err)
    _log.log(logging.WARNING if say else logging.DEBUG, "%s", _taken_over_line(store, claim))


def _taken_over_line(store: ObjectStore, claim: PointerClaim) -> str:
    """What a keeper says of ``claim`` found taken over at a renewal (reads the pointer once, best effort)."""
    try:
        current = store.read_pointer(claim.key)
    except StorageError:
        current = None
    now = "unknown"
    if current is not None:
        target = current.target
        if "status" in target:  # a deletion request's status
            state = holder_text(target)
        elif "released_at" in target:
            state = "released"
        else:
            state = f"held by {holder_text(target)}"
        now = f"at version {current.version}: {state}"
    return (
        f"claim {store.uri(claim.key)} version {claim.version} (pid {claim.holder.get('pid')} on "
        f"{claim.holder.get('host')}) was taken over: its holder did not renew its "
        f"{float(claim.holder.get('lease_s', DEFAULT_LEASE_S)):.0f} s lease in time (a stalled process) and the claim "
        f"is now {now}. This holder stops renewing it and removed its lease; a longer lease keeps a holder that "
        "stalls this long"
    )


def release_claim(store: ObjectStore, claim: PointerClaim) -> bool:
    """Give a claim up (the next taker need not wait for its lease); ``False`` if it was taken over meanwhile.

    Once released, the pointer's old versions and the leases of old claims are dropped (:func:`tidy_claim`);
    a failure of that is logged and left to the next release, never raised.
    """
    try:
        store.swap_pointer(claim.key, {**claim.holder, "released_at": time.time()}, expected_version=claim.version)
    except PointerConflict:
        return False
    _tidy_after(store, claim.key, "release")
    return True


def tidy_claim(store: ObjectStore, key: str, *, keep_last: int = CLAIM_VERSIONS_KEPT) -> tuple[list[int], list[str]]:
    """Drop claim pointer ``key``'s versions but its newest ``keep_last``, and the leases of the claims below them.

    Each version of a claim's pointer holds its whole state (the holder, or its release) and only the
    newest is read (:func:`take_claim`, :func:`claim_free`), so the older ones go as a run's pruned record's
    do (:meth:`storage.objects.ObjectStore.drop_pointer_versions`: oldest first, never the newest; a taker
    stalled meanwhile loses its swap and reads again). A lease (``c<version>.json``) goes when its claim
    version is below the oldest kept one, as listed after the drop: the newest version then was at or above
    it and only versions above are written later, so that claim was released or taken over before; no live
    holder holds it. A holder that was taken over while stalled writes no lease again (:func:`renew_claim`);
    one that died mid-renewal leaves its lease to a later tidy. A listing that meets a stalled taker's
    re-created low number starts lower, so deletes less. ``store check`` checks such a pointer from its oldest
    kept version. At most :data:`_TIDY_MOST` versions and as many leases go in one tidy (the oldest), the rest
    in the next ones.

    Returns:
        the versions dropped and the lease keys deleted.

    Raises:
        StorageError: a listing or a delete failed (what is left stays for the next tidy).
    """
    listed = store.pointer_versions(key)
    dropped = store.drop_pointer_versions(key, keep_last=max(keep_last, len(listed) - _TIDY_MOST))
    kept = store.pointer_versions(key)
    if not kept:
        return dropped, []
    deleted: list[str] = []
    for lease in store.list(claim_leases(key)):  # sorted: the oldest claims' first
        named = _CLAIM_LEASE.match(lease.rsplit("/", 1)[-1])
        if named is not None and int(named.group("version")) < kept[0] and len(deleted) < _TIDY_MOST:
            store.delete(lease)
            deleted.append(lease)
    return dropped, deleted


def _tidy_after(store: ObjectStore, key: str, what: str) -> None:
    """:func:`tidy_claim` after a claim's ``what`` (a release, a take-over), its failure logged: never the caller's."""
    try:
        dropped, deleted = tidy_claim(store, key)
    except Exception as err:  # noqa: BLE001 -- housekeeping: the claim itself is done, the next tidy retries
        _log.warning(
            "after the %s of claim %s, its old pointer versions and leases could not be dropped (%s: %s); "
            "they stay until the next release drops them",
            what,
            store.uri(key),
            type(err).__name__,
            err,
        )
        return
    if dropped or deleted:
        _log.debug(
            "after the %s of claim %s: dropped pointer version(s) %s and %d lease(s)",
            what,
            store.uri(key),
            dropped,
            len(deleted),
        )
