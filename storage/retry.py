"""Retrying storage calls while the backend is unreachable.

Only :class:`storage.errors.StorageUnavailable` is retried (a network or endpoint outage);
missing or corrupt objects and pointer conflicts are answers, not outages, and pass straight
through. Every write in the store is idempotent from a reader's point of view (data first,
commit record last; pointer versions are create-if-absent), so repeating a failed call is safe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from storage.errors import StorageUnavailable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off: waits ``first_wait_s``, doubling up to ``max_wait_s``, for ``deadline_s`` in all."""

    deadline_s: float = 300.0
    first_wait_s: float = 0.25
    max_wait_s: float = 5.0


def retry_unavailable(
    call: Callable[[], T],
    *,
    policy: RetryPolicy = RetryPolicy(),
    on_retry: Callable[[int, Exception], None] | None = None,
) -> T:
    """Run ``call``; while it raises :class:`StorageUnavailable`, wait and retry until the deadline.

    Raises:
        StorageUnavailable: still unreachable after ``policy.deadline_s`` (the last error).
    """
    began = time.monotonic()
    wait = policy.first_wait_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except StorageUnavailable as err:
            if time.monotonic() - began + wait > policy.deadline_s:
                raise
            if on_retry is not None:
                on_retry(attempt, err)
            time.sleep(wait)
            wait = min(wait * 2, policy.max_wait_s)
