"""``serve`` whose store is gone said ``reconcile pass failed: ...`` every 5 s, forever.

The same failure is now said once, then summarised at growing intervals, and its recovery once.
The store is a real file store made unwritable by replacing its ledger folder with a file.
"""

from __future__ import annotations

import shutil

from flows.deployments import RepeatedFailures, ServiceOptions, ServiceWatcher
from storage.ledger import DeletionLedger
from storage.objects import ObjectStore


def test_a_reconcile_pass_failing_every_tick_is_said_once_then_summarised_then_its_recovery(tmp_path):
    url = f"file://{tmp_path}/store"
    DeletionLedger(ObjectStore(url)).open_request_ids()  # the ledger folder exists
    ledger_folder = tmp_path / "store" / "ledger"
    shutil.rmtree(ledger_folder)
    ledger_folder.write_text("not a folder")  # every pass now fails to write the ledger

    now = [1_000_000.0]
    lines: list[str] = []
    watcher = ServiceWatcher(
        ServiceOptions(store=url, dispatch="runner"), announcement={"pid": 1}, api_url="http://127.0.0.1:9"
    )
    watcher.failures = RepeatedFailures(clock=lambda: now[0], say=lines.append)
    for _ in range(40):  # 200 s of passes every 5 s
        watcher._guarded("reconcile pass", watcher.reconcile_if_needed)
        now[0] += 5.0
    assert lines[0].startswith("obliviate serve: reconcile pass failed: StorageError: ")
    summaries = lines[1:]
    # 40 identical failures: the first said, then summaries after 60 s and 120 s more (growing), no more
    assert len(summaries) == 2, lines
    assert all("reconcile pass still failing since " in line for line in summaries), lines
    assert "(13 passes): StorageError: " in summaries[0] and "(37 passes): " in summaries[1], summaries

    ledger_folder.unlink()  # the store is back
    watcher._guarded("reconcile pass", watcher.reconcile_if_needed)
    watcher._guarded("reconcile pass", watcher.reconcile_if_needed)
    assert len(lines) == 4 and lines[3].startswith("obliviate serve: reconcile pass recovered after 40 failed passes")


def test_another_reason_is_said_at_once_and_each_pass_kind_keeps_its_own_count():
    lines: list[str] = []
    failures = RepeatedFailures(clock=lambda: 0.0, say=lines.append)
    failures.failed("reconcile pass", "WriteFailed: bucket does not exist")
    failures.failed("reconcile pass", "WriteFailed: bucket does not exist")
    failures.failed("warming the worker pool", "WriteFailed: bucket does not exist")
    failures.failed("reconcile pass", "ReadFailed: timed out")
    failures.succeeded("warming the worker pool")
    failures.succeeded("warming the worker pool")  # no failure open: nothing to say
    assert lines == [
        "obliviate serve: reconcile pass failed: WriteFailed: bucket does not exist",
        "obliviate serve: warming the worker pool failed: WriteFailed: bucket does not exist",
        "obliviate serve: reconcile pass failed: ReadFailed: timed out",
        lines[3],
    ]
    assert lines[-1].startswith("obliviate serve: warming the worker pool recovered after 1 failed passes since ")
