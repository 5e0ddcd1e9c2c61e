"""A reduce job submitted to a Ray head on 127.0.0.1 writes its result (issue 7)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: held open together, so two of them can never be the same port."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


class HeadDied(RuntimeError):
    """The ``ray start`` head exited while starting (e.g. its dashboard agent lost a port race)."""


def wait_until_jobs_accepted(address: str, env: dict, head: subprocess.Popen | None = None) -> None:
    """The dashboard answers before its job agent is up; a trivial job tells when jobs run.

    Raises :class:`HeadDied` as soon as ``head`` exits: waiting out the 150 s for a dead head only hides why.
    """
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 150
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if head is not None and head.poll() is not None:
            raise HeadDied(f"the Ray head at {address} exited with {head.returncode} while starting: {last_error}")
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


def start_ray_head(temp_dir: Path, env: dict, *, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """A Ray head on 127.0.0.1 with free ports; returns its ``ray start`` process and dashboard address.

    ``extra``: more ``ray start`` options, e.g. ``--autoscaling-config=FILE``. What ``ray start`` prints is appended
    to ``temp_dir``'s ray_start.log (:func:`start_log_tail`), so a head that dies while starting says why.
    """
    gcs_port, dashboard_port, agent_port, agent_grpc_port, runtime_env_port, metrics_port, client_port = free_ports(7)
    # `ray start` records the head's GCS address here once it is up: one left by an earlier head that died would
    # name a dead head.
    (temp_dir / CURRENT_CLUSTER).unlink(missing_ok=True)
    log = (temp_dir / START_LOG).open("ab")
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
            f"--dashboard-agent-listen-port={agent_port}",
            f"--dashboard-agent-grpc-port={agent_grpc_port}",
            f"--runtime-env-agent-port={runtime_env_port}",
            f"--metrics-export-port={metrics_port}",
            f"--ray-client-server-port={client_port}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *extra,
            "--block",
        ],
        # Ray 2.60 drains a head for 30 s on SIGTERM (for Serve); nothing here needs it, and every teardown waited
        env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()  # the head holds its own copy
    return head, f"http://127.0.0.1:{dashboard_port}"


START_LOG = "ray_start.log"
#: The file in its temp dir where `ray start` records the head's GCS address (what --ray-address takes).
CURRENT_CLUSTER = "ray_current_cluster"


def start_log_tail(temp_dir: Path, *, chars: int = 2000) -> str:
    """The last ``chars`` characters ``ray start`` printed into ``temp_dir`` (see :func:`start_ray_head`)."""
    path = temp_dir / START_LOG
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(nothing printed)"


def ray_head_env(**settings: str) -> dict[str, str]:
    """This environment for a ``ray start`` head on 127.0.0.1: the venv's ``ray`` first on PATH, no usage stats."""
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every listener on 127.0.0.1
        "RAY_USAGE_STATS_ENABLED": "0",
        **settings,
    }


@contextlib.contextmanager
def started_head(
    temp_dir: Path,
    env: dict,
    *,
    ready: Callable[[subprocess.Popen, str], None],
    extra: tuple[str, ...] = (),
) -> Iterator[str]:
    """A head of :func:`start_ray_head` once ``ready(head, dashboard address)`` returns: its dashboard address.

    ``ready`` waits until the head is usable and raises :class:`HeadDied` if it exits meanwhile. A head that dies
    while starting is started again on fresh ports, twice at most: a port picked free can be taken by another
    process before Ray binds it (CI once saw the dashboard agent fail to bind, the raylet exit, and the start wait
    out its 150 s; the CI of 0b1c988 saw an autoscaling head exit 1 while starting).
    """
    head: subprocess.Popen | None = None
    try:
        for attempt in range(3):
            head, address = start_ray_head(temp_dir, env, extra=extra)
            try:
                ready(head, address)
                break
            except HeadDied as died:
                stop_process_group(head)
                if attempt == 2:
                    raise HeadDied(f"{died}; ray start printed: {start_log_tail(temp_dir)}") from died
        yield address
    finally:
        if head is not None:
            stop_process_group(head)


@contextlib.contextmanager
def jobs_head(temp_dir: Path, env: dict) -> Iterator[str]:
    """A head without auth that accepts jobs (this process's SDK client without auth too): its dashboard address."""
    previous_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the SDK client in this process must match the head
    try:
        with started_head(
            temp_dir, env, ready=lambda head, address: wait_until_jobs_accepted(address, env, head)
        ) as address:
            yield address
    finally:
        if previous_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = previous_auth


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    env = ray_head_env(RAY_AUTH_MODE="disabled")
    with jobs_head(tmp_path_factory.mktemp("ray"), env) as address:
        yield address, env


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
        # Ray's Jobs client let RAY_ADDRESS override --address: the job went to another cluster, or nowhere
        env={**env, "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}"},
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
    job = ["reduce", "--k", "5", "--store", "s3://bucket/obliviate"]
    assert main(["submit", "--address", f"http://127.0.0.1:{port}", "--no-wait", "--", *job]) == 2
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at --address http://127.0.0.1:{port}" in err and "ray start --head" in err


