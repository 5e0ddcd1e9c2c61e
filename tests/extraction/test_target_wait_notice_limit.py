"""The waiting line of a target that cannot be reached names the limit it is retried under, and when that ends.

A target whose connections are refused fails each attempt at once: ``--retries`` are spent in their pauses (about
1.4 s by default) and ``--target-wait`` decides when the request gives up, as its error then says ("retried for
--target-wait N s"). The waiting line said "(--timeout, --retries)" and a time (retries + 1) x --timeout later instead
whenever --target-wait was not longer than that: with the defaults too (4 x 30 s + pauses = 121.4 s > 120 s). Seen in
a sharded ``steal`` whose target stayed down (test_cell_target_stays_down.py).
"""

from __future__ import annotations

import re
import socket
import time

import pytest

import obliviate.extraction.target as target_module
from obliviate.extraction.target import HttpBackend, TargetUnavailable


def _nothing_listens() -> str:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{free.getsockname()[1]}/predict"


def _said_until(line: str) -> float:
    """The UTC time of day a waiting line says the request is retried until, as seconds since midnight."""
    hours, minutes, seconds = map(int, re.search(r"retrying until (\d\d):(\d\d):(\d\d) UTC", line).groups())
    return hours * 3600 + minutes * 60 + seconds


@pytest.mark.parametrize(
    ("retries", "wait_s", "limit"),
    [(3, 2.5, "--target-wait"), (6, 1.0, "--retries")],  # 6 retries: pauses 0.2 .. 4 s, 10.2 s in all
    ids=["window-decides", "retry-pauses-decide"],
)
def test_a_refused_targets_waiting_line_names_the_limit_that_ends_the_wait(monkeypatch, retries, wait_s, limit):
    monkeypatch.setattr(target_module, "WAIT_NOTICE_AFTER_S", 0.5)
    url = _nothing_listens()
    lines: list[str] = []
    backend = HttpBackend(url, timeout_s=30, retries=retries, backoff_s=0.2, wait_s=wait_s, on_wait=lines.append)
    began = time.time()
    with pytest.raises(TargetUnavailable) as failed:
        backend.info()
    gave_up = time.time()
    assert lines, "no waiting line"
    assert re.fullmatch(
        rf"target {re.escape(url)} has not answered for \d+ s; retrying until \d\d:\d\d:\d\d UTC \({limit}\)", lines[0]
    ), lines[0]
    # The time said is when it gave up (to the second), not (retries + 1) x --timeout after it began.
    midnight = began - began % 86400
    assert _said_until(lines[0]) - 1 <= gave_up - midnight <= _said_until(lines[0]) + 2, (lines[0], gave_up - began)
    if limit == "--target-wait":
        assert f"retried for --target-wait {wait_s:g} s" in str(failed.value), failed.value
