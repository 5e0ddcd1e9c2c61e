"""A store that stops answering is said, and waited for only so long (storage/retry.py's stall watch).

The endpoint is a real moto S3 server in its own process, frozen with SIGSTOP: it keeps
accepting connections (the kernel does) but never replies, as a hung or overloaded endpoint does.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from storage import ObjectStore, StorageUnavailable, retry
from storage.retry import RetryPolicy, retry_unavailable

ROOT = Path(__file__).resolve().parents[1]
NOTICE = re.compile(r"has not answered for (\d+) s; still waiting (?:and retrying )?until \d\d:\d\d:\d\d UTC")


class FreezableS3:
    """A moto S3 server in a child process that the test can freeze (SIGSTOP) and thaw (SIGCONT)."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        code = (
            "import logging, time; from moto.server import ThreadedMotoServer; "
            "logging.getLogger('werkzeug').setLevel(logging.ERROR); "
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={self.port}, verbose=False).start(); time.sleep(3600)"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.thaw()
        self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def frozen_s3(monkeypatch, fake_aws_credentials):
    server = FreezableS3()
    for name, value in {**fake_aws_credentials, "AWS_ENDPOINT_URL": server.endpoint}.items():
        monkeypatch.setenv(name, value)
    store = ObjectStore("s3://stall/p")
    store.ensure_container()
    store.put_json("runs/a.json", {"a": 1})
    yield server
    server.close()


@pytest.fixture
def notices():
    seen: list[tuple[float, str]] = []
    previous = retry.set_stall_reporter(lambda line: seen.append((time.monotonic(), line)))
    yield seen
    retry.set_stall_reporter(previous)


