"""serve's watcher and a request whose ledger record is damaged (a local store, a real Prefect server, no Ray).

0f006fe's watcher part was checked by a one-off script: the watcher listed the due requests with the
checksum error every tick and never started a pass, so one damaged request held up every other one
until its grace ran out, and then every pass failed. Here serve's own watcher runs (its heartbeat and
dispatcher threads, ``dispatch="runner"``: no event listener, no worker pool) against a real Prefect
server: it starts one pass at once for the damaged request (no grace), that pass records it ``failed``
with its mend and settles the others, and no pass follows on the next ticks. One whose current status
is damaged too cannot be recorded: the watcher says so once and starts no pass for it. An event for the
damaged request, dispatched by the watcher, is said as one sentence and serve goes on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from flows.deployments import ServiceOptions, ServiceWatcher
from flows.listener import DeletionEvent
from flows.settle import RAY_DISCONNECTING, STOPPING
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.ledger import DAMAGED_RECORD, FAILED, PENDING, REJECTED, DeletionLedger

GARBAGE = b"\0garbage{{{"
MEND = "forget --ids IDS --data DATASET --request-id req-bad --no-event"
TICK_S = 0.5


@pytest.fixture
def watch(prefect_api_url):
    """Start serve's watcher for a store (its real threads, ticking every TICK_S); stopped afterwards."""
    started: list[ServiceWatcher] = []

    def start(store_url: str) -> ServiceWatcher:
        options = ServiceOptions(store=store_url, dispatch="runner", watch_s=TICK_S, audit_cron=None)
        watcher = ServiceWatcher(options, announcement={"pid": os.getpid()}, api_url=prefect_api_url)
        started.append(watcher)
        watcher.start()
        return watcher

    yield start
    try:
        for watcher in started:
            watcher.stop(grace_s=10.0)
    finally:
        STOPPING.clear()  # stop() tells every pass of this process to stop; the next test's passes run again
        RAY_DISCONNECTING.clear()


def _until(check, *, timeout_s: float = 90.0, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.2)


def _filed(store_url: str) -> tuple[DeletionLedger, Path]:
    """req-ok (healthy) and req-bad (its record damaged), both pending, filed just now (within the grace)."""
    ObjectStore(store_url).ensure_container()
    submit_deletion(store_url, [5], dataset="digits", request_id="req-ok", emit=False)
    submit_deletion(store_url, [6], dataset="digits", request_id="req-bad", emit=False)
    root = Path(store_url.removeprefix("file://"))
    (root / "ledger/requests/req-bad.json").write_bytes(GARBAGE)
    return DeletionLedger(ObjectStore(store_url)), root


def test_the_watcher_starts_one_pass_for_a_damaged_request_which_fails_it_and_settles_the_others(
    store_url, watch, capsys
):
    ledger, _ = _filed(store_url)
    watcher = watch(store_url)
    assert watcher.grace_s >= 30.0  # req-ok alone would wait out its grace: the damaged one needs a pass now
    _until(lambda: ledger.history("req-bad")[-1]["status"] == FAILED, what="req-bad recorded failed")
    _until(lambda: watcher.pass_count == 1, timeout_s=10.0, what="the pass recorded")
    last = ledger.history("req-bad")[-1]
    assert last["details"][DAMAGED_RECORD] and MEND in last["details"]["reason"]
    assert ledger.get("req-ok").status == REJECTED  # settled by the same pass, not after its grace
    assert watcher.passes[0]["settled"] == {"req-bad": FAILED, "req-ok": REJECTED}

    time.sleep(TICK_S * 6)  # later ticks: the failed request needs no pass
    assert watcher.pass_count == 1 and watcher.pass_outcomes == {"reconcile": 1}

    # An event for it, dispatched by serve: one sentence with the reason, serve goes on
    watcher.wakeups.put(DeletionEvent(event_id="ev-bad", payload={"request_id": "req-bad"}, occurred_at=time.time()))
    _until(lambda: watcher.pass_count == 2, what="the event handled")
    assert watcher.passes[-1]["outcome"] == "refused" and MEND in watcher.passes[-1]["reason"]
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "ev-bad" in line]
    assert len(said) == 1 and said[0].startswith("obliviate serve: deletion event ev-bad: request req-bad is failed: ")
    assert "CorruptObject" not in out and "Traceback" not in out
    assert "reconcile pass failed" not in out and "event ev-bad failed" not in out
    assert len(ledger.history("req-bad")) == 2  # pending, failed: nothing recorded again


def test_the_watcher_says_once_a_request_whose_status_is_damaged_too_and_starts_no_pass_for_it(
    store_url, watch, capsys
):
    ledger, root = _filed(store_url)
    (root / "ledger/status/req-bad/v000000001.json").write_bytes(GARBAGE)
    watcher = watch(store_url)
    time.sleep(TICK_S * 8)
    assert watcher.pass_count == 0  # no pass could record it; req-ok is within its grace
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "req-bad" in line]
    assert said == [
        line for line in said if line.startswith("obliviate serve: request req-bad cannot be read and is left as it is")
    ]
    assert len(said) == 1, said
    # why it is left as it is: its status is damaged too (it named only the damaged record and its refiling)
    assert "the record of deletion request req-bad is damaged" in said[0] and MEND in said[0]
    assert "and its current status cannot be read either (pointer " in said[0] and "store check" in said[0]
    assert ledger.get("req-ok").status == PENDING and len(ledger.history("req-bad")) == 1
