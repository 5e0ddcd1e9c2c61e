"""`store check` of a store that a running `serve` writes meanwhile: what serve deletes between the check's listing and
its read is gone, not damaged.

CI's chaos test (test_chaos.py, serve killed and restarted, then `check_store` with the new serve still running)
failed with "no object at .../service/pass-claim-leases/c000000003.json": serve's cron and watcher take and release
the store's pass claim, and each release drops the claim's old pointer versions and leases (storage.lease.tidy_claim),
so a lease listed by the check was deleted before the check verified it, and the check raised instead of reporting.
Here a thread takes and releases the pass claim as serve does, on a real store, while the check runs again and again.

A repair with a short --orphan-age beside a live writer (a serve, a `train`, a deletion pass) is refused, since it would
collect their writes in flight; a write whose temporary another process deleted says so.
"""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from flows.settle import PASS_CLAIM_KEY
from storage import ObjectStore
from storage.check import check_store
from storage.lease import release_claim, take_claim

CHECKS = 60


def _new_store(backend: str, tmp_path, request) -> tuple[str, ObjectStore]:
    """A fresh store on ``backend`` (a folder, or a bucket of the test's moto server) and its URL."""
    url = f"file://{tmp_path}/store" if backend == "file" else request.getfixturevalue("s3_url")
    store = ObjectStore(url)
    store.ensure_container()
    return url, store


def _repair_refusal(url: str, *, orphan_age_s: float) -> str:
    """What `store check --repair --orphan-age orphan_age_s` of ``url`` says when it refuses (it must refuse)."""
    from flows.repair import check_and_repair
    from obliviate.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        check_and_repair(url, repair=True, min_orphan_age_s=orphan_age_s)
    return str(raised.value)


def _crashed_write_left(store: ObjectStore, name: str, data: bytes) -> None:
    """Leave ``data`` at ``name`` as a crashed write leaves its temporary file: raw bytes, no commit record."""
    if store.is_local:
        os.makedirs(os.path.dirname(store._path(name)), exist_ok=True)
    store._fs.pipe_file(store._path(name), data)


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_check_while_the_pass_claim_is_taken_and_released_reports_a_healthy_store(
    backend: str, tmp_path, request
) -> None:
    _, store = _new_store(backend, tmp_path, request)
    stop, churned, errors = threading.Event(), [0], []

    def serve_like_passes() -> None:
        try:
            while not stop.is_set():
                claim = take_claim(store, PASS_CLAIM_KEY, holder={"host": "here", "pid": 1, "holder": "a pass"})
                release_claim(store, claim)
                churned[0] += 1
        except BaseException as err:  # noqa: BLE001 -- said by the test below
            errors.append(err)

    churner = threading.Thread(target=serve_like_passes, daemon=True)
    churner.start()
    try:
        reports = []
        # CHECKS checks, and on until the claim has moved 10 times: 60 checks of a file store once ended while the
        # churning thread had moved it 9 times (local CI of 60eecf3), and the test then proved nothing of the race
        deadline = time.monotonic() + 120
        while (len(reports) < CHECKS or churned[0] < 10) and time.monotonic() < deadline:
            reports.append(check_store(store, min_age_s=3600))
    finally:
        stop.set()
        churner.join(timeout=60)
    assert not errors, errors
    assert churned[0] >= 10, churned  # the claim moved under the checks, many times
    unhealthy = [r.as_dict() for r in reports if not r.healthy]
    assert not unhealthy, unhealthy[:2]
    assert sum(r.pointers_checked for r in reports) > 0  # the claim's pointer was among what was checked


