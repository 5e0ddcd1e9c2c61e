"""The ``reconcile`` flow (cron, or by hand): finish every ledger entry that is not done.

The safety net behind the event-triggered ``unlearn`` flow: a lost event, a crashed pass or a
request waiting out its retry back-off loses nothing, because this pass processes every due
ledger request the same way (:func:`flows.unlearn.process_open_requests`): pending ones past
their back-off, and claims whose lease lapsed (their holder died). One pass at a time per store:
a pass that finds another (serve's watcher, an event's run, a cron run) holding the store's pass
claim (:func:`flows.settle.store_pass`) does nothing and says which pass holds it. Run it by hand with
``python -c "from flows.reconcile import reconcile_flow; reconcile_flow(store='file://./runs')"``
or ``prefect deployment run 'reconcile/reconcile-<suffix>'`` against a running ``serve``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.settle import AttemptPolicy
from flows.unlearn import process_open_requests
from obliviate.defaults import DEFAULT_MIN_POINTS, DEFAULT_STOP_RULE
from obliviate.unlearning.deepobliviate import DEFAULT_EPSILON
from storage.lease import DEFAULT_LEASE_S


@flow(name="reconcile")
def reconcile_flow(
    store: str,
    policy: str = "exact",
    verify: bool = False,
    workers: int | None = None,
    lease_s: float = DEFAULT_LEASE_S,
    max_attempts: int = 3,
    epsilon: float = DEFAULT_EPSILON,
    stop_rule: str = DEFAULT_STOP_RULE,
    min_points: int = DEFAULT_MIN_POINTS,
) -> dict[str, Any]:
    """Finish every due ledger entry (a lost event, a crashed pass, a retry): the cron safety net."""
    attempts = AttemptPolicy(lease_s=lease_s, max_attempts=max_attempts)
    return process_open_requests(
        store,
        policy=policy,
        epsilon=epsilon,
        verify=verify,
        workers=workers,
        attempts=attempts,
        stop_rule=stop_rule,
        min_points=min_points,
    )
