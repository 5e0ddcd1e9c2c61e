"""Servers shared by every test folder, started here on 127.0.0.1.

* ``moto_endpoint``: one moto S3 server for the whole session (the pattern s3fs's own suite
  uses). Fake credentials and the endpoint go into the environment before any Ray runtime that
  needs them starts, so worker processes inherit them as real deployments would.
"""

from __future__ import annotations

import logging
import os
import socket

import pytest

FAKE_AWS_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = {name: os.environ.get(name) for name in [*FAKE_AWS_CREDENTIALS, "AWS_ENDPOINT_URL"]}
    os.environ.update(FAKE_AWS_CREDENTIALS)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
