"""A cell that waits on a stalled HTTP target says so in the driver's log while it waits, naming the cell.

The cells of ``obliviate steal`` run on Ray workers, and Ray runs with ``log_to_driver=False``: a cell's
"target ... has not answered for N s" lines reached only its worker's log file, so the terminal (and the Prefect
flow run's log) showed nothing while a target stalled mid-audit. The command runs here as a user's does (its own
Ray, its stderr a pipe) against a real target server on 127.0.0.1 that holds a cell's first query unanswered.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

BUDGET = 20
# The first notice comes after obliviate.extraction.target.WAIT_NOTICE_AFTER_S (10 s) without an answer; the stall
# ends once the driver's log has said it, or after this long when it never does (the old code).
STALL_LIMIT_S = 45.0


def test_a_cell_waiting_on_a_stalled_target_is_said_in_the_drivers_log_while_it_waits(
    prefect_and_ray, target_checkpoint, tmp_path
):
    """The command uses the fixture's Prefect server (``PREFECT_API_URL``) and starts a Ray of its own."""
    from flows.model_server import TargetServer
    from obliviate.extraction.target import LocalTorchBackend, load_checkpoint

    model, meta = load_checkpoint(target_checkpoint)
    stalled, released = threading.Event(), threading.Event()

    class StallsTheCellsFirstQuery(LocalTorchBackend):
        """Answers as the model, but holds the first batch of BUDGET images (the cell's random selection)."""

        def predict(self, images, *, output):
            if len(images) == BUDGET and not released.is_set():
                stalled.set()
                released.wait(STALL_LIMIT_S)
            return super().predict(images, output=output)

    out = tmp_path / "report"
    grid = ["--budgets", str(BUDGET), "--attackers", "basic", "--selectors", "random", "--seeds", "1"]
    sizes = ["--pool-size", "100", "--test-size", "80", "--steps", "10", "--eps", "0.3", "--num-cpus", "2"]
    # one request waits out the stall (--timeout), so the notices say "--timeout, --retries"
    http = ["--timeout", "120", "--retries", "1"]
    cell = "basic/random k=20 seed=0"
    said: list[tuple[float, str]] = []
    waiting_said = threading.Event()
    with TargetServer(backend=StallsTheCellsFirstQuery(model, levels=256), info=meta) as server:
        waiting = re.compile(rf"{re.escape(cell)}: target {re.escape(server.url)} has not answered for \d+ s; retrying")
        command = ["steal", "--target", server.url, "--out", str(out), *grid, *sizes, *http]
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

        def read_stderr() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                said.append((time.monotonic(), line.rstrip("\n")))
                if waiting.search(line):
                    waiting_said.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            assert stalled.wait(240), "\n".join(line for _, line in said[-40:])
            stall_began = time.monotonic()
            said_while_stalled = waiting_said.wait(STALL_LIMIT_S - 5)
            said_after_s = time.monotonic() - stall_began
        finally:
            released.set()
            try:
                process.wait(timeout=300)  # not communicate(): it would read stderr too, beside the reader
            finally:
                if process.poll() is None:
                    process.kill()
                reader.join(10)
            assert process.stdout is not None
            stdout = process.stdout.read()  # two lines: they never fill the pipe
    log = "\n".join(line for _, line in said)
    assert process.returncode == 0, log[-4000:]
    # Said while the cell waited (the target still held its query), within seconds of the target's 10 s notice.
    assert said_while_stalled, f"no line naming the waiting cell in the driver's log while it waited:\n{log[-4000:]}"
    assert said_after_s < 25, said_after_s
    lines = [line for _, line in said]
    first_wait = next(i for i, line in enumerate(lines) if waiting.search(line))
    assert "WARNING" in lines[first_wait], lines[first_wait]
    assert "(--timeout, --retries)" in lines[first_wait], lines[first_wait]
    back = next(
        i for i, line in enumerate(lines) if f"{cell}: target {server.url} answers again, after" in line
    )  # said once more when it answered
    finished = next(i for i, line in enumerate(lines) if f"{cell}: accuracy" in line)
    assert first_wait < back < finished, (first_wait, back, finished)
    assert (out / "steal.md").exists() and stdout.strip(), stdout
    # The same lines in this flow run's log on the Prefect server (what its UI shows), from the task that waits.
    flow_run = re.search(r"/runs/flow-run/([0-9a-f-]{36})", log)
    assert flow_run, log[-4000:]
    kept = _flow_run_warnings(flow_run[1], f"{cell}: target {server.url} ")
    assert any("has not answered for" in line for line in kept) and any("answers again" in line for line in kept), kept


def _flow_run_warnings(flow_run_id: str, prefix: str) -> list[str]:
    """The flow run's warnings the Prefect server holds that start with ``prefix`` (its logs arrive in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel

    only = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]), level=LogFilterLevel(ge_=30))
    kept: list[str] = []
    for _ in range(20):
        with get_client(sync_client=True) as client:
            kept = [log.message for log in client.read_logs(log_filter=only) if log.message.startswith(prefix)]
        if len(kept) >= 2:
            break
        time.sleep(0.5)
    return kept
