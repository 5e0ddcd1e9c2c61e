"""Deployments of the unlearning service, kept apart from the flow code.

:func:`build_deployments` returns what ``obliviate serve`` serves for one store:

* ``unlearn-<store>``: triggered by ``obliviate.deletion.requested`` events whose resource is this
  store (:func:`flows.unlearn.store_resource_id`); the event's payload and id become parameters;
* ``reconcile-<store>``: cron; finishes every ledger entry not done (lost events, crashes);
* ``audit-<store>``: cron; extraction audit of every run's current model.

:func:`serve_deployments` registers them, announces the Prefect API URL in the store (so
``obliviate forget`` finds where to send events), and runs them until interrupted. While it
runs, a watcher thread renews the announcement (``heartbeat_at``: an announcement not renewed
for :data:`flows.unlearn.ENDPOINT_STALE_S` is stale, so ``forget`` never reports success to a
dead ``serve``) and wakes the ``unlearn`` deployment for due requests nobody works on: a claim
whose holder died (its lease lapsed), a retry past its back-off, a request whose event was lost.
On exit the announcement is withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from flows.audit import audit_flow
from flows.reconcile import reconcile_flow
from flows.unlearn import ENDPOINT_KEY, EVENT_NAME, emit_deletion_event, store_resource_id, unlearn_flow
from storage.lease import DEFAULT_LEASE_S
from storage.ledger import CLAIMED, DeletionLedger
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
        lease_s: a claim whose lease is not renewed for this long is taken over.
        max_attempts: attempts per request before it becomes ``failed``.
        watch_s: how often ``serve`` renews its announcement and looks for due requests nobody
            works on (a crashed holder's lapsed claim, a retry past its back-off, a lost event).
    """

    store: str
    policy: str = "exact"
    verify: bool = False
    workers: int | None = None
    reconcile_cron: str = "*/5 * * * *"
    audit_cron: str | None = "0 3 * * *"
    lease_s: float = DEFAULT_LEASE_S
    max_attempts: int = 3
    watch_s: float = 5.0

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
        "lease_s": options.lease_s,
        "max_attempts": options.max_attempts,
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
    with temporary_settings(updates={PREFECT_RUNNER_POLL_FREQUENCY: poll}):
        runner = Runner(name=f"obliviate-{options.suffix}", pause_on_shutdown=False)
        ids = [str(runner.add_deployment(deployment)) for deployment in build_deployments(options)]
        announcement = {
            "api_url": api_url,
            "deployments": ids,
            "pid": os.getpid(),
            "started_at": time.time(),
            "ray_address": os.environ.get("RAY_ADDRESS"),
        }
        store.put_json(ENDPOINT_KEY, {**announcement, "heartbeat_at": time.time()})
        watcher = ServiceWatcher(options, announcement=announcement, api_url=api_url)
        watcher.start()
        print(f"obliviate serve: {len(ids)} deployments of {store.url} served through {api_url}", flush=True)
        try:
            asyncio.run(runner.start())
        except KeyboardInterrupt:
            pass
        finally:
            watcher.stop()
            withdraw_endpoint(store, pid=os.getpid())


def withdraw_endpoint(store: ObjectStore, *, pid: int) -> bool:
    """Mark this serve's announcement stopped (only if it is still ours); returns whether it was."""
    with contextlib.suppress(Exception):
        body = store.get_json(ENDPOINT_KEY)
        if int(body.get("pid", -1)) == pid and not body.get("stopped_at"):
            store.put_json(ENDPOINT_KEY, {**body, "api_url": None, "stopped_at": time.time()})
            return True
    return False


class ServiceWatcher:
    """Renews ``serve``'s announcement and wakes ``unlearn`` for due requests nobody works on.

    A thin thread: every ``options.watch_s`` it rewrites the announcement with ``heartbeat_at``
    and lists the ledger's due requests (:meth:`storage.ledger.DeletionLedger.due_entries`); for
    one that is still due after a grace period (so the normal event path goes first) it emits a
    deletion event, at most once per request per ``2 * lease_s``.
    """

    def __init__(self, options: ServiceOptions, *, announcement: dict[str, Any], api_url: str) -> None:
        self.options, self.announcement, self.api_url = options, announcement, api_url
        self.store = ObjectStore(options.store)
        self.grace_s = max(10.0, options.watch_s * 2)
        self._woken: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="serve-watcher", daemon=True)
        self.wakeups = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.options.watch_s):
            with contextlib.suppress(Exception):  # an outage: try again next tick; the lease has slack
                self.store.put_json(ENDPOINT_KEY, {**self.announcement, "heartbeat_at": time.time()})
            with contextlib.suppress(Exception):
                self.wake_due()

    def wake_due(self) -> list[str]:
        """Emit a deletion event for each due request nobody works on; returns their ids."""
        now = time.time()
        woken = []
        for entry in DeletionLedger(self.store).due_entries(lease_s=self.options.lease_s, now=now):
            waiting_since = entry.updated_at
            if entry.status != CLAIMED and now - waiting_since < self.grace_s:
                continue
            if now - self._woken.get(entry.request_id, 0.0) < 2 * self.options.lease_s:
                continue
            self._woken[entry.request_id] = now
            emit_deletion_event(
                self.store.url,
                {"request_id": entry.request_id, "store": self.store.url, "woken_by": "serve"},
                api_url=self.api_url,
            )
            self.wakeups += 1
            woken.append(entry.request_id)
        return woken
