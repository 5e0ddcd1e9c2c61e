"""A cell of ``obliviate steal`` whose HTTP target goes down and stays down past ``--target-wait``.

7d57e52 made a cell's waiting lines ("target ... has not answered for N s") travel from its Ray worker to the driver
(a WaitLines actor the driver drains), and tested it against a target that answered again. Here the target is a real
``obliviate target serve`` process, stopped once the audit has its test labels, and the command runs as a user's does
(its own Ray, the cells on its workers, its stderr a pipe): the cell's waiting line, naming the cell and the limit
(--target-wait), must reach the driver's log before the error that ends the audit, which names the cell, the wait, the
endpoint and how many cells had finished; the error comes as the wait runs out (the cells still running, or queued, hold
nothing up); the flow run's state on the Prefect server is Failed with that reason; and no report is written (the
report needs every cell: README, HTTP targets).

Found so: the waiting line said "(--timeout, --retries)" and a time past the give-up (--target-wait not longer than
(retries + 1) x --timeout; obliviate/extraction/target.py), and the error did not say which cell failed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

# Above obliviate.extraction.target.WAIT_NOTICE_AFTER_S (10 s): a cell says it waits once before it gives up.
TARGET_WAIT_S = 16
SEEDS = 3  # three cells on two CPUs: two run, one waits in the queue


def _start_target(checkpoint) -> tuple[subprocess.Popen, str]:
    """``obliviate target serve`` of ``checkpoint`` on a free port: the process and its predict URL."""
    command = [sys.executable, "-m", "flows.cli", "target", "serve", "--checkpoint", str(checkpoint), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert server.stdout is not None
    serving = server.stdout.readline()
    url = re.search(r" at (http://127\.0\.0\.1:\d+/predict) ", serving)
    assert url, serving + (server.stderr.read() if server.poll() is not None else "")
    return server, url[1]


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def _flow_run_state(flow_run_id: str):
    """The state the Prefect server recorded for the flow run."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def test_a_cell_whose_target_stays_down_says_it_waited_then_fails_the_audit_in_words(
    prefect_and_ray, target_checkpoint, tmp_path
):
    """The command uses the fixture's Prefect server (``PREFECT_API_URL``) and starts a Ray of its own."""
    out = tmp_path / "report"
    server, url = _start_target(target_checkpoint)
    grid = ["--budgets", "20", "--attackers", "basic", "--selectors", "random", "--seeds", str(SEEDS)]
    sizes = ["--pool-size", "100", "--test-size", "80", "--steps", "10", "--eps", "0.3", "--num-cpus", "2"]
    http = ["--timeout", "10", "--retries", "1", "--target-wait", str(TARGET_WAIT_S)]
    command = ["steal", "--target", url, "--out", str(out), *grid, *sizes, *http]
    said: list[str] = []
    heard_at: list[float] = []  # when the test read each line of ``said``
    stopped_at: list[float] = []
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

        def read_stderr() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                said.append(line.rstrip("\n"))
                heard_at.append(time.monotonic())
                # The audit has the target's labels on its test set: every later query is a cell's. The target goes
                # down now, and stays down (whether a cell's first query got through first or not, its transfer
                # queries come after).
                if not stopped_at and "target accuracy on 80 test images" in line:
                    _stop(server)
                    stopped_at.append(time.monotonic())

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            process.wait(timeout=360)  # not communicate(): it would read stderr too, beside the reader
        finally:
            if process.poll() is None:
                process.kill()
            reader.join(10)
        assert process.stdout is not None
        stdout = process.stdout.read()
    finally:
        _stop(server)
    log = "\n".join(said)
    assert stopped_at, f"the audit never had its test labels:\n{log[-4000:]}"
    assert process.returncode not in (0, None), (process.returncode, log[-4000:])
    assert "Traceback" not in log, log[-4000:]
    assert not stdout.strip(), stdout  # no summary of an audit that did not end

    cells = [f"basic/random k=20 seed={seed}" for seed in range(SEEDS)]
    waiting = re.compile(
        rf"WARNING .*({'|'.join(map(re.escape, cells))}): target {re.escape(url)} has not answered for \d+ s; retrying"
    )
    first_wait = next((i for i, line in enumerate(said) if waiting.search(line)), None)
    assert first_wait is not None, f"no waiting line naming a cell:\n{log[-4000:]}"
    # refused connections: the window is the limit, as the error says (not --timeout, --retries)
    assert said[first_wait].endswith(" UTC (--target-wait)"), said[first_wait]
    error = next((i for i, line in enumerate(said) if line.startswith("obliviate steal: error:")), None)
    assert error is not None, log[-4000:]
    assert first_wait < error, (first_wait, error)  # drained and logged before the error is reported
    reason = said[error].removeprefix("obliviate steal: error: ")
    failed_cell = next((cell for cell in cells if reason.startswith(f"{cell}: ")), None)
    assert failed_cell is not None, reason  # the cell that failed, as its waiting lines name it
    assert url in reason and f"--target-wait {TARGET_WAIT_S} s" in reason, reason
    assert reason.endswith(f"The audit stops: 0 of its {SEEDS} cells had finished."), reason
    # Said by the flow run's state line and by the command; the failing task's own state line said it a third time.
    assert sum(f"The audit stops: 0 of its {SEEDS} cells" in line for line in said) == 2, log[-4000:]
    assert not any("accuracy" in line and "agreement with the target" in line for line in said), log[-4000:]
    # The first waiting line comes 10 s into a cell's wait, the error when its --target-wait has run out: about
    # 6 s on. The cells still running, and the one queued behind them, hold it up no further (the queued cell's own
    # wait would be another 16 s).
    assert heard_at[error] - heard_at[first_wait] < TARGET_WAIT_S, (heard_at[error] - heard_at[first_wait], log)

    # The flow run's recorded state on the Prefect server: Failed, its message the same reason.
    flow_run = re.search(r"/runs/flow-run/([0-9a-f-]{36})", log)
    assert flow_run, log[-4000:]
    state = _flow_run_state(flow_run[1])
    assert state is not None and state.is_failed(), state
    message = state.message or ""
    assert f"{failed_cell}: " in message and url in message and "The audit stops: 0 of its" in message, message
    # The report needs every cell: none is written, and no empty folder is left.
    assert not out.exists(), sorted(p.name for p in out.iterdir())
