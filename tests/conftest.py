"""Servers shared by every test folder, started here on 127.0.0.1.

* ``moto_endpoint``: one moto S3 server for the whole session (the pattern s3fs's own suite
  uses). Fake credentials and the endpoint go into the environment before any Ray runtime that
  needs them starts, so worker processes inherit them as real deployments would.
* ``flaky_s3``: a :class:`FlakyProxy` in front of that server, which a test takes down and brings
  back up to stage a real network outage (point ``AWS_ENDPOINT_URL`` at ``flaky_s3.endpoint``).
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


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of a server that the test can take down and bring back.

    While down, every open connection is cut and new ones are closed at once: the client sees a
    real network failure, not a simulated exception.
    """

    def __init__(self, target_port: int) -> None:
        import threading

        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.is_up = True
        self.refused = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self) -> None:
        with self._lock:
            self.is_up = False
            for sock in list(self._open):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self._open.clear()

    def up(self) -> None:
        self.is_up = True

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.is_up:
                self.refused += 1
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open.update({client, upstream})
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        self.down()


@pytest.fixture
def flaky_s3(moto_endpoint):
    proxy = FlakyProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()
