"""Deployments of the unlearning service, kept apart from the flow code.

:func:`build_deployments` returns what ``obliviate serve`` serves for one store:

* ``unlearn/unlearn-<suffix>``: the flow for ``obliviate.deletion.requested`` events whose
  resource is this store (:func:`flows.unlearn.store_resource_id`); the event's payload and id
  become parameters. With ``dispatch="warm"`` (the default) ``serve`` receives those events itself
  over Prefect's event stream and runs the flow in its own process, on a warm Ray connection and
  worker pool (:class:`ServiceWatcher`, issue 14), each run created for this deployment; with
  ``dispatch="runner"`` the deployment carries an event trigger (the automation
  ``deletion-requested-<suffix>``, removed when ``serve`` stops) and the Prefect runner starts
  each run in a fresh subprocess;
* ``reconcile/reconcile-<suffix>``: cron; finishes every ledger entry not done (lost events, crashes);
* ``extraction-audit/audit-<suffix>``: cron; extraction audit of every run's current model (the
  run joins ``serve``'s Ray runtime, which ``serve`` exports as ``RAY_ADDRESS``); its parameters
  are the store and ``target_output`` (``serve --target-output``: what the audit's queries ask
  for, ``labels`` by default or ``probabilities``).

``<suffix>`` is the first 10 hex digits of the SHA-256 of the store's URL
(:attr:`ServiceOptions.suffix`, e.g. ``unlearn-f9ec09e3fd``): ``serve`` prints the full names when
it starts, and ``prefect deployment ls`` lists them.

:func:`serve_deployments` registers them, announces the Prefect API URL in the store (so
``obliviate forget`` finds where to send events), and runs them until interrupted. While it
runs, a watcher thread renews its heartbeat (``service/heartbeat.json``: an announcement not renewed
for :data:`flows.unlearn.ENDPOINT_STALE_S` is stale, so ``forget`` never reports success to a
dead ``serve``) and runs the ``reconcile`` flow in-process for due requests nobody works on: a
claim whose holder died (its lease lapsed), a retry past its back-off, a request whose event was
lost.
Each tick the heartbeat also checks ``serve``'s claim on the store and its announcement, written once at
the start: where the store lost them (an S3 server restarted empty, a bucket made again) it writes them
back, and where another ``serve`` holds the store now it stops, saying so (one serve per store).
On exit the announcement is withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import queue
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from flows.audit import audit_flow
from flows.batching import FLUSH_PREFIX, batch_holds_every_open_request, open_batch
from flows.reconcile import reconcile_flow
from flows.runtime import ray_gcs_answers, ui_url_of
from flows.settle import RAY_DISCONNECTING, STOPPING, hand_back_open_claims, held_pass
from flows.train import shutdown_pools
from flows.unlearn import ENDPOINT_KEY, EVENT_NAME, HEARTBEAT_KEY, store_resource_id, unlearn_flow
from flows.watchdog import withdraw_endpoint
from obliviate.defaults import DEFAULT_MIN_POINTS, DEFAULT_STOP_RULE
from obliviate.errors import ConfigError
from obliviate.extraction.target import OutputMode, output_mode
from obliviate.unlearning.deepobliviate import DEFAULT_EPSILON
from obliviate.unlearning.service import RequestError
from storage.errors import CorruptObject, PointerConflict, StorageError
from storage.lease import DEFAULT_LEASE_S
from storage.ledger import CLAIMED, PENDING, DeletionLedger
from storage.objects import ObjectStore
from storage.registry import RunRegistry

#: How many of its latest passes serve keeps in memory (``ServiceWatcher.passes``); older ones are only counted.
PASSES_KEPT = 50
POOL_KEY = "service/pool.json"  # serve's warm worker pool: when it was warmed, each worker's runs


@dataclass(frozen=True)
class ServiceOptions:
    """What ``obliviate serve`` runs.

    Attributes:
        store: the store of runs and ledger.
        policy: unlearning policy (``exact`` or ``deepobliviate``).
        epsilon: DeepObliviate's stop threshold ε (``deepobliviate`` only).
        stop_rule: DeepObliviate's stop rule, ``residual_ratio``, ``ratio`` or ``slope`` (``deepobliviate`` only).
        min_points: DeepObliviate's m, the fewest Δ points before the fit (``deepobliviate`` only).
        verify: compare each unlearned model with a naive retrain (slow; for audits).
        workers: Ray workers per fan-out (default: cluster CPUs).
        reconcile_cron: schedule of the reconciliation.
        audit_cron: schedule of the extraction audit (``None``: no audit deployment).
        audit_target_output: what the scheduled audit's queries ask each run's model for (the audit
            deployment's ``target_output``, as ``steal --target-output``): ``labels`` (SPEC section 3's
            label-only default) or ``probabilities`` (for a service whose API returns class probabilities).
        lease_s: a claim whose lease is not renewed for this long is taken over.
        max_attempts: attempts per request before it becomes ``failed``.
        watch_s: how often ``serve`` renews its announcement and looks for due requests nobody
            works on (a crashed holder's lapsed claim, a retry past its back-off, a lost event).
        dispatch: ``warm`` (default): ``serve`` subscribes to the store's deletion events and runs
            the ``unlearn`` flow itself, on its warm Ray connection and worker pool
            (:mod:`flows.listener`); ``runner``: the deployment's event trigger starts each
            ``unlearn`` run through the Prefect runner in a fresh subprocess (as a separate
            Prefect worker would).
    """

    store: str
    policy: str = "exact"
    epsilon: float = DEFAULT_EPSILON
    stop_rule: str = DEFAULT_STOP_RULE
    min_points: int = DEFAULT_MIN_POINTS
    verify: bool = False
    workers: int | None = None
    reconcile_cron: str = "*/5 * * * *"
    audit_cron: str | None = "0 3 * * *"
    audit_target_output: str = OutputMode.LABELS.value
    lease_s: float = DEFAULT_LEASE_S
    max_attempts: int = 3
    watch_s: float = 5.0
    dispatch: str = "warm"

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(
                f"--workers is the Ray workers of one fan-out and must be >= 1, or unset for the cluster's CPUs; "
                f"got {self.workers}."
            )
        for option, cron in (("--reconcile-cron", self.reconcile_cron), ("--audit-cron", self.audit_cron)):
            if cron is not None:
                _check_cron(option, cron)
        output_mode(self.audit_target_output, option="--target-output")  # a bad one would fail every audit run

    @property
    def suffix(self) -> str:
        return hashlib.sha256(ObjectStore(self.store).url.encode()).hexdigest()[:10]


def _check_cron(option: str, cron: str) -> None:
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        raise ConfigError(
            f"{option} must be a five-field cron expression like '*/5 * * * *' (minute hour day month weekday); "
            f"got {cron!r}."
        ) from err


def flow_parameters(options: ServiceOptions) -> dict[str, Any]:
    """The parameters of serve's ``unlearn`` and ``reconcile`` runs, however they are dispatched."""
    return {
        "store": ObjectStore(options.store).url,
        "policy": options.policy,
        "epsilon": options.epsilon,
        "stop_rule": options.stop_rule,
        "min_points": options.min_points,
        "verify": options.verify,
        "workers": options.workers,
        "lease_s": options.lease_s,
        "max_attempts": options.max_attempts,
    }


def build_deployments(options: ServiceOptions) -> list[Any]:
    """The runner deployments for one store (see the module docstring)."""
    from prefect.events import DeploymentEventTrigger

    store = ObjectStore(options.store).url
    common = flow_parameters(options)
    trigger = DeploymentEventTrigger(
        name=f"deletion-requested-{options.suffix}",
        expect={EVENT_NAME},
        match={"prefect.resource.id": store_resource_id(store)},
        parameters={**common, "payload": "{{ event.payload }}", "event_id": "{{ event.id|string }}"},
    )
    # dispatch "warm": serve runs the flow on each event itself; the deployment stays for runs by hand.
    triggers = [trigger] if options.dispatch == "runner" else []
    deployments = [
        unlearn_flow.to_deployment(name=f"unlearn-{options.suffix}", parameters=common, triggers=triggers),
        reconcile_flow.to_deployment(
            name=f"reconcile-{options.suffix}", parameters=common, cron=options.reconcile_cron
        ),
    ]
    if options.audit_cron:
        deployments.append(
            audit_flow.to_deployment(
                name=f"audit-{options.suffix}",
                parameters={"store": store, "target_output": options.audit_target_output},
                cron=options.audit_cron,
            )
        )
    return deployments


def serve_deployments(options: ServiceOptions, *, api_url: str) -> str | None:
    """Register the deployments, announce the API URL in the store, and serve until interrupted.

    With ``options.dispatch == "warm"`` the watcher also warms the store's worker pool
    (:func:`flows.train.warm_pool`) and listens for deletion events (:mod:`flows.listener`).

    Returns:
        ``None`` once stopped by a signal; why serve stopped on its own when another serve took its store
        (:attr:`ServiceWatcher.store_lost`).
    """
    from prefect.runner import Runner
    from prefect.settings import PREFECT_RUNNER_POLL_FREQUENCY, temporary_settings

    poll = int(os.environ.get("PREFECT_RUNNER_POLL_FREQUENCY", "2"))
    if options.dispatch == "warm":
        # The runner only starts cron runs and runs by hand then: no need to ask the API every 2 s
        # (each poll costs the server and this process CPU while an unlearning runs).
        poll = max(poll, 10)
    store = ObjectStore(options.store)
    with temporary_settings(updates={PREFECT_RUNNER_POLL_FREQUENCY: poll}):
        runner = Runner(name=f"obliviate-{options.suffix}", pause_on_shutdown=False)
        # build_deployments puts unlearn first: ids[0] is the deployment events run (and its trigger's owner)
        deployments = build_deployments(options)
        ids = [str(runner.add_deployment(deployment)) for deployment in deployments]
        announcement = {
            "api_url": api_url,
            "dispatch": options.dispatch,
            "deployments": ids,
            "pid": os.getpid(),
            "started_at": time.time(),
            "ray_address": os.environ.get("RAY_ADDRESS"),
        }
        store.put_json(HEARTBEAT_KEY, {"pid": os.getpid(), "heartbeat_at": time.time()})
        store.put_json(ENDPOINT_KEY, announcement)
        watcher = ServiceWatcher(options, announcement=announcement, api_url=api_url)
        watcher.start()
        names = ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
        print(f"obliviate serve: {len(ids)} deployments of {store.url} served through {api_url}: {names}", flush=True)
        stop_signals = StopSignals(watcher.stopping_line)
        try:
            asyncio.run(_start_stopping_once(runner, stop_signals, watcher))
        except KeyboardInterrupt:  # Ctrl-C is how serve is stopped (as `obliviate ui`): exit 0, said below
            pass
        except asyncio.CancelledError:  # the watcher found another serve holding the store: said below
            if watcher.store_lost is None:
                raise
        finally:
            stop_signals.stopping()
            watcher.stop()
            watcher.stop_step = ("its announcement is withdrawn", None)
            withdraw_endpoint(store, pid=os.getpid())
            if options.dispatch == "runner":
                remove_event_trigger(ids[0], api_url=api_url)
        if watcher.store_lost is not None:  # the store is served, by the other serve: "no longer served" is false
            print(
                f"obliviate serve: stopped; {store.url} is served by another `obliviate serve` now, not by this one. "
                "Requests not yet settled stay in its ledger for that serve (see `obliviate forget --status ID`).",
                file=sys.stderr,
                flush=True,
            )
            stop_signals.stopped()
            return watcher.store_lost
        print(
            f"obliviate serve: stopped; {store.url} is no longer served. Requests not yet settled stay in its ledger "
            "for the next `obliviate serve` (see `obliviate forget --status ID`).",
            file=sys.stderr,
            flush=True,
        )
        stop_signals.stopped()
    return None


async def _start_stopping_once(runner: Any, stop_signals: StopSignals, watcher: ServiceWatcher) -> None:
    """``runner.start()``, its stop signals taken by ``stop_signals`` once they are in place.

    ``asyncio.run`` has put in its Ctrl-C handler by now, and ``runner.start()`` puts in Prefect's SIGTERM handler
    before it first waits: the callback runs then. ``watcher`` stops the runner as Ctrl-C does (the task cancelled)
    once another serve holds the store.
    """
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        watcher.on_store_lost = lambda: loop.call_soon_threadsafe(task.cancel)
        if watcher.store_lost is not None:  # lost before the callback was in place
            task.cancel()

    def began() -> bool:  # a signal in the moment before: Prefect's handler stops the runner, asyncio's cancels
        return bool(getattr(runner, "stopping", False)) or (task is not None and task.cancelling() > 0)

    asyncio.get_running_loop().call_soon(stop_signals.take, began)
    await runner.start()


class StopSignals:
    """serve's first Ctrl-C or SIGTERM stops it as before; a later one says the stop is under way and changes nothing.

    A second signal during the stop (a second Ctrl-C, GNU ``timeout``'s second SIGTERM, a terminal's Ctrl-C on the
    process group) cut the stop short: Ctrl-C raised KeyboardInterrupt out of the wait for the pass under way
    ("interrupted", exit 130, the requests not handed back, the flow run never Completed), and Prefect's SIGTERM
    handler exited on the spot. Here the handlers found (asyncio's Ctrl-C handler, which cancels the runner; Prefect's
    SIGTERM handler, which stops it) get the first signal as before; every later one, and any during a stop that came
    another way, is answered by one line from :meth:`ServiceWatcher.stopping_line`, written straight to the file
    descriptor (a handler that prints to a stream the main thread is writing to can raise "reentrant call").
    Once serve has stopped both signals are ignored (:func:`flows.model_server.ignore_stop_signals`) for the rest of
    the exit. A signal the caller ignores stays ignored; outside the main thread nothing changes.
    """

    def __init__(self, line: Callable[[], str]) -> None:
        self.line = line
        self.found: dict[int, Any] = {}
        self.stop_began = False

    def take(self, began: Callable[[], bool] = lambda: False) -> None:
        """Answer SIGINT and SIGTERM from here on (main thread only); ``began``: a stop came before this."""
        import signal

        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if handler is not self and handler not in (signal.SIG_IGN, None):
                self.found[signum] = handler
                signal.signal(signum, self)
        if began():
            self.stop_began = True

    def stopping(self) -> None:
        """The stop is under way, whether a signal began it or not: every signal from here on is a later one."""
        self.take()
        self.stop_began = True

    def stopped(self) -> None:
        """serve has stopped: a signal has nothing left to stop, and must not turn the exit into an interruption."""
        from flows.model_server import ignore_stop_signals

        if self.found:
            ignore_stop_signals()

    def __call__(self, signum: int, frame: Any) -> None:
        import signal

        if not self.stop_began:
            self.stop_began = True
            first = self.found.get(signum)
            if callable(first):
                first(signum, frame)
            else:  # the default action (SIGTERM's: the end of the process), as before
                signal.signal(signum, first if first is not None else signal.SIG_DFL)
                signal.raise_signal(signum)
            return
        # stderr closed, or its reader gone: nothing to tell
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.write(sys.stderr.fileno(), (self.line() + "\n").encode())


#: What serve's stop does until the pass under way has ended (ServiceWatcher.stopping_line).
HANDING_BACK = "any pass under way is stopped and its open requests handed back"
#: How long serve's stop waits, once it has begun ``ray.shutdown()`` on a daemon thread, for the pass under way to end
#: (Ray's shutdown ends the pass's wait on Ray) and for the shutdown itself; then it goes on without either.
RAY_SHUTDOWN_WAIT_S = 20.0
#: How much longer a stop whose pass Ray's shutdown still holds waits for that shutdown, once the pass's requests are
#: handed back (its exit would wait for it all the same); with 10 s more for the pass to end, a stop takes at most
#: about 5 + 20 + 50 s.
RAY_SHUTDOWN_LATE_WAIT_S = 40.0


def _disconnect_ray() -> threading.Thread | None:
    """``ray.shutdown()`` in this process, begun on a daemon thread (its runtime may be gone: it may never return)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    RAY_DISCONNECTING.set()  # the pass's wait on Ray ends now, not (perhaps never) after the shutdown
    worker = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    worker.start()
    return worker


def _where_it_waits(thread: threading.Thread) -> str:
    """`` (it waits in F, FILE:LINE)``: the innermost Python frame of a live ``thread`` ('' when it has none)."""
    frame = sys._current_frames().get(thread.ident or -1)
    return f" (it waits in {frame.f_code.co_name}, {frame.f_code.co_filename}:{frame.f_lineno})" if frame else ""


def _say_ray_shutdown_stuck(worker: threading.Thread, *, waited_s: float, pass_stuck: bool) -> None:
    """Say once that Ray's shutdown has not returned, and where it waits (a stop otherwise silent that long)."""
    where = _where_it_waits(worker)
    then = "serve hands the requests of the pass under way back itself" if pass_stuck else "serve goes on without it"
    print(
        f"obliviate serve: Ray's shutdown has not returned after {waited_s:.0f} s{where}; {then}",
        flush=True,
    )


def remove_event_trigger(deployment_id: str, *, api_url: str) -> None:
    """Delete the automation ``deletion-requested-<suffix>`` that ``--dispatch runner`` gave a deployment.

    Prefect's own way, as registering a deployment without triggers does (a later warm ``serve``):
    the automations the deployment owns are deleted. Left enabled, it kept scheduling ``unlearn``
    runs for every deletion event after ``serve`` stopped, runs no runner would start.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
    except Exception as err:  # noqa: BLE001 -- stopping goes on; the next serve of the store replaces it
        print(
            f"obliviate serve: could not remove the event trigger of deployment {deployment_id} ({err}); the next "
            "`obliviate serve` of this store replaces it.",
            file=sys.stderr,
            flush=True,
        )


class RepeatedFailures:
    """Says a failure that repeats every tick once, then a summary at growing intervals, then its recovery.

    ``serve`` whose store was gone (a deleted bucket, an S3 endpoint restarted empty) printed the
    same ``reconcile pass failed: ...`` line every 5 s for as long as it lasted. Now the first
    failure of ``what`` is said in full; the same failure again is counted and said as ``still
    failing since T (N passes): reason`` after ``first_repeat_s``, then after twice that, up to
    ``max_repeat_s`` between lines; another reason is said in full at once; the first success
    after failures says ``recovered``. Each ``what`` (``reconcile pass``, ``warming the worker
    pool``) keeps its own count.
    """

    def __init__(
        self,
        *,
        first_repeat_s: float = 60.0,
        max_repeat_s: float = 600.0,
        clock: Callable[[], float] = time.time,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.first_repeat_s, self.max_repeat_s, self.clock = first_repeat_s, max_repeat_s, clock
        self.say = say or (lambda line: print(line, flush=True))
        # what -> since, passes, reason, when last said, wait before the next summary
        self._open: dict[str, dict[str, Any]] = {}

    def failed(self, what: str, reason: str) -> None:
        now = self.clock()
        streak = self._open.get(what)
        if streak is None:
            self._open[what] = {"since": now, "passes": 1, "reason": reason, "said": now, "wait": self.first_repeat_s}
            self.say(f"obliviate serve: {what} failed: {reason}")
            return
        streak["passes"] += 1
        if reason != streak["reason"]:
            streak.update(reason=reason, said=now, wait=self.first_repeat_s)
            self.say(f"obliviate serve: {what} failed: {reason}")
        elif now - streak["said"] >= streak["wait"]:
            streak.update(said=now, wait=min(streak["wait"] * 2, self.max_repeat_s))
            self.say(
                f"obliviate serve: {what} still failing since {_clock_time(streak['since'])} "
                f"({streak['passes']} passes): {reason}"
            )

    def succeeded(self, what: str) -> None:
        streak = self._open.pop(what, None)
        if streak is not None:
            self.say(
                f"obliviate serve: {what} recovered after {streak['passes']} failed passes since "
                f"{_clock_time(streak['since'])}"
            )


def _clock_time(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


class ServiceWatcher:
    """Renews ``serve``'s announcement, dispatches deletion events and finishes orphaned requests.

    Daemon threads of ``serve``:

    * heartbeat: rewrites ``service/heartbeat.json`` every ``options.watch_s``;
    * dispatcher: one pass at a time, in ``serve`` itself (never a pile of queued runs). With
      ``dispatch="warm"`` it runs the ``unlearn`` flow for each deletion event the moment the
      listener (:class:`flows.listener.DeletionListener`) hands it over, and keeps the store's
      worker pool warm (every registered run's data loaded, torch warmed up: new runs are
      picked up within a tick). On every tick, in both modes, it lists the ledger's due
      requests (:meth:`storage.ledger.DeletionLedger.due_entries`) and, when one is a claim
      whose lease lapsed (its holder died) or a request still pending after a grace period
      (its event was lost, its retry back-off ended; no grace while the listener is not
      connected), runs the ``reconcile`` flow right here.

    Leases, retries and isolation are those of :mod:`flows.settle`: the flows run here are the
    same flows the deployments run.
    """

    def __init__(self, options: ServiceOptions, *, announcement: dict[str, Any], api_url: str) -> None:
        self.options, self.announcement, self.api_url = options, announcement, api_url
        self.store = ObjectStore(options.store)
        self.grace_s = max(30.0, options.watch_s * 3)  # the event path goes first (3-8 s, more under load)
        self._stop = threading.Event()
        self.wakeups: queue.Queue[Any] = queue.Queue()
        self.listener: Any = None
        self.warm_runs: frozenset[str] | None = None
        self.warm_results: list[dict[str, Any]] = []
        self._threads = [
            threading.Thread(target=self._heartbeat, name="serve-heartbeat", daemon=True),
            threading.Thread(target=self._dispatch, name="serve-dispatcher", daemon=True),
        ]
        # The latest passes only: serve runs for weeks, and a list of every pass grew with each one.
        self.passes: deque[dict[str, Any]] = deque(maxlen=PASSES_KEPT)
        self.pass_count = 0  # every pass since serve started
        self.pass_outcomes: Counter[str] = Counter()  # every pass's outcome ("reconcile" for a watcher's pass)
        self.failures = RepeatedFailures()
        self.unreadable_said: set[str] = set()  # open requests that cannot be read, said once (needs_pass)
        # While stopping: what the stop is doing, and when (time.monotonic()) it is done at the latest, if bounded.
        self.stop_step: tuple[str, float | None] | None = None
        self.host = socket.gethostname()  # serve's claim names its pid and host (flows.unlearn.claim_serving)
        # Why serve stops on its own: another serve holds its store now (set by the heartbeat, which then calls
        # on_store_lost: serve_deployments stops the runner there, as Ctrl-C does).
        self.store_lost: str | None = None
        self.on_store_lost: Callable[[], Any] | None = None
        self._renewal_error_said = False

    @property
    def warm(self) -> bool:
        return self.options.dispatch == "warm"

    def start(self) -> None:
        if self.warm:
            from flows.listener import DeletionListener

            self.listener = DeletionListener(self.store.url, api_url=self.api_url, wakeups=self.wakeups)
            if not self.listener.start():
                print(
                    "obliviate serve: the Prefect event stream is not connected yet; pending requests are "
                    f"picked up every {self.options.watch_s:.0f} s until it is",
                    flush=True,
                )
        for thread in self._threads:
            thread.start()

    def stop(self, *, grace_s: float = 60.0) -> None:
        """Stop taking work, end the pass under way, and return once its claims are handed back.

        The pass under way is cut short by stopping the pool's workers (their stored checkpoints
        are resumed by the next pass); its claims go back to ``pending`` without counting an
        attempt (:data:`flows.settle.STOPPING`). It took a new claim while stopping before, and
        counted the stop as a failed attempt.
        """
        began = time.monotonic()
        # listener.stop and heartbeat.join: 10 s each; shutdown_pools: 1 s for the GCS, 10 s for the kill
        pass_ends_by = began + 31.0 + grace_s + 2.0 + RAY_SHUTDOWN_WAIT_S
        self.stop_step = (HANDING_BACK, pass_ends_by)
        STOPPING.set()
        self._stop.set()
        self.wakeups.put(None)
        if self.listener is not None:
            self.listener.stop()
        # the pool's workers, in both dispatch modes: runner flow runs start them in this Ray runtime too.
        # Only this store's: other stores' serves on a shared Ray cluster keep theirs warm.
        self._guarded("stopping the worker pool", lambda: shutdown_pools(self.store.url))
        heartbeat, dispatcher = self._threads
        heartbeat.join(timeout=10)
        # The pass under way ends once its workers are gone. When the Ray runtime itself is gone (a
        # SIGTERM to serve's process group stops its local Ray too), a Ray call in that pass waits
        # 60 s for the GCS: then serve does not wait for it; it hands the pass's claims back itself
        # (they stayed claimed until their leases lapsed).
        began = time.monotonic()
        # a join and a GCS check, 1 s each, may run past grace_s: 2 s
        self.stop_step = (HANDING_BACK, began + grace_s + 2.0 + RAY_SHUTDOWN_WAIT_S)
        while dispatcher.is_alive() and time.monotonic() - began < grace_s:
            dispatcher.join(timeout=1.0)
            if time.monotonic() - began > 5.0 and not ray_gcs_answers():
                break
        worker = None
        if dispatcher.is_alive():
            # Ending this process's Ray connection ends the pass's wait (as a SystemExit, which a
            # stopping pass takes as its workers' stop): the pass hands its claims back itself and
            # its flow run ends as on a SIGTERM to serve alone, not ``Crashed`` at exit. With the GCS
            # gone Ray's shutdown first spends up to its task-event flush timeout (5 s by default,
            # 1 s under serve: flows.cli.serve) on the GCS; the pass's wait ends after that, and the
            # shutdown returns about 1.5 s later (its processes reaped). One deadline bounds both.
            deadline = time.monotonic() + RAY_SHUTDOWN_WAIT_S
            self.stop_step = (HANDING_BACK, deadline)
            shutting: list[threading.Thread | None] = []
            self._guarded(
                "disconnecting from the stopped Ray runtime", lambda: shutting.append(_disconnect_ray()), repeats=False
            )
            dispatcher.join(timeout=max(0.0, deadline - time.monotonic()))
            worker = shutting[0] if shutting else None
            if worker is not None:
                worker.join(timeout=max(0.0, deadline - time.monotonic()))
                if worker.is_alive():
                    _say_ray_shutdown_stuck(worker, waited_s=RAY_SHUTDOWN_WAIT_S, pass_stuck=dispatcher.is_alive())
        if dispatcher.is_alive():  # still stuck: hand its claims back from here
            self.stop_step = ("serve hands the requests of the pass under way back itself", None)
            reason = "serve stopped during the work (its Ray runtime stopped with it)"
            for request_id in hand_back_open_claims(reason):
                print(
                    f"obliviate serve: request {request_id} handed back (serve is stopping); its attempt is not counted",
                    flush=True,
                )
            if worker is not None and worker.is_alive():
                # Ray's clean-up at exit waits for this shutdown anyway (it takes the lock the stuck one holds), and
                # the pass it let go then ran with the interpreter half torn down: "--- Logging error ---" tracebacks,
                # its flow run's final state lost. Waiting here instead, the pass still ends its flow run.
                late_by = time.monotonic() + RAY_SHUTDOWN_LATE_WAIT_S + 10.0
                self.stop_step = (
                    "its requests are handed back; serve waits for Ray's shutdown to end the pass",
                    late_by,
                )
                worker.join(timeout=RAY_SHUTDOWN_LATE_WAIT_S)
                # One bound for both: a shutdown that returned early leaves the pass the rest of it to end its flow
                # run (a loaded CI host once took more than the 10 s it had after the shutdown, and its final state
                # was lost), never less than 10 s.
                dispatcher.join(timeout=max(10.0, late_by - time.monotonic()))
                if dispatcher.is_alive():
                    shutdown = "had not returned either" if worker.is_alive() else "had returned"
                    print(
                        "obliviate serve: the pass under way had not ended when serve's stop gave up waiting for it"
                        f"{_where_it_waits(dispatcher)}; Ray's shutdown {shutdown}. Its requests are handed back, but "
                        "its flow run may show no final state.",
                        flush=True,
                    )

    def stopping_line(self) -> str:
        """What serve says to a stop signal while it is stopping already: the step under way, and its bound."""
        said = "obliviate serve: already stopping"
        if self.stop_step is not None:
            step, ends_by = self.stop_step
            said += f"; {step}"
            if ends_by is not None:
                said += f" within {max(0, math.ceil(ends_by - time.monotonic()))} s"
        return f"{said}. Another Ctrl-C or SIGTERM does not cut the stop short."

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.options.watch_s):
            # The claim and announcement first: a heartbeat written over another serve's would make its look stale.
            if self.renew_serving() == "lost":
                return
            with contextlib.suppress(Exception):  # an outage: try again next tick; staleness takes 30 s
                self.store.put_json(HEARTBEAT_KEY, {"pid": self.announcement["pid"], "heartbeat_at": time.time()})

    def renew_serving(self) -> str:
        """Write serve's claim and announcement back where the store lost them; stop serve if another serve holds it.

        Both were written once, at the start: a store that lost its objects while serve ran (an S3 server restarted
        empty, a bucket made again) left a serve that still worked but that ``forget`` said did not run, and a second
        serve was let claim the store (:func:`flows.unlearn.renew_serving`). Returns that function's outcome, or
        ``"unknown"`` when the store did not answer (the next tick tries again).
        """
        from flows.unlearn import renew_serving

        try:
            outcome, line = renew_serving(self.store, announcement=self.announcement, host=self.host)
        except (StorageError, CorruptObject, PointerConflict):  # an outage, a claim moving: the next tick decides
            return "unknown"
        except Exception as err:  # noqa: BLE001 -- the heartbeat must outlive it; said once
            if not self._renewal_error_said:
                self._renewal_error_said = True
                said = f"obliviate serve: renewing its claim on the store failed: {type(err).__name__}: {err}"
                print(said, flush=True)
            return "unknown"
        if outcome == "restored":
            print(f"obliviate serve: {line}", flush=True)
        elif outcome == "lost":
            self.store_lost = line  # said in full once serve has stopped (flows.cli.serve)
            print("obliviate serve: another `obliviate serve` holds the store now; this one stops.", flush=True)
            if self.on_store_lost is not None:
                self.on_store_lost()
        return outcome

    def _flow_options(self) -> dict[str, Any]:
        return flow_parameters(self.options)

    def _dispatch(self) -> None:
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

        # A new thread sees Prefect's settings as they were when prefect was imported, not the
        # server `serve` pointed its main thread at: without this the flows run here started a
        # temporary server of their own, and their runs never reached serve's dashboard.
        with temporary_settings(updates={PREFECT_API_URL: self.api_url, PREFECT_UI_URL: ui_url_of(self.api_url)}):
            self._dispatch_until_stopped()

    def _dispatch_until_stopped(self) -> None:
        if self.warm:
            self._guarded("warming the worker pool", self.keep_pool_warm)
        self._guarded("reconcile pass", self.reconcile_if_needed)
        while not self._stop.is_set():
            try:
                event = self.wakeups.get(timeout=self.options.watch_s)
            except queue.Empty:
                event = None
            if self._stop.is_set():
                return
            if event is not None:
                self._guarded(f"event {event.event_id}", lambda e=event: self.handle_event(e), repeats=False)
            else:
                self._guarded("reconcile pass", self.reconcile_if_needed)
                if self.warm:
                    self._guarded("warming the worker pool", self.keep_pool_warm)

    def _guarded(self, what: str, call: Any, *, repeats: bool = True) -> None:
        """``call``, its failure said (once per streak where it ``repeats`` every tick: :class:`RepeatedFailures`)."""
        try:
            call()
        except Exception as err:  # noqa: BLE001 -- the dispatcher must outlive any one pass; next tick retries
            if repeats:
                self.failures.failed(what, f"{type(err).__name__}: {err}")
            else:
                print(f"obliviate serve: {what} failed: {type(err).__name__}: {err}", flush=True)
        else:
            if repeats:
                self.failures.succeeded(what)

    def handle_event(self, event: Any) -> None:
        """Run the ``unlearn`` flow for one deletion event, here (a Prefect flow run of this process).

        The run belongs to serve's ``unlearn-<suffix>`` deployment (it is listed on the deployment's
        page, as a runner's run is) when the deployment is known; else it is a run of the flow alone.
        A refused event ends its run ``Failed`` with the reason (:func:`flows.unlearn.unlearn_flow`);
        serve logs that reason and goes on.
        """
        parameters = {"payload": event.payload, "event_id": event.event_id, **self._flow_options()}
        try:
            result = self._run_unlearn(parameters)
        except RequestError as err:
            print(f"obliviate serve: {err}", flush=True)
            self._record_pass({"at": time.time(), "event_id": event.event_id, "outcome": "refused", "reason": str(err)})
            return
        self._record_pass(
            {
                "at": time.time(),
                "event_id": event.event_id,
                "outcome": result.get("outcome"),
                "settled": result.get("settled", {}),
            }
        )

    def _run_unlearn(self, parameters: dict[str, Any]) -> dict[str, Any]:
        """The ``unlearn`` flow, run in this process as a flow run of serve's ``unlearn`` deployment."""
        from prefect.client.orchestration import get_client
        from prefect.flow_engine import run_flow
        from prefect.states import Pending

        deployments = self.announcement.get("deployments") or []
        flow_run = None
        if deployments:
            try:
                with get_client(sync_client=True) as client:
                    # Pending, not Scheduled: the runner starts Scheduled runs of its deployments itself.
                    flow_run = client.create_flow_run_from_deployment(
                        UUID(deployments[0]), parameters=parameters, state=Pending()
                    )
            except Exception as err:  # noqa: BLE001 -- the event is handled all the same, as a run of the flow
                print(f"obliviate serve: running the event's pass outside its deployment: {err}", flush=True)
        if flow_run is None:
            return dict(unlearn_flow(**parameters))
        return dict(run_flow(unlearn_flow, flow_run=flow_run, parameters=parameters))  # type: ignore[arg-type]

    def reconcile_if_needed(self) -> None:
        if self.needs_pass():
            result = reconcile_flow(**self._flow_options())
            self._record_pass({"at": time.time(), "settled": result.get("settled", {})})

    def _record_pass(self, record: dict[str, Any]) -> None:
        """Keep ``record`` among the latest passes and count it in the totals."""
        self.passes.append(record)
        self.pass_count += 1
        self.pass_outcomes[str(record.get("outcome", "reconcile"))] += 1

    def keep_pool_warm(self) -> None:
        """Warm the store's worker pool when the registered runs changed (cheap: one listing)."""
        from flows.train import warm_pool

        runs = frozenset(RunRegistry(self.store).run_ids())
        if runs == self.warm_runs:
            return
        began = time.time()
        self.warm_results = warm_pool(self.store.url, size=self.options.workers)
        self.warm_runs = runs
        self.store.put_json(
            POOL_KEY,
            {
                "pid": os.getpid(),
                "warmed_at": time.time(),
                "seconds": time.time() - began,
                "workers": self.warm_results,
            },
        )

    def _recordable(self, ledger: DeletionLedger, request_id: str, error: str) -> bool:
        """Whether a pass would record an open request that cannot be read as ``failed`` (its status is readable).

        One whose status is damaged too cannot be recorded: said once here, and a pass would only say it again.
        """
        try:
            return ledger.current_status(request_id) in (PENDING, CLAIMED)
        except (CorruptObject, StorageError) as err:
            if request_id not in self.unreadable_said:
                self.unreadable_said.add(request_id)
                said = str(error).rstrip(".")
                if "current status of deletion request" not in said:  # it named the damaged record alone
                    said += (
                        f"; and its current status cannot be read either ({str(err).rstrip('.')}), so no pass can "
                        "record it: `obliviate store check` says how to mend both"
                    )
                print(f"obliviate serve: request {request_id} cannot be read and is left as it is: {said}", flush=True)
            return False

    def needs_pass(self) -> bool:
        """Whether a due request is orphaned: a lapsed claim, or pending longer than the grace period.

        A request waiting in the open batch is not orphaned until the batch is due (or a flush is
        asked for): a pass would only find it batched again (one reconcile run every tick, all window long).
        Nor is anything while another pass holds the store (:func:`flows.settle.store_pass`: the cron
        ``reconcile``, an event's run): one pass at a time; the next tick after it ends looks again.
        An open request that cannot be read (its record damaged) needs a pass too: the pass records it
        ``failed`` with how to mend it, once.
        """
        if held_pass(self.store) is not None:
            return False
        if batch_holds_every_open_request(self.store):  # a batch waits: no request read, however many
            return False
        now = time.time()
        listening = self.listener is None or self.listener.connected.is_set()
        grace_s = self.grace_s if listening else 0.0
        ledger, unreadable = DeletionLedger(self.store), {}
        due = ledger.due_entries(lease_s=self.options.lease_s, now=now, unreadable=unreadable)
        if any(entry.status == CLAIMED for entry in due) or any(
            self._recordable(ledger, r, e) for r, e in unreadable.items()
        ):
            return True
        overdue = {entry.request_id for entry in due if now - entry.updated_at >= grace_s}
        if not overdue:  # the usual tick: the open batch is read only when it could matter
            return False
        batch = open_batch(self.store)
        waiting = (
            set(batch.get("requests", []))
            if batch is not None
            and float(batch.get("batched_until") or 0.0) > now
            and not self.store.list(FLUSH_PREFIX)
            else set()
        )
        return bool(overdue - waiting)
