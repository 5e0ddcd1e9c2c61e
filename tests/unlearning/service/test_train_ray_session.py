"""Every `obliviate train` left a Ray session folder (`/tmp/ray/session_*`, logs and sockets) behind: Ray never removes
them. Now a train that succeeded on a local Ray runtime it started removes that runtime's folder at exit; a train that
failed keeps it (its logs), and a train that joined a cluster leaves the cluster's alone. So do the other commands that
start Ray (`reduce`, `steal`, ... all through `flows.cli.run`): checked here on `reduce` and `steal`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
TINY = ["--data", "digits", "--blocks", "2", "--epochs", "1", "--train-size", "200", "--heldout-size", "100"]
TINY_REDUCE = ["reduce", "--data", "digits", "--k", "10", "--starts", "2", "--workers", "2"]
# the smallest audit: one attacker, one selector, one budget, a few steps (tests/extraction/test_steal_flow.py's sizes)
TINY_STEAL = ["--pool", "mnist5k", "--budgets", "20", "--attackers", "basic", "--selectors", "random", "--seeds", "1"]
TINY_STEAL += ["--pool-size", "120", "--test-size", "100", "--steps", "15", "--attack-steps", "20", "--rounds", "0"]
TINY_STEAL += ["--consistency-steps", "0", "--num-cpus", "2"]


def _command(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> list[str]:
    """The words of a tiny ``obliviate <name>`` that starts Ray, storing under ``tmp_path``."""
    if name == "reduce":
        return [*TINY_REDUCE, "--store", f"file://{tmp_path}/store"]
    checkpoint = request.getfixturevalue("target_checkpoint")
    return ["steal", "--target", str(checkpoint), "--out", str(tmp_path / "report"), *TINY_STEAL]


@pytest.fixture
def ray_tmpdir():
    # Short: Ray's sockets live under it, and a Unix socket path holds at most 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _env(prefect_api_url: str, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    return env | {"PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "PYTHONUNBUFFERED": "1"} | extra


def _sessions(ray_tmpdir: Path) -> list[str]:
    """Ray's session folders under ``ray_tmpdir`` (not its ``session_latest`` link)."""
    ray_root = ray_tmpdir / "ray"
    if not ray_root.exists():
        return []
    return sorted(p.name for p in ray_root.iterdir() if p.name.startswith("session_") and not p.is_symlink())


def test_a_train_that_succeeded_on_its_own_ray_runtime_leaves_no_session_folder(tmp_path, prefect_api_url, ray_tmpdir):
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--store", f"file://{tmp_path}/store", "--run-id", "s1", *TINY],
        cwd=REPO,
        env=_env(prefect_api_url, RAY_TMPDIR=str(ray_tmpdir)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (ray_tmpdir / "ray").is_dir(), "Ray ran under RAY_TMPDIR"
    assert _sessions(ray_tmpdir) == []
    assert not (ray_tmpdir / "ray" / "session_latest").is_symlink(), "no link left pointing at the folder removed"


def test_a_train_stopped_midway_keeps_its_session_folder(tmp_path, prefect_api_url, ray_tmpdir):
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", "--store", f"file://{tmp_path}/store", "--run-id", "s2", *TINY],
        cwd=REPO,
        env=_env(prefect_api_url, RAY_TMPDIR=str(ray_tmpdir)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:  # printed once Ray has started
            seen.append(line)
            if line.startswith("Prefect API:"):
                process.send_signal(signal.SIGINT)
                break
        rest = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, "".join(seen)[-2000:] + rest[-2000:]
    assert len(_sessions(ray_tmpdir)) == 1


def test_a_train_that_joined_a_cluster_leaves_the_cluster_session_alone(tmp_path, prefect_api_url, ray_address):
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert session.is_dir()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--store", f"file://{tmp_path}/store", "--run-id", "s3", *TINY],
        cwd=REPO,
        env=_env(prefect_api_url, RAY_ADDRESS=ray_address),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert session.is_dir() and (session / "logs").is_dir()
    assert ray.cluster_resources().get("CPU") == 2


@pytest.mark.parametrize("name", ["reduce", "steal"])
def test_another_command_that_succeeded_on_its_own_ray_runtime_leaves_no_session_folder(
    name, tmp_path, prefect_api_url, ray_tmpdir, request
):
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *_command(name, tmp_path, request)],
        cwd=REPO,
        env=_env(prefect_api_url, RAY_TMPDIR=str(ray_tmpdir)),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (ray_tmpdir / "ray").is_dir(), "Ray ran under RAY_TMPDIR"
    assert _sessions(ray_tmpdir) == []
    assert not (ray_tmpdir / "ray" / "session_latest").is_symlink(), "no link left pointing at the folder removed"


@pytest.mark.parametrize("name", ["reduce", "steal"])
def test_another_command_stopped_midway_keeps_its_session_folder(name, tmp_path, prefect_api_url, ray_tmpdir, request):
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *_command(name, tmp_path, request)],
        cwd=REPO,
        env=_env(prefect_api_url, RAY_TMPDIR=str(ray_tmpdir)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        seen = []
        for line in process.stderr:  # printed once Ray has started
            seen.append(line)
            if line.startswith("Prefect API:"):
                process.send_signal(signal.SIGINT)
                break
        rest = process.communicate(timeout=120)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, "".join(seen)[-2000:] + rest[-2000:]
    assert len(_sessions(ray_tmpdir)) == 1


@pytest.mark.slow
def test_a_serve_stopped_by_ctrl_c_exits_0_and_leaves_no_session_folder(tmp_path, prefect_api_url, ray_tmpdir):
    """serve's Ctrl-C is its normal stop (exit 0, "stopped;"), so it counts as a success: its folder goes too."""
    (tmp_path / "home").mkdir()
    env = _env(
        prefect_api_url, RAY_TMPDIR=str(ray_tmpdir), HOME=str(tmp_path / "home")
    )  # a local Ray's token goes there
    command = [sys.executable, "-m", "flows.cli", "serve", "--store", f"file://{tmp_path}/store", "--workers", "1"]
    command += ["--audit-cron", "off", "--reconcile-cron", "0 0 1 1 *"]
    log = tmp_path / "serve.log"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while "deployments of" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert _sessions(ray_tmpdir), "serve runs on a local Ray runtime of its own"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    assert "obliviate serve: stopped;" in log.read_text()
    assert _sessions(ray_tmpdir) == []
