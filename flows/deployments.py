"""Deployments of the unlearning service, kept apart from the flow code.

:func:`build_deployments` returns what ``obliviate serve`` serves for one store:

* ``unlearn-<store>``: triggered by ``obliviate.deletion.requested`` events whose resource is this
  store (:func:`flows.unlearn.store_resource_id`); the event's payload and id become parameters;
* ``reconcile-<store>``: cron; finishes every ledger entry not done (lost events, crashes);
* ``audit-<store>``: cron; extraction audit of every run's current model.

:func:`serve_deployments` registers them, announces the Prefect API URL in the store (so
``obliviate forget`` finds where to send events), and runs them until interrupted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any

from flows.audit import audit_flow
from flows.reconcile import reconcile_flow
from flows.unlearn import DEFAULT_STALE_AFTER_S, ENDPOINT_KEY, EVENT_NAME, store_resource_id, unlearn_flow
from storage.objects import ObjectStore


@dataclass(frozen=True)
class ServiceOptions:
    """What ``obliviate serve`` runs.

    Attributes:
        store: the store of runs and ledger.
        policy: unlearning policy (``exact`` or ``deepobliviate``).
        verify: compare each unlearned model with a naive retrain (slow; for audits).
        workers: Ray workers per fan-out (default: cluster CPUs).
        reconcile_cron: schedule of the reconciliation.
        audit_cron: schedule of the extraction audit (``None``: no audit deployment).
        stale_after_s: a claim older than this is considered crashed.
    """

    store: str
    policy: str = "exact"
    verify: bool = False
    workers: int | None = None
    reconcile_cron: str = "*/5 * * * *"
    audit_cron: str | None = "0 3 * * *"
    stale_after_s: float = DEFAULT_STALE_AFTER_S

    @property
    def suffix(self) -> str:
        return hashlib.sha256(ObjectStore(self.store).url.encode()).hexdigest()[:10]


def build_deployments(options: ServiceOptions) -> list[Any]:
    """The runner deployments for one store (see the module docstring)."""
    from prefect.events import DeploymentEventTrigger

    store = ObjectStore(options.store).url
    common = {
        "store": store,
        "policy": options.policy,
        "verify": options.verify,
        "workers": options.workers,
        "stale_after_s": options.stale_after_s,
    }
    trigger = DeploymentEventTrigger(
        name=f"deletion-requested-{options.suffix}",
        expect={EVENT_NAME},
        match={"prefect.resource.id": store_resource_id(store)},
        parameters={**common, "payload": "{{ event.payload }}", "event_id": "{{ event.id|string }}"},
    )
    deployments = [
        unlearn_flow.to_deployment(name=f"unlearn-{options.suffix}", parameters=common, triggers=[trigger]),
        reconcile_flow.to_deployment(
            name=f"reconcile-{options.suffix}", parameters=common, cron=options.reconcile_cron
        ),
    ]
    if options.audit_cron:
        deployments.append(
            audit_flow.to_deployment(
                name=f"audit-{options.suffix}", parameters={"store": store}, cron=options.audit_cron
            )
        )
    return deployments


def serve_deployments(options: ServiceOptions, *, api_url: str) -> None:
    """Register the deployments, announce the API URL in the store, and serve until interrupted."""
    from prefect.runner import Runner
    from prefect.settings import PREFECT_RUNNER_POLL_FREQUENCY, temporary_settings

    poll = int(os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY", "2"))
    store = ObjectStore(options.store)
    store.ensure_container()
    with temporary_settings(updates={PREFECT_RUNNER_POLL_FREQUENCY: poll}):
        runner = Runner(name=f"obliviate-{options.suffix}", pause_on_shutdown=False)
        ids = [str(runner.add_deployment(deployment)) for deployment in build_deployments(options)]
        store.put_json(
            ENDPOINT_KEY,
            {
                "api_url": api_url,
                "deployments": ids,
                "pid": os.getpid(),
                "started_at": time.time(),
                "ray_address": os.environ.get("RAY_ADDRESS"),
            },
        )
        print(f"obliviate serve: {len(ids)} deployments of {store.url} served through {api_url}", flush=True)
        try:
            asyncio.run(runner.start())
        except KeyboardInterrupt:
            pass
