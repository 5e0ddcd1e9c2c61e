"""Leases on claimed deletion requests: a claim stays valid only while its holder renews it.

A claim (``claimed`` status version ``c`` of a request in :mod:`storage.ledger`) carries a lease
that its worker renews every few seconds while it works, in ``ledger/leases/<request>/c<c>.json``
(one object per claim, so a former holder that wakes up late can never overwrite its
successor's lease). A claim whose lease has lapsed belongs to a dead holder (a crashed ``serve``,
a killed flow run) and may be taken over by the next pass: seconds to a minute after the crash,
instead of a fixed 10-minute stale limit.

Clocks: the lease records the holder's wall time; holders and takers are expected to share a
clock to within a fraction of the lease (NTP). :data:`DEFAULT_LEASE_S` leaves room for that.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Self

from storage.errors import CorruptObject, ObjectNotFound, StorageError
from storage.objects import ObjectStore

DEFAULT_LEASE_S = 20.0


def lease_key(request_id: str, claim_version: int) -> str:
    return f"ledger/leases/{request_id}/c{claim_version:09d}.json"


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


def renew(store: ObjectStore, request_id: str, *, claim_version: int, holder: str, lease_s: float) -> Lease:
    """Write (or extend) the lease of one claim."""
    lease = Lease(holder=holder, claim_version=claim_version, renewed_at=time.time(), lease_s=float(lease_s))
    store.put_json(lease_key(request_id, claim_version), lease.as_dict())
    return lease


def read(store: ObjectStore, request_id: str, *, claim_version: int) -> Lease | None:
    """The lease of a claim, or ``None`` if the holder never wrote one (or it is being rewritten)."""
    try:
        body = store.get_json(lease_key(request_id, claim_version))
    except (ObjectNotFound, CorruptObject):  # a rewrite in flight reads as damaged: the claim's own time counts
        return None
    return Lease(
        holder=str(body["holder"]),
        claim_version=int(body["claim_version"]),
        renewed_at=float(body["renewed_at"]),
        lease_s=float(body["lease_s"]),
    )


def lapsed(
    store: ObjectStore, request_id: str, *, claim_version: int, claimed_at: float, lease_s: float, now: float
) -> bool:
    """Whether a claim's holder stopped renewing: no renewal within its lease (or since the claim)."""
    lease = read(store, request_id, claim_version=claim_version)
    expires = lease.expires_at if lease is not None else claimed_at + lease_s
    return now > expires


def drop(store: ObjectStore, request_id: str) -> None:
    """Remove every lease object of a settled request (best effort: leftovers are orphans for `store check`)."""
    with contextlib.suppress(StorageError):
        for key in store.list(f"ledger/leases/{request_id}"):
            store.delete(key)


class LeaseKeeper:
    """Renews the leases of the claims a pass holds, from a daemon thread, until :meth:`stop`.

    Args:
        store: the ledger's store.
        lease_s: lease length; renewals happen every ``lease_s / 4``.
        holder: the holder's name (recorded for the audit trail).
    """

    def __init__(self, store: ObjectStore, *, lease_s: float, holder: str) -> None:
        self.store, self.lease_s, self.holder = store, float(lease_s), holder
        self._claims: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
        self.renewals = 0
        self.failures = 0

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def hold(self, request_id: str, claim_version: int) -> None:
        """Start renewing a claim (renewed once now, so it is never younger than its claim)."""
        with self._lock:
            self._claims[request_id] = claim_version
        renew(self.store, request_id, claim_version=claim_version, holder=self.holder, lease_s=self.lease_s)

    def release(self, request_id: str) -> None:
        with self._lock:
            self._claims.pop(request_id, None)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            with self._lock:
                claims = dict(self._claims)
            for request_id, version in claims.items():
                try:
                    renew(self.store, request_id, claim_version=version, holder=self.holder, lease_s=self.lease_s)
                    self.renewals += 1
                except StorageError:  # an outage: the next renewal tries again; the lease has slack
                    self.failures += 1
