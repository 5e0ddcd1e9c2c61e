"""Real servers for the service tests, all on 127.0.0.1 and started here.

* ``moto_endpoint``: a moto S3 server for the session; ``s3_url`` gives each test a fresh bucket.
* ``prefect_api_url``: a real ``prefect server start`` (events, triggers and schedules need one),
  through :func:`flows.runtime.prefect_api`.
* ``ray_address``: one local Ray runtime (``address="local"``); its address is exported so
  ``obliviate serve`` subprocesses and their flow runs join it instead of starting their own.
* ``serve``: starts ``python -m flows.cli serve`` for a store and stops it afterwards.

Credentials and endpoint are in the environment before Ray starts, so workers inherit them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = {name: os.environ.get(name) for name in [*_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(_CREDENTIALS)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def s3_url(moto_endpoint):
    import s3fs

    from storage import ObjectStore

    s3fs.S3FileSystem.clear_instance_cache()
    url = f"s3://svc-{uuid.uuid4().hex[:10]}/store"
    ObjectStore(url).ensure_container()
    return url


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory):
    from flows.runtime import prefect_api

    with prefect_api(home=tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@pytest.fixture(scope="session")
def ray_address(moto_endpoint):
    import ray

    from flows.runtime import ensure_ray

    previous = os.environ.get("RAY_ADDRESS")
    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(num_cpus=2)
    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address
    yield address
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


@pytest.fixture
def serve(prefect_api_url, ray_address, tmp_path):
    """Start ``obliviate serve`` for a store; returns (process, log path)."""
    started: list[subprocess.Popen] = []

    def start(store_url: str, *extra: str, timeout: float = 120.0) -> subprocess.Popen:
        from storage import ObjectStore

        store = ObjectStore(store_url)
        log = tmp_path / f"serve-{len(started)}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "RAY_ADDRESS": ray_address,
               "PREFECT_RUNNER_POLL_FREQUENCY": "2", "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--store", store_url, "--audit-cron", "off", *extra],
            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        started.append(process)
        process.log_path = log  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{log.read_text()[-3000:]}")
            if store.exists("service/endpoint.json") and store.get_json("service/endpoint.json")["pid"] == process.pid:
                return process
            time.sleep(0.5)
        raise RuntimeError(f"serve not ready after {timeout} s:\n{log.read_text()[-3000:]}")

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
