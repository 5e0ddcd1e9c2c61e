"""Deletion events delivered straight to ``obliviate serve``: Prefect's event stream, no runner poll.

Through a deployment trigger, a deletion event reaches the ``unlearn`` flow along Prefect's
automation path: the event is stored, the trigger fires, a flow run is scheduled, the runner
polls for it (every ``PREFECT_RUNNER_POLL_FREQUENCY`` seconds) and starts it in a fresh
subprocess that imports torch and Ray and connects again: 3.5-5 s on a quiet 2-core machine
before the request is claimed (issue 14, ``bench/results/service_latency.json``), more than half
of a small unlearning. :class:`DeletionListener` subscribes to the same events over Prefect's
event websocket (``prefect.events.clients.PrefectEventSubscriber``, filtered by event name and
the store's resource id) and hands each one to ``serve``'s dispatcher thread, which runs the
``unlearn`` flow in the serving process itself: a Prefect flow run like any other (in the UI,
with its logs), on the warm Ray connection and worker pool.

The subscriber reconnects on its own after an abnormal disconnect (with a one-minute backfill and
de-duplication by event id); when it gives up, the listener waits and subscribes again. While it
is not connected, :attr:`DeletionListener.connected` is false and ``serve``'s watcher looks for
pending ledger entries on every tick instead (the ledger is written before the event is sent,
so nothing is lost either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flows.unlearn import EVENT_NAME, store_resource_id
from storage.objects import ObjectStore


@dataclass(frozen=True)
class DeletionEvent:
    """One deletion event as the dispatcher gets it."""

    event_id: str
    payload: Any
    occurred_at: float
    received_at: float = field(default_factory=time.time)


class DeletionListener:
    """A daemon thread that puts every deletion event of one store into ``wakeups``.

    Args:
        store: the store whose events are wanted (its resource id, :func:`flows.unlearn.store_resource_id`).
        api_url: the Prefect API whose event stream is read.
        wakeups: where events go (the dispatcher's queue).
        retry_s: wait before subscribing again after the subscriber gave up.
    """

    def __init__(self, store: str, *, api_url: str, wakeups: queue.Queue[Any], retry_s: float = 2.0) -> None:
        self.store_url = ObjectStore(store).url
        self.api_url, self.wakeups, self.retry_s = api_url, wakeups, retry_s
        self.connected = threading.Event()
        self.received = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="serve-event-listener", daemon=True)

    def start(self, *, wait_s: float = 15.0) -> bool:
        """Start listening; returns whether the subscription is live within ``wait_s``."""
        self._thread.start()
        return self.connected.wait(wait_s)

    def stop(self) -> None:
        self._stop.set()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks(loop)])
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                asyncio.run(self._listen())
            except BaseException as err:  # noqa: BLE001 -- the listener must outlive a lost connection
                if self._stop.is_set():
                    return
                self.errors.append(f"{type(err).__name__}: {err}"[:300])
                del self.errors[:-20]
            self.connected.clear()
            self._stop.wait(self.retry_s)

    async def _listen(self) -> None:
        from prefect.events.clients import PrefectEventSubscriber
        from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

        self._loop = asyncio.get_running_loop()
        wanted = EventFilter(
            event=EventNameFilter(name=[EVENT_NAME]),
            resource=EventResourceFilter(id=[store_resource_id(self.store_url)]),
        )
        async with PrefectEventSubscriber(api_url=self.api_url, filter=wanted, reconnection_attempts=5) as events:
            self.connected.set()
            async for event in events:
                if self._stop.is_set():
                    return
                self.received += 1
                self.wakeups.put(
                    DeletionEvent(event_id=str(event.id), payload=event.payload, occurred_at=event.occurred.timestamp())
                )
