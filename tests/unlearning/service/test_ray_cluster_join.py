"""Commands joined to a running Ray cluster (README: RAY_ADDRESS / --ray-address), as a user's cluster is.

The ``ray_address`` fixture's runtime is started by the test process, so its workers inherit the test's
S3 credentials and endpoint; a real cluster's nodes were started elsewhere, without this shell's. The head
here is started by ``ray start --head`` with those variables removed, as such a node is.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
RAY = Path(sys.executable).with_name("ray")
#: What a node started elsewhere lacks: this shell's settings of the store, Prefect and S3.
SHELL_ONLY = ("AWS_", "OBLIVIATE_STORE", "PREFECT_API_URL", "RAY_ADDRESS")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def bare_cluster(moto_endpoint):
    """A Ray head (2 CPUs) started without this shell's AWS_* and store variables; yields its GCS address."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(SHELL_ONLY)} | {"RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--block",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard",
            "false",
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while subprocess.run(
        [str(RAY), "status", "--address", address], env=env, capture_output=True, check=False
    ).returncode:
        assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
        time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGTERM)  # --block: the head stops its own processes on SIGTERM
    head.wait(timeout=60)


def _driver_env(address: str) -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}


def test_a_task_on_a_joined_cluster_reads_s3_with_this_shells_credentials(bare_cluster, s3_url, run_python):
    """`reduce` joined to a cluster with an s3:// store failed "no usable credentials" (credentials set in the shell)."""
    from storage import ObjectStore

    ObjectStore(s3_url).put_json("probe.json", {"seen": "from the shell"})
    script = textwrap.dedent(
        f"""
        import ray
        from flows.runtime import ensure_ray

        def read(url):
            from storage import ObjectStore
            return ObjectStore(url).get_json("probe.json")

        ensure_ray()
        print("READ", ray.get(ray.remote(read).remote({s3_url!r})))
        """
    )
    done = run_python(script, env=_driver_env(bare_cluster), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "READ {'seen': 'from the shell'}" in done.stdout


def test_a_driver_inside_a_submitted_job_is_not_given_the_jobs_variables_twice(monkeypatch):
    """Ray refuses a ray.init whose runtime env names a variable the submitted job's runtime env sets."""
    import json

    from flows.runtime import cluster_runtime_env

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"AWS_ACCESS_KEY_ID": "k"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env_vars = cluster_runtime_env()["env_vars"]
    assert "AWS_ACCESS_KEY_ID" not in env_vars and env_vars["AWS_SECRET_ACCESS_KEY"] == "s"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert cluster_runtime_env()["env_vars"]["AWS_ACCESS_KEY_ID"] == "k"


def test_submit_forwards_the_variables_joined_drivers_forward(monkeypatch):
    from flows.cli.submit import job_runtime_env
    from flows.runtime import FORWARDED_ENV

    for name in FORWARDED_ENV:
        monkeypatch.setenv(name, f"v-{name}")
    assert job_runtime_env(".")["env_vars"] == {name: f"v-{name}" for name in FORWARDED_ENV}


def _cluster_jobs(address: str) -> list[dict]:
    """The drivers the cluster has seen (Ray's job table), read by a driver of its own."""
    script = (
        f"import json, ray; ray.init(address={address!r}); print(json.dumps(ray._private.state.jobs(), default=str))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_driver_env(address),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_steal_runs_its_cells_on_the_cluster_ray_address_names(bare_cluster, prefect_api_url, tmp_path):
    """`RAY_ADDRESS=... steal` started a local Ray runtime; `steal --ray-address` did not exist."""
    from flows.cli import main

    target = tmp_path / "target.pt"
    assert main(["target", "train", "--out", str(target), "--train-size", "300", "--steps", "5"]) == 0
    tiny = ["--attackers", "basic", "--selectors", "random", "--budgets", "20", "--seeds", "1", "--steps", "5"]
    small = ["--pool-size", "200", "--test-size", "100"]
    env = _driver_env(bare_cluster) | {"PREFECT_API_URL": prefect_api_url}
    env.pop("RAY_ADDRESS")
    # relative to the driver's folder, which the cluster's workers do not run in: they get the checkpoint's bytes
    steal = [sys.executable, "-m", "flows.cli", "steal", "--target", "target.pt", *tiny, *small]
    by_option = subprocess.Popen(
        [*steal, "--out", str(tmp_path / "a"), "--ray-address", bare_cluster],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = by_option.communicate(timeout=600)
    assert by_option.returncode == 0, err[-3000:]
    assert "audit report:" in out and (tmp_path / "a" / "steal.json").exists()
    by_variable = subprocess.Popen(
        [*steal, "--out", str(tmp_path / "b")],
        env=env | {"RAY_ADDRESS": bare_cluster},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = by_variable.communicate(timeout=600)
    assert by_variable.returncode == 0, err[-3000:]
    drivers = {int(job["DriverPid"]) for job in _cluster_jobs(bare_cluster) if str(job.get("DriverPid", "")).isdigit()}
    assert {by_option.pid, by_variable.pid} <= drivers
