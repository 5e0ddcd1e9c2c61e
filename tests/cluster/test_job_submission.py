"""A reduce job submitted to a Ray head on 127.0.0.1 writes its result (issue 7)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_jobs_accepted(address: str, env: dict) -> None:
    """The dashboard answers before its job agent is up; a trivial job tells when jobs run."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 150
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            client = JobSubmissionClient(address)
            job_id = client.submit_job(entrypoint="true")
            while str(client.get_job_status(job_id)).split(".")[-1] not in {"SUCCEEDED", "FAILED", "STOPPED"}:
                time.sleep(0.5)
            return
        except (RuntimeError, ConnectionError, OSError) as err:
            last_error = err
            time.sleep(2)
    raise TimeoutError(f"Ray head at {address} accepted no job within 150 s: {last_error}")


def stop_process_group(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    gcs_port, dashboard_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every listener on 127.0.0.1
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    temp_dir = tmp_path_factory.mktemp("ray")
    # --block keeps `ray start` in the foreground as the parent of this head's processes, so the
    # teardown stops exactly this head (its process group), never another Ray on the machine.
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={gcs_port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            # Ray's fixed default agent ports collide with any other Ray on the machine.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            "--block",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    previous_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the SDK client in this process must match the head
    try:
        wait_until_jobs_accepted(address, env)
        yield address, env
    finally:
        if previous_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth
        stop_process_group(head)


@pytest.mark.slow
def test_ray_job_submit_runs_reduce_and_result_lands(ray_head, tmp_path) -> None:
    address, env = ray_head
    runtime_env = json.dumps({"excludes": [".venv", ".git", "runs", "**/__pycache__"]})
    completed = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            runtime_env,
            "--",
            "python",
            "-m",
            "flows.cli",
            "reduce",
            "--data",
            "digits",
            "--k",
            "20",
            "--starts",
            "10",
            "--out",
            str(tmp_path),
        ],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "over 10 restarts" in completed.stdout
    summaries = list(tmp_path.glob("reduce-*/summary.json"))
    assert len(summaries) == 1
    assert json.loads(summaries[0].read_text())["k"] == 20


@pytest.mark.slow
def test_obliviate_submit_wrapper_waits_and_reports(ray_head, tmp_path) -> None:
    address, env = ray_head
    completed = subprocess.run(
        [
            str(BIN / "obliviate"),
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--",
            "reduce",
            "--data",
            "digits",
            "--k",
            "15",
            "--starts",
            "5",
            "--out",
            str(tmp_path),
        ],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "SUCCEEDED" in completed.stdout and "over 5 restarts" in completed.stdout
    assert len(list(tmp_path.glob("reduce-*/subset.npy"))) == 1


def test_submit_without_a_command_states_the_rule(capsys) -> None:
    from flows.cli import main

    assert main(["submit", "--address", "http://127.0.0.1:1"]) == 2
    assert "needs the obliviate command to run after '--'" in capsys.readouterr().err


def test_submit_to_an_address_nobody_answers_says_how_to_get_a_cluster(capsys):
    from flows.cli import main

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["submit", "--address", f"http://127.0.0.1:{port}", "--no-wait", "--", "reduce", "--k", "5"]) == 2
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at --address http://127.0.0.1:{port}" in err and "ray start --head" in err