def test_submit_to_a_gcs_address_nobody_answers_is_refused_at_once(capsys, monkeypatch):
    """`--address 127.0.0.1:1` (no http://) hung 42 s in Ray's GCS client, then printed an RpcError traceback."""
    import time

    from flows.cli import main
    from flows.cli.submit import jobs_address

    job = ["reduce", "--k", "5", "--store", "s3://bucket/obliviate"]
    port = free_port()
    began = time.monotonic()
    assert main(["submit", "--address", f"127.0.0.1:{port}", "--no-wait", "--", *job]) == 2
    assert time.monotonic() - began < 20
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["submit", "--address", "ftp://head:8265", "--no-wait", "--", *job]) == 2
    assert "--address is the cluster's dashboard URL (http://HEAD:8265)" in capsys.readouterr().err
    # Ray's client lets RAY_ADDRESS override the address it is given; submit reads it only as the default
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere:8265")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert jobs_address("http://head:8265") == "http://head:8265"
    assert jobs_address(None) == "http://elsewhere:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    assert jobs_address(None) == "http://127.0.0.1:8265"


@pytest.mark.parametrize(
    ("job", "store_env", "refused"),
    [
        (["reduce", "--k", "5"], None, "file://./runs (the default store)"),
        (["reduce", "--k", "5"], "file://runs", "file://runs ($OBLIVIATE_STORE)"),
        (["train", "--run-id", "r1", "--store", "file://relative/store"], None, "file://relative/store (--store)"),
        (["steal", "--target", "/models/target.pt"], "s3://bucket/obliviate", "runs/steal (--out)"),
        (["demo"], None, "runs/demo (--out)"),
        (["reduce", "--k", "5", "--out", "/shared/out"], None, None),
        (["reduce", "--k", "5"], "s3://bucket/obliviate", None),
        (["train", "--run-id", "r1", "--store", "file:///shared/store"], None, None),
    ],
)
def test_submit_refuses_a_job_whose_results_would_be_deleted_with_its_working_dir(
    job, store_env, refused, capsys, monkeypatch
) -> None:
    from flows.cli import main

    if store_env is None:
        monkeypatch.delenv("OBLIVIATE_STORE", raising=False)
    else:
        monkeypatch.setenv("OBLIVIATE_STORE", store_env)
    port = free_port()  # nothing listens there: a job that passes the check fails on the connection
    assert main(["submit", "--address", f"http://127.0.0.1:{port}", "--no-wait", "--", *job]) == 2
    err = capsys.readouterr().err
    if refused is None:
        assert "no Ray cluster answers" in err, err
    else:
        assert f"the job would write to {refused}" in err, err
        assert "results would be lost" in err and "Nothing was sent to the cluster" in err


@pytest.mark.slow
def test_submit_to_a_token_cluster_says_how_to_authenticate(tmp_path, tmp_path_factory) -> None:
    """Ray 2.60's default: the head wants a token; the Jobs client sends one only with RAY_AUTH_MODE=token."""
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    env = ray_head_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    env.pop("RAY_AUTH_TOKEN", None)
    head, address = start_ray_head(tmp_path_factory.mktemp("ray"), env)  # short: Ray's socket paths
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the dashboard answers (401 without a token) once it is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(1)

        def submit(**client_env: str) -> subprocess.CompletedProcess:
            command = [str(BIN / "obliviate"), "submit", "--address", address, "--no-wait", "--working-dir"]
            command += [str(tmp_path), "--", "reduce", "--data", "digits", "--k", "5", "--out", str(tmp_path / "out")]
            return subprocess.run(
                command, env={**env, **client_env}, capture_output=True, text=True, timeout=120, check=False
            )

        without_token = submit(RAY_AUTH_MODE="disabled")
        assert without_token.returncode == 2, without_token.stdout + without_token.stderr
        assert "export RAY_AUTH_MODE=token" in without_token.stderr
        assert "Traceback" not in without_token.stderr
        wrong_token = submit(RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing"))
        assert wrong_token.returncode == 2, wrong_token.stdout + wrong_token.stderr
        said = wrong_token.stderr
        assert "refused the authentication token of this shell's" in said and "it is not the cluster's" in said
        assert "from RAY_AUTH_TOKEN" in said and "ray get-auth-token" in said and "Traceback" not in said
        with_token = submit()
        assert with_token.returncode == 0, with_token.stdout + with_token.stderr
        assert "submitted raysubmit_" in with_token.stdout
    finally:
        stop_process_group(head)


@pytest.mark.parametrize(
    ("job", "flag"),
    [
        (["steal", "--target", "runs/target.pt", "--out", "/shared/audit"], "--target runs/target.pt"),
        (["reduce", "--data", "runs/pool.npz", "--k", "5", "--out", "/shared/out"], "--data "),
    ],
)
def test_submit_refuses_a_job_reading_a_file_the_upload_leaves_out(job, flag, capsys, tmp_path, monkeypatch):
    """`steal --target runs/target.pt` was uploaded without runs/ and failed on the cluster, file not found."""
    from flows.cli import main

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "pool.npz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--no-wait", "--", *job]) == 2
    err = capsys.readouterr().err
    assert f"the job reads {flag}" in err and "inside runs/, which submit does not upload" in err, err
    moved = [part.replace("runs/", "models/") for part in job]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "pool.npz").write_bytes(b"")
    assert main(["submit", "--address", f"http://127.0.0.1:{free_port()}", "--no-wait", "--", *moved]) == 2
    assert "no Ray cluster answers" in capsys.readouterr().err  # past the check: it travels with the upload