def _announce_live_serve(store: ObjectStore) -> None:
    """What a running serve keeps in the store (flows.unlearn): its announcement, renewed within ENDPOINT_STALE_S."""
    from flows.unlearn import ENDPOINT_KEY

    store.put_json(
        ENDPOINT_KEY, {"pid": 4242, "host": "h", "api_url": "http://127.0.0.1:4200/api", "started_at": time.time()}
    )


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_repair_with_a_young_orphan_age_beside_a_live_serve_is_refused_and_collects_nothing(
    backend: str, tmp_path, request, capsys
) -> None:
    # `--orphan-age 0` beside a running serve deleted the temporary files of its claim writes before they were linked,
    # and the writes failed ("could not write ... does not exist (any more)"): seen on file:// with repairs at age 0
    # looping beside a thread that takes and releases the pass claim as the test above does.
    from flows.cli import main
    from flows.repair import MIN_ORPHAN_AGE_BESIDE_WRITERS_S, check_and_repair

    url, store = _new_store(backend, tmp_path, request)
    claim = take_claim(store, PASS_CLAIM_KEY, holder={"host": "here", "pid": 1, "holder": "a pass"})
    release_claim(store, claim)
    leftover = "runs/r1/.tmp-0123456789abcdef0123456789abcdef-spec.json"  # a crashed write's temporary
    _crashed_write_left(store, leftover, b"{}")
    _announce_live_serve(store)

    said = _repair_refusal(url, orphan_age_s=0)
    assert said.startswith(
        f"--orphan-age 0 would collect writes in flight of the live `obliviate serve` of {store.url}"
    )
    assert (
        f"Pass --orphan-age {MIN_ORPHAN_AGE_BESIDE_WRITERS_S:g} or more, or repair once they finished (a serve writes "
        "for as long as it runs: stop it first)." in said
    ), said
    assert main(["store", "check", "--repair", "--orphan-age", "5", "--store", url]) == 2
    assert "--orphan-age 5 would collect writes in flight" in capsys.readouterr().err
    assert store._fs.exists(store._path(leftover))  # nothing collected
    # At the floor the repair runs; the young temporary is kept as an in-flight write.
    assert check_and_repair(url, repair=True, min_orphan_age_s=MIN_ORPHAN_AGE_BESIDE_WRITERS_S).collected == []
    assert store._fs.exists(store._path(leftover))
    # Once serve said it stopped, age 0 is the user's to choose again: the temporary is collected.
    from flows.unlearn import ENDPOINT_KEY

    store.put_json(ENDPOINT_KEY, {**store.get_json(ENDPOINT_KEY), "stopped_at": time.time()})
    assert leftover in check_and_repair(url, repair=True, min_orphan_age_s=0).collected
    assert not store._fs.exists(store._path(leftover))


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_repair_with_a_young_orphan_age_beside_a_live_training_claim_is_refused(
    backend: str, tmp_path, request, exited_pid
) -> None:
    # `store check --repair --orphan-age 0` beside a running `obliviate train` deleted a checkpoint's temporary file
    # before its rename, and the training failed with WriteFailed "could not write .../ckpt-0001.pt: [Errno 2] ..."
    # (seen with repairs at age 0 looping beside `obliviate train --blocks 30`): only a serve was looked for.
    import socket

    from flows.repair import check_and_repair
    from obliviate.errors import ConfigError
    from storage.registry import training_claim_key

    url, store = _new_store(backend, tmp_path, request)
    leftover = "runs/r1/chains/train/.tmp-0123456789abcdef0123456789abcdef-ckpt-0001.pt"
    _crashed_write_left(store, leftover, b"x")
    here = {"host": socket.gethostname(), "pid": os.getpid(), "command": "obliviate train"}
    claim = take_claim(store, training_claim_key("r1"), holder=here)  # this process: live
    said = _repair_refusal(url, orphan_age_s=0)
    assert said.startswith(
        f"--orphan-age 0 would collect writes in flight of the training of run 'r1' by obliviate train, pid "
        f"{os.getpid()} on {socket.gethostname()}"
    ), said
    assert store._fs.exists(store._path(leftover))  # nothing collected
    # A deletion pass holding the store's pass claim on another host, renewing its lease, is a writer too.
    other = take_claim(store, PASS_CLAIM_KEY, holder={"host": "elsewhere", "pid": 7, "holder": "pass p1"})
    with pytest.raises(ConfigError, match=r"; the deletion pass of pass p1, pid 7 on elsewhere:"):
        check_and_repair(url, repair=True, min_orphan_age_s=59)
    release_claim(store, other)
    release_claim(store, claim)
    # A training claim whose process on this host is gone (a crashed train) writes nothing: age 0 is allowed.
    crashed = take_claim(store, training_claim_key("r2"), holder={**here, "pid": exited_pid})
    assert leftover in check_and_repair(url, repair=True, min_orphan_age_s=0).collected
    assert not store._fs.exists(store._path(leftover))
    assert store.read_pointer(training_claim_key("r2")).version == crashed.version  # the repair takes no claim


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_repair_with_a_young_orphan_age_beside_a_request_being_filed_is_refused(
    backend: str, tmp_path, request, exited_pid
) -> None:
    # A `forget` holds no claim: `--repair --orphan-age 0` beside one filing a request could collect what it had
    # written so far (its open marker, its record's bytes before their commit record), and the request it acknowledged
    # next would have lost its record. A filing shows in the store as a half-filed request whose marker is young.
    import socket

    from flows.repair import check_and_repair
    from storage.check import filings_in_flight
    from storage.ledger import DeletionLedger

    url, store = _new_store(backend, tmp_path, request)
    ledger = DeletionLedger(store)
    ledger.append(request_id="filed", ids=[1], dataset="digits", reason=None)  # open, and committed: no filing
    assert check_and_repair(url, repair=True, min_orphan_age_s=0).collected == []
    assert store.get_json("ledger/open/filed.json")["pid"] == os.getpid()  # the marker names its writer
    here = {"host": socket.gethostname(), "pid": os.getpid()}
    store.put_json("ledger/open/filing.json", {"at": time.time(), **here})  # what DeletionLedger.append writes first
    said = _repair_refusal(url, orphan_age_s=30)
    assert re.match(
        rf"--orphan-age 30 would collect writes in flight of the filing of request 'filing' by a `forget`, pid "
        rf"{os.getpid()} on {re.escape(socket.gethostname())} \(its open marker is \d s old, its record not committed "
        r"yet\): ",
        said,
    ), said
    assert said.endswith("or repair once they finished."), said  # no serve to stop
    assert store.exists("ledger/open/filing.json")  # nothing collected
    assert [request_id for request_id, _, _ in filings_in_flight(store, younger_than_s=60)] == ["filing"]
    assert filings_in_flight(store, younger_than_s=0) == []  # a marker older than the floor: a crashed forget's
    # A marker from before markers named their writer: young, so a filing all the same.
    store.put_json("ledger/open/filing.json", {"at": time.time()})
    assert [(r, who) for r, _, who in filings_in_flight(store, younger_than_s=60)] == [("filing", None)]
    # Once its record is committed the request is open, not being filed: the repair goes on, and keeps both.
    ledger.append(request_id="filing", ids=[2], dataset="digits", reason=None)
    assert check_and_repair(url, repair=True, min_orphan_age_s=0).collected == []
    assert ledger.get("filing").status == "pending" and store.exists("ledger/open/filing.json")
    # A forget of this host that failed part way (its process gone) files nothing: its half-filed marker goes at once.
    store.put_json("ledger/open/failed.json", {"at": time.time(), **here, "pid": exited_pid})
    assert filings_in_flight(store, younger_than_s=60) == []
    assert check_and_repair(url, repair=True, min_orphan_age_s=0).collected == ["ledger/open/failed.json"]


