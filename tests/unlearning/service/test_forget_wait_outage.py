"""`forget --wait` met a store outage after it had filed the request: it exited 2 ("refused") within seconds,
said "retry" and not that the request was recorded, so a rerun without --request-id filed a duplicate."""

from __future__ import annotations

import json
import re
import threading
import time

from flows.cli import main
from flows.cli.forget import EXIT_PENDING, EXIT_UNREACHABLE
from storage import ObjectStore
from storage.ledger import DeletionLedger


def _forget_waiting(
    s3_url, flaky_s3, monkeypatch, *, wait_s: float, back_after_s: float | None = None
) -> tuple[int, float]:
    """``forget --ids 3 --wait`` through the proxy, which goes down at the wait's second look at the status.

    ``back_after_s``: the store answers again that long after it went down (``None``: not before the command ends).
    """
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # the submission reads the status it wrote 3 times (each test checks it printed "pending" before the outage),
    # then the wait looks every 0.5 s: the store goes down at its second look
    crash = flaky_s3.down_at("GET", "ledger/status/r1/v000000001.json", after=4)
    done = threading.Event()

    def bring_back() -> None:
        while not crash.refused and not done.wait(0.05):
            pass
        if not done.wait(back_after_s):
            flaky_s3.up()

    if back_after_s is not None:
        threading.Thread(target=bring_back, daemon=True).start()
    argv = ["forget", "--store", s3_url, "--ids", "3", "--request-id", "r1", "--no-event", "--wait", str(wait_s)]
    began = time.monotonic()
    try:
        with flaky_s3.routed():
            code = main(argv)
    finally:
        done.set()
    return code, time.monotonic() - began


def test_a_store_down_until_the_wait_ends_says_the_request_is_recorded(s3_url, flaky_s3, capsys, monkeypatch):
    # 18 s: the store goes down at the wait's second look, which a loaded machine may take seconds to reach (CI of
    # 1649490: at 13 s the outage was under the 10 s the stall notice waits for when the wait ended)
    code, took = _forget_waiting(s3_url, flaky_s3, monkeypatch, wait_s=18)
    out = capsys.readouterr()
    assert flaky_s3.refused > 0  # the wait did meet the outage
    assert code == EXIT_UNREACHABLE, out.err
    assert 15 < took < 60, (took, out.err)  # retried while the wait lasted, not given up in seconds
    assert out.err.startswith("request r1: pending; recorded in the ledger"), out.err
    # The notice names the later of the call's own bound and the retries' deadline; which one is later depends on
    # when, within the wait, the call in flight began (under load the first call can outlast the wait's end or not).
    assert re.search(
        r"has not answered for 1\d s; still waiting (and retrying )?until \d\d:\d\d:\d\d UTC at the latest", out.err
    ), out.err
    last = out.err.strip().splitlines()[-1]
    assert last.startswith("storage stayed unreachable until the wait ended (18 s): storage at "), last
    assert "Request r1 is recorded in the ledger and stays there" in last, last
    assert "`obliviate forget --status r1` tells its state" in last and "do not rerun forget --ids" in last, last
    assert "error:" not in out.err and "network and retry" not in out.err and "Traceback" not in out.err
    assert json.loads(out.out) == {
        "request_id": "r1",
        "settled": False,
        "store_unreachable": json.loads(out.out)["store_unreachable"],
    }
    flaky_s3.up()
    assert DeletionLedger(ObjectStore(s3_url)).request_ids() == ["r1"]  # one request, filed before the outage


def test_a_store_back_before_the_wait_ends_is_waited_on_as_usual(s3_url, flaky_s3, capsys, monkeypatch):
    # one call to a store that is down fails after about 11 s of s3fs's own retries: back after 14 s, the wait
    # has met a failed call and must look again
    code, _ = _forget_waiting(s3_url, flaky_s3, monkeypatch, wait_s=22, back_after_s=14)
    out = capsys.readouterr()
    assert flaky_s3.refused > 0
    assert code == EXIT_PENDING, out.err  # no serve: still pending when the wait ended, as without the outage
    assert out.err.strip().endswith("still not settled after 22 s (the request stays in the ledger)"), out.err
    assert out.err.startswith("request r1: pending; recorded in the ledger"), out.err
    assert "answers again, after 1" in out.err, out.err
    assert json.loads(out.out)["status"] == "pending" and "error:" not in out.err


def test_now_with_wait_meets_an_outage_as_a_wait_for_one_request_does(s3_url, flaky_s3, capsys, monkeypatch):
    """`forget --now --wait` (probe107) waits for the requests it flushes: an outage while it waits is retried
    until the wait ends, then exit 8 saying the flush and the requests stay recorded, as for --ids --wait."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    filed = ["forget", "--store", s3_url, "--ids", "3", "--request-id", "r1", "--no-event"]
    assert main(filed) == 0
    capsys.readouterr()
    # --now reads the request's record (and its checksum) once before the wait, the wait once per look: the store
    # goes down at the wait's second look
    crash = flaky_s3.down_at("GET", "ledger/requests/r1.json", after=4)
    began = time.monotonic()
    with flaky_s3.routed():
        code = main(["forget", "--store", s3_url, "--now", "--wait", "13"])
    took = time.monotonic() - began
    out = capsys.readouterr()
    assert crash.refused and code == EXIT_UNREACHABLE, out.err
    assert 10 < took < 60, (took, out.err)
    assert "waiting up to 13 s for the 1 request(s) the flush takes: r1" in out.err
    last = out.err.strip().splitlines()[-1]
    assert last.startswith("storage stayed unreachable until the wait ended (13 s): storage at "), last
    assert "The flush is asked and the requests (r1) are recorded in the ledger and stay there" in last, last
    assert "Traceback" not in out.err and "error:" not in out.err
    assert json.loads(out.out)["settled"] is False and json.loads(out.out)["requests"] == ["r1"]
    flaky_s3.up()
    assert DeletionLedger(ObjectStore(s3_url)).current_status("r1") == "pending"
