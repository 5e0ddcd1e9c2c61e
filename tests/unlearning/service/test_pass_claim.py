"""One pass at a time per store, records two writers may share, and ledger records of constant size.

Two ``reconcile`` passes started together on one store (the cron deployment's and serve's watcher's)
split one flushed batch, retrained every run twice and interleaved their writes of
``ledger/forgotten/*`` into a damaged store.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time

import pytest

import flows.unlearn as unlearn_module
from actors.chains import ChainWorker
from flows.settle import PASS_CLAIM_KEY, AttemptPolicy, busy_result, held_pass, run_pass, store_pass
from flows.train import run_spec
from flows.unlearn import process_open_requests, submit_deletion
from storage import ObjectStore
from storage.check import check_store
from storage.ledger import DONE, DeletionLedger
from storage.serving import forgotten_key, record_forgotten


@pytest.fixture
def trained(store_url, tiny_run):
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    ChainWorker(store_url).train(spec)
    return store_url, spec


def _recording_fan_out(calls: list[tuple[str, list[str]]], lock: threading.Lock):
    """The pass's fan-out with the real worker in this process, each call noted (run, its requests)."""

    def fan_out(store, per_run, **_):
        worker = ChainWorker(store)
        out = {}
        for run_id, requests in sorted(per_run.items()):
            with lock:
                calls.append((run_id, sorted(requests)))
            time.sleep(0.3)  # the other pass starts meanwhile
            out[run_id] = worker.unlearn(run_id, requests)
        return out, {"workers": 1, "runs": len(per_run), "seconds": 0.0}

    return fan_out


def test_two_passes_started_together_retrain_each_run_once_and_leave_the_store_clean(trained, monkeypatch):
    store_url, spec = trained
    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(unlearn_module, "fan_out_unlearning", _recording_fan_out(calls, threading.Lock()))
    monkeypatch.setattr(unlearn_module, "get_run_logger", lambda: logging.getLogger("test-pass"))
    monkeypatch.setattr(unlearn_module, "publish_request_artifacts", lambda *a, **k: None)  # no Prefect API here
    ids = spec["train_ids"]
    requests = [
        submit_deletion(store_url, ids[2 * k : 2 * k + 2], dataset="digits", emit=False)["request_id"] for k in range(8)
    ]
    start = threading.Barrier(2)
    results: dict[str, dict] = {}

    def one_pass(name: str) -> None:
        start.wait()
        results[name] = process_open_requests(store_url, attempts=AttemptPolicy(max_attempts=1), holder=name)

    threads = [threading.Thread(target=one_pass, args=(name,)) for name in ("cron", "watcher")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert set(results) == {"cron", "watcher"}
    # one retrain of the run for the whole batch, by one pass; the other claimed nothing
    assert calls == [("r1", sorted(requests))], calls
    claimed = results["cron"]["claimed"] + results["watcher"]["claimed"]
    assert sorted(claimed) == sorted(requests)
    ledger = DeletionLedger(ObjectStore(store_url))
    assert {r: ledger.get(r).status for r in requests} == dict.fromkeys(requests, DONE)
    report = check_store(ObjectStore(store_url), min_age_s=0)
    assert report.healthy and report.corrupt == [], report.as_dict()
    assert held_pass(ObjectStore(store_url)) is None  # released


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


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_concurrent_writers_of_one_forgotten_record_never_damage_it(backend, request, monkeypatch):
    store = ObjectStore(request.getfixturevalue("store_url" if backend == "file" else "s3_url"))
    write_atomic = ObjectStore._write_atomic

    def slow_between_data_and_commit(self, path, data):  # two writers' data and commit records interleave
        write_atomic(self, path, data)
        if "/ledger/forgotten/" in path and not path.endswith(".sha256"):
            time.sleep(random.uniform(0.0, 0.2))

    monkeypatch.setattr(ObjectStore, "_write_atomic", slow_between_data_and_commit)
    writers = 6
    request_ids = [f"bulk-{k}" for k in range(8 if backend == "file" else 3)]
    start = threading.Barrier(writers)

    def write(n: int) -> None:
        start.wait()
        record_forgotten(store, request_ids, runs={f"run-{n}": {"serve_block": n, "below_floor": ["x"] * 50 * n}})

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for request_id in request_ids:
        record = store.get_json(forgotten_key(request_id))  # verified against its checksum
        assert record["request_id"] == request_id and len(record["runs"]) == 1
    report = check_store(store, min_age_s=0)
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
