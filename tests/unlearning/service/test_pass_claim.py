"""One pass at a time per store, records two writers may share, and ledger records of constant size.

Two ``reconcile`` passes started together on one store (the cron deployment's and serve's watcher's)
split one flushed batch, retrained every run twice and interleaved their writes of
``ledger/forgotten/*`` into a damaged store.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.reconcile import reconcile_flow
from flows.settle import PASS_CLAIM_KEY, busy_result, held_pass, run_pass, store_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.check import check_store
from storage.ledger import DONE, DeletionLedger
from storage.objects import COMMIT_SUFFIX
from storage.registry import RunRegistry
from storage.serving import forgotten_key, record_forgotten

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def trained(store_url, tiny_run):
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    ChainWorker(store_url).train(spec)
    return store_url, spec


@pytest.mark.slow
def test_two_passes_started_together_retrain_each_run_once_and_leave_the_store_clean(
    s3_url, flaky_s3, prefect_api_url, ray_address, tiny_run
):
    """Two real ``reconcile`` flow runs (the cron's and the watcher's) on one store, fanning out to Ray.

    Both reach moto S3 through a proxy that holds the first claim of the last request in flight
    until one of the two passes has ended: the claiming pass is still mid-batch while the other
    runs its whole course. Had both passes claimed, the other would have taken the rest of the
    batch and retrained the run first, and the held pass a second time.
    """
    store = ObjectStore(s3_url)
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    ChainWorker(s3_url).train(spec)
    ids = spec["train_ids"]
    requests = [
        submit_deletion(s3_url, ids[2 * k : 2 * k + 2], dataset="digits", request_id=f"req-{k}", emit=False)[
            "request_id"
        ]
        for k in range(4)
    ]
    held = flaky_s3.hold("PUT", f"/ledger/status/{requests[-1]}/v")
    results: dict[str, dict] = {}

    def one_pass(name: str) -> None:
        results[name] = reconcile_flow(store=s3_url, max_attempts=1)

    with flaky_s3.routed():  # every store the two passes make
        threads = {name: threading.Thread(target=one_pass, args=(name,)) for name in ("cron", "watcher")}
        for thread in threads.values():
            thread.start()
        try:
            held.wait(120)
            deadline = time.monotonic() + 120
            while all(thread.is_alive() for thread in threads.values()) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            held.release()
            for thread in threads.values():
                thread.join(180)
    assert set(results) == {"cron", "watcher"}
    # one retrain of the run for the whole batch: version 2, made from version 1 with all four requests
    registry = RunRegistry(store)
    current = registry.current("r1")
    assert current.version == 2, f"run r1 was retrained {current.version - 1} times"
    assert sorted(current.applied_requests) == requests
    # one pass claimed the whole batch; the other claimed nothing and named the pass holding the store
    worked, idle = sorted(results.values(), key=lambda result: len(result["claimed"]), reverse=True)
    assert sorted(worked["claimed"]) == requests and worked["settled"] == dict.fromkeys(requests, DONE)
    assert idle["claimed"] == [] and idle["batched"]["reason"] == "pass_running" and idle["busy"]["holder"]
    ledger = DeletionLedger(store)
    entries = {r: ledger.get(r) for r in requests}
    assert {r: e.status for r, e in entries.items()} == dict.fromkeys(requests, DONE)
    batches = {e.details["batch_id"] for e in entries.values()}
    assert len(batches) == 1 and store.list("ledger/batches/") == [f"ledger/batches/{next(iter(batches))}.json"]
    assert ledger.batch(next(iter(batches)))["requests"] == requests
    for entry in entries.values():
        run = entry.details["runs"]["r1"]
        assert (run["from_version"], run["to_version"], run["batch_requests"]) == (1, 2, 4), run
    report = check_store(store, min_age_s=0)
    assert report.healthy and report.corrupt == [], report.as_dict()
    assert held_pass(store) is None  # released


def test_a_pass_finding_a_live_holder_does_nothing_and_a_dead_holder_is_taken_over(store_url):
    store = ObjectStore(store_url)
    submit_deletion(store_url, [1, 2], dataset="digits", request_id="waits", emit=False)
    ledger = DeletionLedger(store)
    with store_pass(store, holder="first", lease_s=5) as first:
        assert first is None and held_pass(store)["holder"] == "first"
        seen: dict = {}
        thread = threading.Thread(target=lambda: seen.update(other=store_pass(store, holder="second").__enter__()))
        thread.start()
        thread.join(10)
        assert seen["other"]["holder"] == "first" and seen["other"]["pid"] == os.getpid()
        busy = busy_result(ledger, seen["other"], lease_s=5)
        assert busy["claimed"] == [] and busy["batched"]["requests"] == ["waits"]
        assert busy["batched"]["reason"] == "pass_running"
    # a holder on this host whose process is gone: taken over at once, its lease not waited for
    store.swap_pointer(
        PASS_CLAIM_KEY,
        {
            "host": os.uname().nodename,
            "pid": 2**22 + 12345,
            "holder": "dead",
            "claimed_at": time.time(),
            "lease_s": 600,
        },
        expected_version=store.read_pointer(PASS_CLAIM_KEY).version,
    )
    assert held_pass(store) is None
    with store_pass(store, holder="next", lease_s=5) as other:
        assert other is None
        assert store.read_pointer(PASS_CLAIM_KEY).target["took_over"]["holder"] == "dead"


_WRITER = """
import pathlib, sys, time
from storage import ObjectStore
from storage.serving import record_forgotten

