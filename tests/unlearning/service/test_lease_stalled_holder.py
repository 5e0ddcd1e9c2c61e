"""A claim's holder that stalled past its lease and was taken over learns so at its next renewal, and stops.

``service/pass-claim`` (flows.settle.store_pass) and ``runs/<run>/train-claim`` (flows.train.training_claim) are
renewed by a :class:`storage.lease.LeaseKeeper`. A holder stopped long enough for its lease to lapse (a process
suspended, a machine swapping) is taken over by the next taker; when it woke up, its keeper went on writing the
lease of its old claim (``<key>-leases/c<its version>.json``) until a later tidy deleted it, and nothing told the
holder it had lost the claim. Now its renewal reads the claim's pointer first (and again after the write, for a
take-over landing in between): found moved, it writes nothing, deletes its own lease and says so.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from flows.settle import PASS_CLAIM_KEY
from flows.train import training_claim_key
from storage import ObjectStore
from storage.lease import LeaseKeeper, claim_free, claim_leases, lease_key, release_claim, renew_claim, take_claim

# A holder (one pass, or one `obliviate train`) that holds its claim with a 1 s lease until told to stop.
_HOLDER = """
import logging, os, sys, time
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
from storage import ObjectStore
url, which, stop = sys.argv[1], sys.argv[2], sys.argv[3]
if which == "pass":
    from flows.settle import store_pass
    held = store_pass(ObjectStore(url), holder="stalled-pass", lease_s=1.0)
else:
    from flows.train import training_claim
    held = training_claim(url, "r1", lease_s=1.0)
with held as other:
    assert other is None, other
    print("held", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(stop) and time.monotonic() < deadline:
        time.sleep(0.05)
print("ended", flush=True)
"""

_KEYS = {"pass": PASS_CLAIM_KEY, "train": training_claim_key("r1")}


def _url(where: str, request) -> str:
    if where == "file":
        url = f"file://{request.getfixturevalue('tmp_path')}/store"
        ObjectStore(url).ensure_container()
        return url
    return request.getfixturevalue("s3_url")


def _take_over(store: ObjectStore, key: str):
    """Another process takes the claim, as the next pass or training does once its holder's lease lapsed."""
    return take_claim(store, key, holder={"host": "elsewhere", "pid": 4242, "holder": "the taker"}, lease_s=30.0)


def _assert_taker_intact(store: ObjectStore, taker) -> None:
    current = store.read_pointer(taker.key)
    assert current.version == taker.version and current.target == taker.holder
    assert store.list(claim_leases(taker.key)) == [lease_key(taker.key, taker.version, folder=taker.folder)]
    assert not claim_free(store, current, gone=None, now=time.time())


@pytest.mark.parametrize("which", ["pass", "train"])
@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_holder_stopped_past_its_lease_and_taken_over_stops_renewing_when_it_wakes(where, which, request, tmp_path):
    """A real stall: the holder's process is SIGSTOPped until its lease lapses, taken over, then SIGCONTinued."""
    url = _url(where, request)
    store, key = ObjectStore(url), _KEYS[which]
    stop = tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(request.config.rootpath)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, url, which, str(stop)],
        cwd=request.config.rootpath,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        stalled = store.read_pointer(key)
        assert stalled.target["pid"] == holder.pid
        os.kill(holder.pid, signal.SIGSTOP)
        time.sleep(1.6)  # past its 1 s lease
        taker = _take_over(store, key)
        assert taker.version > stalled.version and taker.holder["took_over"]["pid"] == holder.pid
        os.kill(holder.pid, signal.SIGCONT)
        time.sleep(1.5)  # six renewal periods of the woken holder, which still holds its claim as far as it knows
        assert holder.poll() is None
        # no lease of the stalled holder's claim: neither the one it wrote before its stall, nor a renewal since
        _assert_taker_intact(store, taker)
        stop.touch()
        out, err = holder.communicate(timeout=60)
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.wait()
    assert holder.returncode == 0 and out.strip() == "ended", err
    lost = [line for line in err.splitlines() if "was taken over: its holder did not renew" in line]
    assert len(lost) == 1, err
    assert (
        f"version {stalled.version} (pid {holder.pid}" in lost[0]
        and f"now at version {taker.version}: held by the taker, pid 4242 on elsewhere" in lost[0]
    )
    assert "Traceback" not in err, err
    _assert_taker_intact(store, taker)  # its release, refused (the pointer moved on), left the taker's claim alone


@pytest.mark.parametrize("where", ["file", "s3"])
def test_a_renewal_after_a_take_over_reports_the_loss_and_leaves_no_lease(where, request, caplog):
    url = _url(where, request)
    store = ObjectStore(url)
    mine = take_claim(
        store, PASS_CLAIM_KEY, holder={"host": socket.gethostname(), "pid": 1, "holder": "a"}, lease_s=0.5
    )
    keeper = LeaseKeeper(store, lease_s=0.5, holder="a")  # not started: a holder whose renewals stalled
    assert keeper.hold_claim(mine)
    time.sleep(0.7)
    taker = _take_over(store, PASS_CLAIM_KEY)
    with caplog.at_level(logging.WARNING, logger="storage.lease"):
        assert renew_claim(store, mine, holder="a", lease_s=0.5) is None
    assert [r.getMessage() for r in caplog.records if "was taken over" in r.getMessage()], caplog.text
    _assert_taker_intact(store, taker)
    # the keeper's own renewals: the claim goes to `lost` and is renewed no more
    with keeper:
        deadline = time.monotonic() + 10
        while not keeper.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert keeper.lost == [PASS_CLAIM_KEY]
        renewals = keeper.renewals
        time.sleep(0.5)
        assert keeper.renewals == renewals and keeper.lost == [PASS_CLAIM_KEY]
    _assert_taker_intact(store, taker)
    assert not release_claim(store, mine)
    assert keeper.hold_claim(mine) is False  # a holder that wakes up in its very first renewal learns it too
    _assert_taker_intact(store, taker)


def test_a_take_over_landing_between_the_check_and_the_write_of_a_renewal_leaves_no_lease(s3_url, flaky_s3):
    """The renewal found its claim current, then its lease's PUT hung while the claim was taken over."""
    store = ObjectStore(s3_url)
    mine = take_claim(store, PASS_CLAIM_KEY, holder={"host": "here", "pid": 1, "holder": "a"}, lease_s=0.5)
    mine_lease = lease_key(mine.key, mine.version, folder=mine.folder)
    held = flaky_s3.hold("PUT", f"/{mine_lease}")
    with flaky_s3.routed():
        slow = ObjectStore(s3_url)
    outcome: list[object] = []
    renewal = threading.Thread(target=lambda: outcome.append(renew_claim(slow, mine, holder="a", lease_s=0.5)))
    renewal.start()
    held.wait()
    time.sleep(0.7)  # its lease lapses while the write hangs
    taker = _take_over(store, PASS_CLAIM_KEY)
    held.release()
    renewal.join(60)
    assert outcome == [None]
    _assert_taker_intact(store, taker)
