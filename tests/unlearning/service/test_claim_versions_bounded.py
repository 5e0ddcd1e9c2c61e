"""A claim's pointer and its leases keep a bounded number of objects, however many claims were taken.

``service/pass-claim`` (each pass of ``serve`` or ``reconcile``, flows.settle.store_pass) and
``runs/<run>/train-claim`` (each ``obliviate train``, flows.train.training_claim) gained two pointer
versions and a lease per claim, forever: serve's cron alone adds a pass every 5 minutes. Now a release
(and a take-over) drops the pointer's versions but the newest :data:`storage.lease.CLAIM_VERSIONS_KEPT`
and the leases of the claims below them (:func:`storage.lease.tidy_claim`); ``store check`` takes the
missing older versions for what they are and still reports a damaged or missing kept one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from flows.settle import PASS_CLAIM_KEY, held_pass, store_pass
from flows.train import training_claim, training_claim_key
from storage import ObjectStore
from storage.check import check_store
from storage.lease import claim_leases, holder_process_gone, release_claim, take_claim


def _store(where: str, request) -> ObjectStore:
    return ObjectStore(request.getfixturevalue("store_url" if where == "file" else "s3_url"))


def _a_dead_trainer(store: ObjectStore, run_id: str) -> None:
    """A claim left by an `obliviate train` of this host that died without releasing it."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    holder = {"host": os.uname().nodename, "pid": gone.pid, "command": "obliviate train"}
    take_claim(store, training_claim_key(run_id), holder=holder, lease_s=600, gone=holder_process_gone)


@pytest.mark.parametrize("where", ["file", "s3"])
def test_after_many_passes_the_pass_claim_keeps_two_versions_and_one_lease(where, request):
    store = _store(where, request)
    for n in range(12):
        with store_pass(store, holder=f"pass-{n}", lease_s=5) as other:
            assert other is None
    assert store.pointer_versions(PASS_CLAIM_KEY) == [23, 24]  # the 12th pass's take and its release
    assert store.list(claim_leases(PASS_CLAIM_KEY)) == [f"{claim_leases(PASS_CLAIM_KEY)}/c000000023.json"]
    # pointer versions, leases and their commit records: nothing else is left in the claim's folders
    assert len(store.stored_names(PASS_CLAIM_KEY)) == 2
    assert len(store.stored_names(claim_leases(PASS_CLAIM_KEY))) == 2
    assert held_pass(store) is None and "released_at" in store.read_pointer(PASS_CLAIM_KEY).target
    report = check_store(store, min_age_s=0)
    assert report.healthy and report.corrupt == [] and report.pointers_checked == 2, report.as_dict()


@pytest.mark.parametrize("where", ["file", "s3"])
def test_after_many_trainings_and_take_overs_the_train_claim_stays_bounded(where, request):
    store = _store(where, request)
    key = training_claim_key("r1")
    for n in range(12):
        if n % 3 == 0:  # a trainer that died holding the claim: the next training takes it over
            _a_dead_trainer(store, "r1")
        with training_claim(store.url, "r1"):
            assert store.read_pointer(key).target["pid"] == os.getpid()
    versions = store.pointer_versions(key)
    assert len(versions) == 2 and versions[-1] == 2 * 12 + 4, versions  # 12 takes and releases, 4 dead takes
    assert "released_at" in store.read_pointer(key).target
    assert len(store.list(claim_leases(key))) <= 2
    assert len(store.stored_names(key)) == 2 and len(store.stored_names(claim_leases(key))) <= 4
    report = check_store(store, min_age_s=0)
    assert report.healthy and report.corrupt == [] and report.pointers_checked == 2, report.as_dict()


def test_a_dead_holders_claim_is_tidied_when_taken_over_though_nobody_releases(store_url):
    """serve killed in every pass never releases: the take-overs drop what the dead holders left."""
    store = ObjectStore(store_url)
    key = training_claim_key("r1")
    for _ in range(8):
        _a_dead_trainer(store, "r1")
    assert store.pointer_versions(key) == [7, 8]
    assert store.list(claim_leases(key)) == [f"{claim_leases(key)}/c{v:09d}.json" for v in (7, 8)]


def test_passes_taking_turns_while_versions_are_dropped_never_overlap(store_url):
    """Four threads each run 6 passes, waiting for one another: never two inside at once, none lost."""
    store = ObjectStore(store_url)
    inside, most, entered = [0], [0], []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def passes(n: int) -> None:
        try:
            for k in range(6):
                while True:
                    with store_pass(ObjectStore(store_url), holder=f"t{n}-{k}", lease_s=5, wait_s=30) as other:
                        if other is not None:
                            continue  # waited 30 s for the holder: tried again
                        with lock:
                            inside[0] += 1
                            most[0] = max(most[0], inside[0])
                            entered.append((n, k))
                        time.sleep(0.01)
                        with lock:
                            inside[0] -= 1
                    break
        except BaseException as err:  # noqa: BLE001 -- reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=passes, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    assert most[0] == 1 and len(entered) == 24, (most, entered)
    assert len(store.pointer_versions(PASS_CLAIM_KEY)) <= 3
    assert len(store.list(claim_leases(PASS_CLAIM_KEY))) <= 2
    assert check_store(store, min_age_s=0).corrupt == []


