"""The ``reconcile`` flow (cron, or by hand): finish every ledger entry that is not done, and every purge.

The safety net behind the event-triggered ``unlearn`` flow: a lost event, a crashed pass or a
request waiting out its retry back-off loses nothing, because this pass processes every due
ledger request the same way (:func:`flows.unlearn.process_open_requests`): pending ones past
their back-off, and claims whose lease lapsed (their holder died). One pass at a time per store:
a pass that finds another (serve's watcher, an event's run, a cron run) holding the store's pass
claim (:func:`flows.settle.store_pass`) does nothing and says which pass holds it. Then it finishes
the purges of superseded versions (SPEC 5) that a crash or an outage cut off (:func:`finish_purges`),
so none waits for someone to run ``store check --repair``, and deletes what the checkpoints of a
training that died before it published hold of settled requests' ids (:func:`sweep_dead_trainings`:
the pass that settled them left that run to the training, then alive). Run it by hand with
``python -c "from flows.reconcile import reconcile_flow; reconcile_flow(store='file://./runs')"``
or ``prefect deployment run 'reconcile/reconcile-<suffix>'`` against a running ``serve``.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow, get_run_logger

from flows.runtime import quiet_foreseen_tracebacks
from flows.settle import AttemptPolicy
from flows.unlearn import process_open_requests
from obliviate.defaults import DEFAULT_MIN_POINTS, DEFAULT_STOP_RULE
from obliviate.unlearning.deepobliviate import DEFAULT_EPSILON
from storage.check import purge_superseded, runs_with_purge_left
from storage.erasure import sweep_dead_trainings
from storage.errors import StorageUnavailable
from storage.lease import DEFAULT_LEASE_S
from storage.objects import ObjectStore


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
    """Finish every due ledger entry (a lost event, a crashed pass, a retry) and every pending purge: the cron safety net.

    Returns:
        the pass's result (:func:`flows.unlearn.process_open_requests`) with ``"purge"``: what
        :func:`finish_purges` did, and ``"dead_trainings"``: what :func:`sweep_dead` did.

    Raises:
        StorageUnavailable: the store stayed unreachable; the run ends ``Failed`` with that sentence (no
            traceback in the log) and the requests keep their status for the next pass.
    """
    # serve's runner runs this in a subprocess: without the filter an outage there logged Prefect's traceback.
    quiet_foreseen_tracebacks()
    attempts = AttemptPolicy(lease_s=lease_s, max_attempts=max_attempts)
    try:
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
    except StorageUnavailable as err:
        raise StorageUnavailable(
            f"the reconcile pass stopped: {err} Every request keeps the status it had; the next reconcile pass "
            "(serve's --reconcile-cron) tries again."
        ) from err
    logger = get_run_logger()
    return {**result, "purge": finish_purges(store, logger=logger), "dead_trainings": sweep_dead(store, logger=logger)}


def finish_purges(store: str, *, logger: logging.Logger | logging.LoggerAdapter[Any]) -> dict[str, Any] | None:
    """SPEC 5: finish the purges of superseded versions a crash or an outage cut off, and tell the ledger.

    :func:`storage.check.purge_superseded` on the runs that have work left
    (:func:`storage.check.runs_with_purge_left`: superseded versions not purged yet, or purged ones
    whose requests' ledger entries were not told): idempotent, it keeps what work in flight may
    use and purges nothing while the store keeps superseded versions (``serve
    --keep-superseded-versions``). The requests applied to those runs whose entries say the purge is
    ``pending`` (or ``kept``) then say ``purged`` with when; one whose status is damaged is said once in
    the log with its mend and told by the first pass after it is mended. A purge that fails never fails the pass:
    it is said once in the pass's log, the entries keep saying ``pending`` and the next pass (or
    ``obliviate store check --repair``) tries again.

    Returns:
        what the purge did (``purge_superseded``'s result), ``None`` when no run had work left, or
        ``{"error": ...}`` when it failed.
    """
    object_store = ObjectStore(store)
    try:
        runs = runs_with_purge_left(object_store)
        if not runs:
            return None
        result = purge_superseded(object_store, apply=True, runs=runs)
    except Exception as err:  # noqa: BLE001 -- a purge left pending is finished by a later pass, never this one's failure
        error = f"{type(err).__name__}: {err}"[:300]
        logger.warning(
            "could not finish the purge of superseded versions (%s); the requests' entries keep saying pending, and "
            "the next pass (or `obliviate store check --repair`) tries again",
            error,
        )
        return {"error": error}
    if result["skipped"]:
        logger.warning(
            "could not purge the superseded versions of run(s) %s (first: %s); `obliviate store check` says what is "
            "damaged and how to mend it",
            sorted(result["skipped"]),
            next(iter(result["skipped"].values())),
        )
    untold = {
        request: reason for run in result["runs"].values() for request, reason in (run.get("untold") or {}).items()
    }
    if untold:
        logger.warning(
            "the purge of superseded versions of run(s) %s went through, but %d request(s) could not be told, their "
            "status being damaged: %s. Each is noted in its run's pruned record (runs/<run>/pruned, untold_damaged) "
            "and said here once; no pass plans the run again for it until it is mended, and the first pass after "
            "that tells it",
            sorted(run_id for run_id, run in result["runs"].items() if run.get("untold")),
            len(untold),
            "; ".join(f"{request}: {reason}" for request, reason in sorted(untold.items())),
        )
    told = sorted({request for run in result["runs"].values() for request in run.get("requests") or []})
    if result["objects"] or told:
        logger.info(
            "finished the purge of superseded versions of run(s) %s: %d object(s) deleted, %d request(s) told",
            sorted(result["runs"]),
            result["objects"],
            len(told),
        )
    return result


def sweep_dead(store: str, *, logger: logging.Logger | logging.LoggerAdapter[Any]) -> dict[str, Any] | None:
    """SPEC 5: delete what trainings that died before publishing hold of settled requests' ids, and tell the requests.

    :func:`storage.erasure.sweep_dead_trainings`; said in the pass's log. A sweep that fails never fails
    the pass: it is said once, and the next pass (or ``obliviate store check --repair``) tries again.

    Returns:
        what the sweep did, ``None`` when it found nothing, or ``{"error": ...}`` when it failed.
    """
    try:
        result = sweep_dead_trainings(ObjectStore(store), command="obliviate reconcile")
    except Exception as err:  # noqa: BLE001 -- left for the next pass, never this one's failure
        error = f"{type(err).__name__}: {err}"[:300]
        logger.warning(
            "could not sweep the checkpoints of trainings that died before publishing (%s); the next pass (or "
            "`obliviate store check --repair`) tries again",
            error,
        )
        return {"error": error}
    for run_id, chains in sorted(result.get("purged", {}).items()):
        for chain, what in sorted(chains.items()):
            logger.info(
                "deleted checkpoints %s of run %s, chain %s (its training died before it published): trained on %d "
                "id(s) of settled request(s) %s (SPEC 5); the checkpoints before block %d never saw them, and a rerun "
                "of `obliviate train` resumes from them",
                ", ".join(str(b) for b in what["blocks"]),
                run_id,
                chain,
                what["ids_count"],
                ", ".join(what["requests"]),
                what["first_block"],
            )
    for run_id, error in sorted(result.get("unreadable", {}).items()):
        logger.warning(
            "what run %s (a training that never published) holds of settled requests' ids is unknown: %s; "
            "`obliviate store check` reports the damage",
            run_id,
            error,
        )
    for request_id, error in sorted(result.get("untold", {}).items()):
        logger.warning(
            "request %s: the checkpoints holding its ids were deleted, but its record could not say so: %s; "
            "`obliviate store check` says how to mend it",
            request_id,
            error,
        )
    return result or None