def _stderr_lines(process: subprocess.Popen[str], began: float) -> list[tuple[float, str]]:
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append((time.monotonic() - began, line.rstrip("\n")))

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_a_frozen_store_is_said_within_10_s_and_the_command_ends_after_the_thaw(frozen_s3):
    """`store check` against a frozen endpoint: a notice on stderr within ~10 s, the result after the thaw."""
    frozen_s3.freeze()
    began = time.monotonic()
    process = subprocess.Popen(
        [str(ROOT / ".venv/bin/obliviate"), "store", "check", "--store", "s3://stall/p"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=os.environ.copy(),
    )
    lines = _stderr_lines(process, began)
    # The command imports for a few seconds before its first call; the notice follows 10 s after that.
    while not any(NOTICE.search(line) for _, line in lines) and time.monotonic() - began < 25:
        time.sleep(0.2)
    stalled = [(at, line) for at, line in lines if NOTICE.search(line)]
    assert stalled, f"no stall notice within 25 s; stderr so far: {lines}"
    at, line = stalled[0]
    assert "s3://stall/p" in line and frozen_s3.endpoint in line and "Ctrl-C" in line
    waited = int(NOTICE.search(line).group(1))  # type: ignore[union-attr]
    assert 10 <= waited <= 12, line
    assert process.poll() is None  # still waiting, not failed
    frozen_s3.thaw()
    thawed = time.monotonic()
    process.wait(timeout=20)
    assert process.returncode == 0, lines
    print(f"notice after {at:.1f} s ({line!r}); exit {time.monotonic() - thawed:.1f} s after the thaw")
    assert any("answers again" in line for _, line in lines), lines
    assert not any("Traceback" in line for _, line in lines), lines


@pytest.mark.parametrize("command", [["store", "check"], ["forget", "--status", "del-0123456789abcdef"]])
def test_a_store_frozen_past_the_limit_ends_the_command_with_a_storage_error(frozen_s3, monkeypatch, capsys, command):
    """Past the call limit a frozen endpoint ends the command with exit 2 and the error's sentence."""
    from flows.cli import build_app, main

    build_app()  # the commands' imports, before the clock starts
    monkeypatch.setattr(retry, "CALL_LIMIT_S", 3.0, raising=False)
    monkeypatch.setattr(retry, "LISTING_LIMIT_S", 3.0, raising=False)
    monkeypatch.setattr(retry, "STALL_NOTICE_AFTER_S", 1.0, raising=False)
    frozen_s3.freeze()
    began = time.monotonic()
    codes: list[int] = []
    # In a thread, so that a command that hangs fails this test instead of holding the suite.
    runner = threading.Thread(target=lambda: codes.append(main([*command, "--store", "s3://stall/p"])), daemon=True)
    runner.start()
    runner.join(timeout=30)
    elapsed = time.monotonic() - began
    err = capsys.readouterr().err
    assert codes == [2], f"after {elapsed:.0f} s: exit {codes}; stderr: {err}"
    assert f"obliviate {command[0]}" in err and ": error: storage at s3://stall/p" in err, err
    assert re.search(r"has not answered for [34] s: the endpoint at http", err) and frozen_s3.endpoint in err, err
    # the notice came first, about 1 s in (its watcher ticks late on a loaded machine: 2 s seen in CI)
    notice = re.search(r"has not answered for [12] s; still waiting", err)
    assert notice and notice.start() < err.index(": error: storage at"), err
    assert "Traceback" not in err
    print(f"{' '.join(command)}: exit 2 after {elapsed:.1f} s; {err}")


def test_retries_during_an_outage_end_by_their_deadline(frozen_s3, monkeypatch, notices):
    """Inside retry_unavailable a frozen endpoint cannot hold the retries past their deadline."""
    monkeypatch.setattr(retry, "CALL_LIMIT_S", 2.0)
    monkeypatch.setattr(retry, "STALL_NOTICE_AFTER_S", 1.0)
    store = ObjectStore("s3://stall/p")
    assert store.exists("runs/a.json")
    frozen_s3.freeze()
    began = time.monotonic()
    raised: list[StorageUnavailable] = []

    def read() -> None:
        try:
            retry_unavailable(lambda: store.get_json("runs/a.json"), policy=RetryPolicy(deadline_s=6.0))
        except StorageUnavailable as err:
            raised.append(err)

    runner = threading.Thread(target=read, daemon=True)
    runner.start()
    runner.join(timeout=30)
    elapsed = time.monotonic() - began
    assert raised, f"after {elapsed:.0f} s: {raised}"
    assert re.search(r"has not answered for (\d+) s", str(raised[0])), raised[0]
    assert int(re.search(r"has not answered for (\d+) s", str(raised[0])).group(1)) >= 6  # type: ignore[union-attr]
    assert elapsed < 6.0 + retry.OUTAGE_CALL_MIN_S + 1, elapsed
    assert notices and "has not answered for 1 s" in notices[0][1], notices
    frozen_s3.thaw()
    assert store.get_json("runs/a.json") == {"a": 1}
    assert "answers again" in notices[-1][1], notices


def test_a_transfer_in_flight_is_given_time_before_it_is_reported(monkeypatch, notices):
    """A long transfer is not a stall while its bytes may still move: its notice waits by its size."""
    monkeypatch.setattr(retry, "STALL_NOTICE_AFTER_S", 0.5)
    monkeypatch.setattr(retry, "STALL_NOTICE_BYTES_PER_S", 1024 * 1024)
    with retry.watched_call("s3://slow/upload", "http://127.0.0.1:9", payload_bytes=8 * 1024 * 1024):
        time.sleep(2.5)  # 8 MiB at 1 MiB/s: not due before 8.5 s
    assert notices == []
    with retry.watched_call("s3://slow/list", "http://127.0.0.1:9"):
        time.sleep(2.5)
    assert len(notices) == 2, notices
    assert "s3://slow/list (endpoint http://127.0.0.1:9) has not answered for 0 s" not in notices[0][1]
    assert "s3://slow/list (endpoint http://127.0.0.1:9) has not answered for" in notices[0][1]
    assert "answers again" in notices[1][1]


def test_a_long_call_that_keeps_getting_answers_is_not_cut_or_reported(monkeypatch, notices):
    """Each answer of the store (a listing's page, an upload's part) restarts the limit and the notice clock."""
    monkeypatch.setattr(retry, "CALL_LIMIT_S", 1.0)
    monkeypatch.setattr(retry, "STALL_NOTICE_AFTER_S", 0.8)
    with retry.watched_call("s3://busy/pages", None):
        for _ in range(10):  # 2.5 s in all, an answer every 0.25 s
            time.sleep(0.25)
            retry.heard_from("s3://busy/pages", None)
            assert not retry.call_overdue()
        silent_from = time.monotonic()
        time.sleep(1.3)  # then silence past the limit
        assert retry.call_overdue()
    assert all(at >= silent_from + 0.7 for at, line in notices if "has not answered" in line), notices


def test_once_a_call_was_abandoned_the_next_ones_end_sooner(frozen_s3, monkeypatch, notices):
    """A known outage (nobody answered for the call limit) is not waited out again in full by each later call."""
    monkeypatch.setattr(retry, "CALL_LIMIT_S", 3.0)
    monkeypatch.setattr(retry, "KNOWN_OUTAGE_CALL_S", 1.0, raising=False)
    monkeypatch.setattr(retry, "STALL_NOTICE_AFTER_S", 1.5)  # longer than each short call
    monkeypatch.setattr(retry, "STALL_NOTICE_EVERY_S", 2.0)
    store = ObjectStore("s3://stall/p")
    frozen_s3.freeze()
    took = []
    for _ in range(6):
        began = time.monotonic()
        with pytest.raises(StorageUnavailable, match="has not answered for"):
            store.exists("runs/a.json")
        took.append(time.monotonic() - began)
        time.sleep(0.1)  # a caller between its calls (a progress poll)
    assert 3.0 <= took[0] < 4.5 and max(took[1:]) < 2.0, took
    # The short calls of the outage are still reported (every 2 s here): each is late into a long outage.
    later = [line for at, line in notices if at > began - sum(took[1:]) and "has not answered" in line]
    assert len(later) >= 2, notices
