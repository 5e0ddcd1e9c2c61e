"""Real servers for the reduction tests, all on 127.0.0.1 and started here.

* ``moto_endpoint``: a moto S3 server (the pattern s3fs's own suite uses), reset before each test.
* ``ray_runtime``: one local Ray runtime for the session (``address="local"``, no dashboard).
* ``prefect_harness``: Prefect's test harness (a temporary API server and database).

Fake credentials and the endpoint are put in the environment before Ray starts, so Ray's
worker processes inherit them as real deployments would.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest
import requests

_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
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
def s3_store(moto_endpoint):
    import s3fs

    from storage import ObjectStore

    requests.post(f"{moto_endpoint}/moto-api/reset", timeout=10).raise_for_status()
    s3fs.S3FileSystem.clear_instance_cache()
    store = ObjectStore(f"s3://test-bucket-{uuid.uuid4().hex[:8]}/runs")
    store.ensure_container()
    return store


@pytest.fixture
def file_store(tmp_path):
    from storage import ObjectStore

    return ObjectStore(f"file://{tmp_path}/store")


@pytest.fixture(params=["file", "s3"])
def store(request):
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="session")
def ray_runtime(moto_endpoint):
    import ray

    from flows.runtime import ensure_ray

    started = not ray.is_initialized()
    ensure_ray(address="local", num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