def test_a_train_beside_repairs_at_age_0_is_not_broken_by_them(tmp_path) -> None:
    # The end-to-end case: `obliviate train` while `store check --repair --orphan-age 0` runs again and again.
    import subprocess
    import sys

    from flows.repair import check_and_repair
    from obliviate.errors import ConfigError

    url = f"file://{tmp_path}/store"
    env = {**os.environ, "PREFECT_API_URL": ""}
    argv = [sys.executable, "-m", "flows.cli", "train", "--store", url, "--run-id", "r1", "--blocks", "30"]
    training = subprocess.Popen(
        [*argv, "--epochs", "1", "--train-size", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    refused, collected = 0, []
    while training.poll() is None:
        try:
            collected += check_and_repair(url, repair=True, min_orphan_age_s=0).collected
        except ConfigError as err:
            assert "would collect writes in flight of the training of run 'r1' by obliviate train" in str(err)
            refused += 1
            time.sleep(0.05)
    said = training.stdout.read()
    assert training.returncode == 0, said[-3000:]
    assert refused > 0, said[-3000:]  # the repairs met the training's claim
    assert not [name for name in collected if "/chains/" in name], collected


@pytest.mark.parametrize("step", ["replace", "link"])
def test_a_write_whose_temporary_another_process_deleted_says_so(step: str, tmp_path, monkeypatch) -> None:
    # Said before: "... No such file or directory: '.../.tmp-<hex>-ckpt-0001.pt' -> '.../ckpt-0001.pt'. The bucket or
    # folder of the store does not exist (any more); create it, ...", while the folder was there all along.
    from storage.errors import WriteFailed

    store = ObjectStore(f"file://{tmp_path}/store")
    store.ensure_container()
    real = getattr(os, step)

    def deleted_first(source, target, *args, **kwargs):  # another process deletes the temporary before the rename
        os.remove(source)
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, step, deleted_first)
    with pytest.raises(WriteFailed) as raised:
        if step == "replace":  # an atomic overwrite (a checkpoint, a JSON object)
            store.put_bytes("runs/r1/chains/train/ckpt-0001.pt", b"weights")
        else:  # a create-once (a pointer version, a claim)
            take_claim(store, "service/pass-claim", holder={"host": "here", "pid": 1})
    said = str(raised.value)
    assert "was deleted by another process after it was written and before it was renamed into place" in said, said
    assert "give --orphan-age 60 or more" in said and "does not exist (any more)" not in said, said
