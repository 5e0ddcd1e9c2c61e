"""Servers shared by every test folder, started here on 127.0.0.1.

* ``moto_endpoint``: one moto S3 server for the whole session (the pattern s3fs's own suite
  uses). Fake credentials and the endpoint go into the environment before any Ray runtime that
  needs them starts, so worker processes inherit them as real deployments would.
* ``flaky_s3``: a :class:`FlakyProxy` in front of that server, which a test takes down and brings
  back up to stage a real network outage (point ``AWS_ENDPOINT_URL`` at ``flaky_s3.endpoint``), or
  in which it holds one request in flight (:meth:`FlakyProxy.hold`) to stage a race at a known point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

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
    real network failure, not a simulated exception. A held request (:meth:`hold`) is a slow network:
    it reaches the server, unchanged, once the test releases it.
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
        self._holds: list[Hold] = []
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

    @contextlib.contextmanager
    def routed(self) -> Iterator[None]:
        """Stores made inside reach S3 through this proxy (a store reads ``AWS_ENDPOINT_URL`` once, when made)."""
        previous = os.environ.get("AWS_ENDPOINT_URL")
        os.environ["AWS_ENDPOINT_URL"] = self.endpoint
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("AWS_ENDPOINT_URL", None)
            else:
                os.environ["AWS_ENDPOINT_URL"] = previous

    def hold(self, *markers: str) -> Hold:
        """Hold the next request whose request line (``PUT /bucket/key HTTP/1.1``) names all ``markers``.

        It stays in the proxy, not yet sent on to the server, until :meth:`Hold.release`; the
        client waits for its answer as on a slow link, and every other request passes meanwhile.
        A test thereby does something between a component's earlier requests and that one, the
        way a concurrent writer would, deterministically.
        """
        held = Hold([m.encode() for m in markers])
        with self._lock:
            self._holds.append(held)
        return held

    def _held(self, chunk: bytes) -> Hold | None:
        line = chunk.split(b"\r\n", 1)[0]
        if not line.endswith((b"HTTP/1.1", b"HTTP/1.0")):
            return None
        with self._lock:
            for held in self._holds:
                if not held.arrived.is_set() and all(m in line for m in held.markers):
                    held.request_line = line.decode(errors="replace")
                    held.arrived.set()
                    return held
        return None

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
            for source, sink, to_server in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(source, sink, to_server), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, to_server: bool = False) -> None:
        try:
            while chunk := source.recv(65536):
                held = self._held(chunk) if to_server and self._holds else None
                if held is not None:
                    held.released.wait(120)
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
        with self._lock:
            for held in self._holds:
                held.release()
        self.down()


class Hold:
    """One request :meth:`FlakyProxy.hold` keeps in flight: ``wait()`` until it arrives, then ``release()`` it."""

    def __init__(self, markers: list[bytes]) -> None:
        import threading

        self.markers = markers
        self.arrived = threading.Event()
        self.released = threading.Event()
        self.request_line = ""

    def wait(self, timeout: float = 60.0) -> str:
        """Block until the request is held; returns its request line.

        Raises:
            AssertionError: no such request came within ``timeout`` seconds.
        """
        assert self.arrived.wait(timeout), f"no request naming {self.markers} reached the proxy in {timeout} s"
        return self.request_line

    def release(self) -> None:
        self.released.set()


@pytest.fixture
def flaky_s3(moto_endpoint):
    proxy = FlakyProxy(int(moto_endpoint.rsplit(":", 1)[1]))
    yield proxy
    proxy.close()