url, n, count, sync = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
store = ObjectStore(url)
(sync / f"ready-{n}").touch()
while not (sync / "go").exists():
    time.sleep(0.005)
ids = [f"bulk-{k}" for k in range(count)]
record_forgotten(store, ids, runs={f"run-{n}": {"serve_block": n, "below_floor": ["x"] * 50 * n}})
"""


def test_concurrent_writers_of_one_forgotten_record_never_damage_it(store_url, tmp_path):
    """Six processes write the records of the same 200 requests at once, each its own body.

    Each record is a data write and a commit record: two writers interleaving them (A's data, B's data,
    B's commit, A's commit) left bytes that disagree with the checksum; over 200 records real
    concurrency meets that at least once (1 to 10 damaged records per run before the fix).
    """
    store = ObjectStore(store_url)
    store.ensure_container()
    writers, count = 6, 200
    sync = tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen([sys.executable, "-c", _WRITER, store_url, str(n), str(count), str(sync)], cwd=REPO, env=env)
        for n in range(writers)
    ]
    deadline = time.monotonic() + 120
    while len(list(sync.glob("ready-*"))) < writers and time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), "a writer ended before it started writing"
        time.sleep(0.05)
    (sync / "go").touch()
    assert [p.wait(120) for p in processes] == [0] * writers
    for request_id in [f"bulk-{k}" for k in range(count)]:
        record = store.get_json(forgotten_key(request_id))  # verified against its checksum
        assert record["request_id"] == request_id and len(record["runs"]) == 1
    report = check_store(store, min_age_s=0)
    assert report.healthy and report.corrupt == [], report.as_dict()


def test_a_forgotten_record_overwritten_while_its_commit_is_in_flight_stays_whole(s3_url, flaky_s3):
    """The first writer's commit record is held in the network until a second writer has written the record.

    Before, the second found no commit, wrote its own body and commit, and the first's commit then landed
    on the second's bytes: a record whose checksum disagrees. Now both write the first writer's record.
    """
    with flaky_s3.routed():
        first = ObjectStore(s3_url)
    second = ObjectStore(s3_url)
    held = flaky_s3.hold("PUT", f"/{forgotten_key('bulk-0')}{COMMIT_SUFFIX}")
    writing = threading.Thread(target=record_forgotten, args=(first, ["bulk-0"]), kwargs={"runs": {"run-a": {"n": 1}}})
    writing.start()
    try:
        held.wait(60)
        record_forgotten(second, ["bulk-0"], runs={"run-b": {"n": 2}})
    finally:
        held.release()
        writing.join(60)
    record = second.get_json(forgotten_key("bulk-0"))  # verified against its checksum
    assert record["runs"] == {"run-a": {"n": 1}}  # the first writer decided it
    report = check_store(second, min_age_s=0)
    assert report.healthy and report.corrupt == [], report.as_dict()


def test_a_pass_logs_a_summary_not_every_id(trained, caplog):
    store_url, spec = trained
    ids = spec["train_ids"]
    for k in range(40):
        submit_deletion(
            store_url, [ids[k]], dataset="digits", request_id=f"a-rather-long-request-name-{k:03d}", emit=False
        )
    worker = ChainWorker(store_url)
    with caplog.at_level(logging.INFO, logger="pass-log"):
        result = run_pass(
            store_url,
            unlearn_runs=lambda per_run: {r: worker.unlearn(r, reqs) for r, reqs in per_run.items()},
            logger=logging.getLogger("pass-log"),
        )
    assert len(result["settled"]) == 40
    lines = [r.getMessage() for r in caplog.records if r.name == "pass-log"]
    claimed = next(line for line in lines if line.startswith("claimed"))
    settled = next(line for line in lines if line.startswith("settled"))
    assert claimed.startswith("claimed 40 request(s): a-rather-long-request-name-000") and "(+35 more)" in claimed
    assert settled == "settled 40 request(s): done 40"
    assert max(len(line) for line in lines) < 400, max(lines, key=len)


def _largest_status_body(store: ObjectStore, request_id: str) -> int:
    key = f"ledger/status/{request_id}"
    return max(
        len(json.dumps(store.read_pointer_version(key, v).target))
        for v in range(1, store.read_pointer(key).version + 1)
    )


@pytest.mark.parametrize("n", [10, 60])
def test_a_requests_ledger_record_keeps_its_own_part_and_the_batch_is_stored_once(trained, n):
    store_url, spec = trained
    store = ObjectStore(store_url)
    ids = spec["train_ids"]
    requests = [
        submit_deletion(store_url, [ids[k]], dataset="digits", request_id=f"req-{k:03d}", emit=False)["request_id"]
        for k in range(n)
    ]
    worker = ChainWorker(store_url)
    result = run_pass(store_url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})
    assert result["settled"] == dict.fromkeys(requests, DONE)
    ledger = DeletionLedger(store)
    entry = ledger.get("req-001")
    audit = entry.details["runs"]["r1"]
    # its own facts, and counts of the batch's lists instead of copies of them
    assert audit["deleted_ids"] == [ids[1]] and audit["batch_deleted_ids"] == n
    assert audit["batch_requests"] == n and audit["merged_with_count"] == n - 1
    assert "requests" not in audit and "merged_with" not in audit
    assert audit["from_version"] == 1 and audit["to_version"] == 2 and audit["status"] == "published"
    assert entry.details["batch_requests"] == n and entry.details["batch_id"] == audit["batch_id"]
    # the batch's full lists, once
    batch = ledger.batch(entry.details["batch_id"])
    assert batch["requests"] == requests and batch["runs"]["r1"]["deleted_ids"] == sorted(ids[:n])
    # a bound independent of the batch size: about 1.4 KB for 10 or 60 (60 copied 60 ids and 59 names: 2.8 KB)
    assert max(_largest_status_body(store, r) for r in requests) < 2000
    report = check_store(store, min_age_s=0)
    assert report.healthy and report.corrupt == [], report.as_dict()


def test_a_forgotten_record_counts_the_batchs_below_floor_requests(store_url):
    store = ObjectStore(store_url)
    below = [f"req-{k:04d}" for k in range(500)]
    record_forgotten(store, ["kept"], runs={"r1": {"serve_block": 2, "published": True, "below_floor": below}})
    record = store.get_json(forgotten_key("kept"))
    assert record["runs"] == {"r1": {"serve_block": 2, "published": True, "below_floor_count": 500}}
    assert len(json.dumps(record)) < 300


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_of_passes_started_together_exactly_one_holds_the_store(backend, request):
    store = ObjectStore(request.getfixturevalue("store_url" if backend == "file" else "s3_url"))
    takers = 4
    start = threading.Barrier(takers)
    outcomes: list[dict | None] = []
    lock = threading.Lock()

    def take(n: int) -> None:
        start.wait()
        with store_pass(store, holder=f"pass-{n}", lease_s=5) as other:
            with lock:
                outcomes.append(other)
            if other is None:
                time.sleep(1.0)  # the others find it held

    threads = [threading.Thread(target=take, args=(n,)) for n in range(takers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == takers and sum(o is None for o in outcomes) == 1, outcomes
    assert held_pass(store) is None
