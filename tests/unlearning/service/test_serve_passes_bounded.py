"""``serve`` kept a record of every pass it ran in ``ServiceWatcher.passes``: memory grew with each pass
(about 0.6 MB a pass on a long run). It keeps the latest ``PASSES_KEPT`` now, and counts them all.

Real passes against a local store and the session's Prefect server (no Ray: a request whose record is damaged
needs a pass at once, and the pass records it ``failed`` without unlearning anything).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import storage.objects
from flows import deployments
from flows.deployments import ServiceOptions, ServiceWatcher
from flows.listener import DeletionEvent
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.ledger import FAILED

KEPT = 3  # PASSES_KEPT (50) real passes and more would take minutes; the bound is the same code


def _damaged_request(store_url: str, request_id: str) -> None:
    submit_deletion(store_url, [5], dataset="digits", request_id=request_id, emit=False)
    record = Path(ObjectStore(store_url).url.removeprefix("file://")) / "ledger" / "requests" / f"{request_id}.json"
    record.write_bytes(b"\0garbage{{{")  # damaged: the watcher needs a pass at once, the pass records it failed


@pytest.mark.slow
def test_serve_keeps_the_latest_passes_and_counts_every_one(store_url, prefect_api_url, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(deployments, "PASSES_KEPT", KEPT)
    # A damaged record is read again 5 times over 1.5 s before it is called damaged (a read racing a rewrite):
    # each pass reads it twice. Once is enough here; the damage stays.
    monkeypatch.setattr(storage.objects, "_REREAD_WAITS_S", ())
    ObjectStore(store_url).ensure_container()
    watcher = ServiceWatcher(
        ServiceOptions(store=store_url, dispatch="runner", audit_cron=None),
        announcement={"pid": os.getpid()},
        api_url=prefect_api_url,
    )
    passes = KEPT + 2  # with the event after them, the first three fall out of the record
    with temporary_settings(updates={PREFECT_API_URL: prefect_api_url}):
        for n in range(passes):
            _damaged_request(store_url, f"req-{n}")
            watcher.reconcile_if_needed()  # the watcher's tick: a due request, a pass
        watcher.reconcile_if_needed()  # nothing due: a tick without a pass is not counted
        watcher.handle_event(DeletionEvent(event_id="e-1", payload={"request_id": "req-0"}, occurred_at=time.time()))

    assert len(watcher.passes) == KEPT
    assert watcher.pass_count == passes + 1
    assert watcher.pass_outcomes == {"reconcile": passes, "refused": 1}
    # the latest, in order: each pass settled the request filed just before it
    assert [p["settled"] for p in list(watcher.passes)[:-1]] == [
        {f"req-{n}": FAILED} for n in range(passes - KEPT + 1, passes)
    ]
    assert watcher.passes[-1]["outcome"] == "refused" and watcher.passes[-1]["event_id"] == "e-1"
