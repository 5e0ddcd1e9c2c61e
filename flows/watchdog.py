"""A watchdog process that makes ``obliviate serve``'s children die with it, even on ``kill -9``.

``serve`` starts it (:func:`start_watchdog`) in a session of its own. While ``serve`` lives, the
watchdog snapshots every process ``serve`` started (its descendants, from ``/proc``: the Prefect
server, the flow-run subprocesses, a local Ray head). When ``serve`` is gone, however it ended,
the watchdog kills the processes of the last snapshot that are still the same processes (same
start time, so a recycled pid is never hit) and marks the store's announcement stopped, so
``obliviate forget`` stops sending events to a dead server. Then it exits.

Linux only (``/proc``); elsewhere the watchdog only withdraws the announcement.

Run as ``python -m flows.watchdog --pid PID --store URL``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from storage.objects import ObjectStore  # imported up front: nothing heavy to load once serve is gone

ENDPOINT_KEY = "service/endpoint.json"  # = flows.unlearn.ENDPOINT_KEY; kept here so the watchdog stays light


def _stat(pid: int) -> tuple[int, int] | None:
    """``(parent pid, start time in clock ticks)`` of a live process, from ``/proc/<pid>/stat``."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """Every live descendant of ``pid``: ``{pid: start time}``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
            starts[int(entry.name)] = stat[1]
    out: dict[int, int] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if child in out or child == os.getpid():
            continue
        out[child] = starts[child]
        todo.extend(children.get(child, []))
    return out


def alive(pid: int, start: int | None = None) -> bool:
    stat = _stat(pid)
    return stat is not None and (start is None or stat[1] == start)


def watch(pid: int, store_url: str, *, poll_s: float = 1.0) -> int:
    """Wait for ``pid`` to end, then kill what it left behind and withdraw its announcement."""
    start = _stat(pid)
    if start is None:
        return 0
    snapshot: dict[int, int] = {}
    while alive(pid, start[1]):
        with contextlib.suppress(OSError):
            snapshot.update(descendants(pid))
            snapshot = {p: s for p, s in snapshot.items() if alive(p, s)}
        time.sleep(poll_s)
    killed = 0
    for child, child_start in snapshot.items():
        if alive(child, child_start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
                killed += 1
    withdrawn = withdraw_endpoint(ObjectStore(store_url), pid=pid)
    print(f"watchdog: serve {pid} ended; killed {killed} leftover process(es); announcement withdrawn: {withdrawn}")
    return 0


def withdraw_endpoint(store: ObjectStore, *, pid: int) -> bool:
    """Mark a serve's announcement stopped (only if it is still that serve's); returns whether it was."""
    with contextlib.suppress(Exception):
        body = store.get_json(ENDPOINT_KEY)
        if int(body.get("pid", -1)) == pid and not body.get("stopped_at"):
            store.put_json(ENDPOINT_KEY, {**body, "api_url": None, "stopped_at": time.time()})
            return True
    return False


def start_watchdog(store_url: str) -> subprocess.Popen:
    """Start the watchdog of this process (in its own session, so a group kill of serve spares it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.watchdog", "--pid", str(os.getpid()), "--store", store_url],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=os.getcwd(),
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
            ),
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.watchdog")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--store", required=True)
    args = parser.parse_args(argv)
    return watch(args.pid, args.store)


if __name__ == "__main__":
    sys.exit(main())
