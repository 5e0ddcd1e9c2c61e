"""The ``reconcile`` flow (cron): finish every ledger entry that is not done.

The safety net behind the event-triggered ``unlearn`` flow: a lost event or a crashed pass loses
nothing, because this pass processes every open ledger request the same way
(:func:`flows.unlearn.process_open_requests`).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.unlearn import DEFAULT_STALE_AFTER_S, process_open_requests


@flow(name="reconcile")
def reconcile_flow(
    store: str,
    policy: str = "exact",
    verify: bool = False,
    workers: int | None = None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> dict[str, Any]:
    """Finish every ledger entry that is not done (a lost event, a crashed pass): the cron safety net."""
    return process_open_requests(store, policy=policy, verify=verify, workers=workers, stale_after_s=stale_after_s)