def test_store_check_still_reports_a_damaged_or_missing_kept_claim_version(store_url):
    store = ObjectStore(store_url)
    root = store_url.removeprefix("file://")
    for n in range(5):
        with store_pass(store, holder=f"pass-{n}", lease_s=5):
            pass
    assert store.pointer_versions(PASS_CLAIM_KEY) == [9, 10]
    newest = f"{root}/{PASS_CLAIM_KEY}/v000000010.json"
    with open(newest, "r+b") as handle:  # damaged outside obliviate: one byte changed
        handle.seek(10)
        handle.write(b"#")
    report = check_store(store, min_age_s=0)
    assert [item["key"] for item in report.corrupt] == [f"{PASS_CLAIM_KEY}/v000000010.json"], report.as_dict()
    assert "fails its checksum" in report.corrupt[0]["error"]

    # a kept version lost between two others is missing, not dropped
    key = training_claim_key("r1")
    for _ in range(3):
        with training_claim(store_url, "r1"):
            pass
    claim = take_claim(store, key, holder={"host": "elsewhere", "pid": 1}, lease_s=600)
    assert store.pointer_versions(key) == [5, 6, 7]
    os.remove(f"{root}/{key}/v000000006.json")
    report = check_store(store, min_age_s=0)
    assert f"{key}/v000000006.json" in [item["key"] for item in report.corrupt], report.as_dict()
    assert f"{key}/v000000005.json" not in [item["key"] for item in report.corrupt]
    assert release_claim(store, claim)


def test_a_failed_tidy_leaves_the_pass_whole_and_says_so_without_a_traceback(s3_url, flaky_s3, caplog):
    """S3 refuses the deletes of the claim's old versions: the pass still ends and releases; the next one tidies."""
    for n in range(3):
        with store_pass(ObjectStore(s3_url), holder=f"pass-{n}", lease_s=5):
            pass
    refused = flaky_s3.fail("DELETE", f"/{PASS_CLAIM_KEY}/v")
    with flaky_s3.routed():
        store = ObjectStore(s3_url)
    with caplog.at_level(logging.DEBUG, logger="storage.lease"), store_pass(store, holder="refused", lease_s=5) as o:
        assert o is None
    assert refused.refused, "no delete of the claim's old versions was refused"
    assert held_pass(store) is None and "released_at" in store.read_pointer(PASS_CLAIM_KEY).target
    said = [r for r in caplog.records if r.name == "storage.lease" and r.levelno == logging.WARNING]
    assert len(said) == 1 and said[0].exc_info is None, [r.getMessage() for r in caplog.records]
    assert "service/pass-claim" in said[0].getMessage() and "next" in said[0].getMessage()
    assert len(store.pointer_versions(PASS_CLAIM_KEY)) > 2
    refused.stop()
    with store_pass(ObjectStore(s3_url), holder="next", lease_s=5):
        pass
    assert len(ObjectStore(s3_url).pointer_versions(PASS_CLAIM_KEY)) == 2


def test_a_pass_stalled_in_its_take_while_others_pass_and_drop_versions_waits_its_turn(s3_url, flaky_s3):
    """Its write of version 3 is held while three passes take, release and drop versions 1 to 6: written late
    under a dropped number, it loses its swap (the newest descends from the other version 3), reads again and
    takes the claim after them, never beside one."""
    store = ObjectStore(s3_url)
    with store_pass(store, holder="first", lease_s=5):
        pass
    held = flaky_s3.hold("PUT", f"/{PASS_CLAIM_KEY}/v000000003.json")
    outcome: dict = {}

    def stalled() -> None:
        with flaky_s3.routed():
            slow = ObjectStore(s3_url)
        try:
            with store_pass(slow, holder="stalled", lease_s=5) as other:
                outcome["other"] = other
                outcome["version"] = store.read_pointer(PASS_CLAIM_KEY).version
        except BaseException as err:  # noqa: BLE001 -- reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=stalled)
    thread.start()
    try:
        held.wait()
        for n in range(3):
            with store_pass(store, holder=f"pass-{n}", lease_s=5) as other:
                assert other is None
                assert store.read_pointer(PASS_CLAIM_KEY).target["holder"] == f"pass-{n}"
        assert store.pointer_versions(PASS_CLAIM_KEY) == [7, 8]
    finally:
        held.release()
        thread.join(60)
    assert "error" not in outcome, outcome
    assert outcome == {"other": None, "version": 9}, outcome
    assert store.pointer_versions(PASS_CLAIM_KEY) == [9, 10]
    assert "took_over" not in store.read_pointer_version(PASS_CLAIM_KEY, 9).target
    assert check_store(store, min_age_s=0).corrupt == []


def test_a_claim_grown_before_tidying_is_worked_down_a_bounded_batch_per_release(store_url):
    """A store written before claims were tidied: its first passes drop 200 versions and leases each (no pass spends
    an hour on a year's worth), and store check finds the partly tidied pointer whole."""
    store = ObjectStore(store_url)
    for version in range(1, 241):  # 120 passes of the old code: a take (with its lease), then its release
        target = {"holder": f"old-{version // 2}", "pid": 1} | ({} if version % 2 else {"released_at": 1.0})
        store.swap_pointer(PASS_CLAIM_KEY, target, expected_version=version - 1)
        if version % 2:
            store.put_json(f"{claim_leases(PASS_CLAIM_KEY)}/c{version:09d}.json", {"holder": "old", "lease_s": 20})
    with store_pass(store, holder="first since", lease_s=5) as other:
        assert other is None
    versions = store.pointer_versions(PASS_CLAIM_KEY)
    assert versions == list(range(201, 243)), versions  # 242 versions listed: the oldest 200 dropped
    leases = store.list(claim_leases(PASS_CLAIM_KEY))
    assert len(leases) == 21 and leases[0].endswith("c000000201.json"), leases  # 121 leases, the oldest 100 below 201
    assert check_store(store, min_age_s=0).corrupt == []
    with store_pass(store, holder="second since", lease_s=5) as other:
        assert other is None
    assert store.pointer_versions(PASS_CLAIM_KEY) == [243, 244]
    assert store.list(claim_leases(PASS_CLAIM_KEY)) == [f"{claim_leases(PASS_CLAIM_KEY)}/c000000243.json"]
