"""Servers shared by every test folder, started here on 127.0.0.1.

* ``moto_endpoint``: one moto S3 server for the whole session (the pattern s3fs's own suite
  uses). Fake credentials and the endpoint go into the environment before any Ray runtime that
  needs them starts, so worker processes inherit them as real deployments would.
* ``flaky_s3``: a :class:`FlakyProxy` in front of that server, which a test takes down and brings
  back up to stage a real network outage (point ``AWS_ENDPOINT_URL`` at ``flaky_s3.endpoint``), or
  in which it holds one request in flight (:meth:`FlakyProxy.hold`) to stage a race at a known point,
  refuses some requests as S3 does (:meth:`FlakyProxy.fail`: a read-only store) or goes down at a
  known request (:meth:`FlakyProxy.down_at`: a crash mid-operation).

And the set-up tests in several folders share: ``train_target`` / ``target_checkpoint`` (a tiny target
from ``obliviate target train``), ``child_env`` / ``run_python`` (a ``python -c`` child that imports this
repository), ``fake_aws_credentials`` (for a test's own moto server) and ``public_names`` (a module's public
names, which a package's ``__all__`` is held to).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_AWS_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def fake_aws_credentials() -> dict[str, str]:
    """The fake AWS credentials a test's own moto server is reached with (a copy: changing it changes no other test)."""
    return dict(FAKE_AWS_CREDENTIALS)


@pytest.fixture(scope="session")
def train_target(tmp_path_factory):
    """``train_target(steps=...)``: a new folder's checkpoint by ``obliviate target train`` on 300 mnist5k images."""

    def train(*, steps: int) -> Path:
        from flows.cli import main

        path = tmp_path_factory.mktemp("target") / "target.pt"
        assert main(["target", "train", "--out", str(path), "--train-size", "300", "--steps", str(steps)]) == 0
        return path

    return train


@pytest.fixture(scope="module")
def target_checkpoint(train_target) -> Path:
    """One test module's tiny target: ``obliviate target train`` on 300 mnist5k images, 60 steps."""
    return train_target(steps=60)


def _public_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                names.update(e.id for e in elements if isinstance(e, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


@pytest.fixture(scope="session")
def public_names():
    """``public_names(path)``: top-level functions, classes and assigned names of a module not starting with ``_``."""
    return _public_names


@pytest.fixture
def child_env():
    """``child_env(*names)``: this process's environment now, less ``names``, with the repository on ``PYTHONPATH``."""

    def env(*without: str) -> dict[str, str]:
        return {name: value for name, value in os.environ.items() if name not in without} | {"PYTHONPATH": str(REPO)}

    return env


@pytest.fixture
def run_python():
    """``run_python(script, *args, env=..., timeout=...)``: ``python -c script`` run in the repository, output kept."""

    def run(script: str, *args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run


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
    it reaches the server, unchanged, once the test releases it. A refused request (:meth:`fail`) is
    answered as S3 answers a request it denies, and a crash (:meth:`down_at`) is the store lost at a
    known request; every other request passes unchanged.
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
        self._faults: list[Fault] = []
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

    def fail(self, *markers: str, status: int = 403, times: int | None = None) -> Fault:
        """Answer requests whose request line names all ``markers`` with S3's error for ``status``, unsent.

        403 is ``AccessDenied`` (a bucket policy or read-only credentials: s3fs raises PermissionError
        at once, no retry), 503 ``SlowDown`` (which botocore and s3fs retry). The first ``times``
        such requests are refused (``None``: every one until :meth:`Fault.stop`); the server never
        sees them, so what it stores is what a refusal leaves.
        """
        if status not in _S3_ERRORS:
            raise ValueError(f"FlakyProxy.fail answers {sorted(_S3_ERRORS)}; got status {status}")
        fault = Fault([m.encode() for m in markers], status=status, times=times)
        with self._lock:
            self._faults.append(fault)
        return fault

    def down_at(self, *markers: str, after: int = 0) -> Fault:
        """Let ``after`` requests naming all ``markers`` through, then go :meth:`down` as the next one arrives.

        That request never reaches the server, nor does any later one until :meth:`up`: the store as
        a process killed at that request left it (its later calls fail as on a lost connection).
        """
        fault = Fault([m.encode() for m in markers], after=after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def _held(self, chunk: bytes) -> Hold | None:
        line = _request_line(chunk)
        if line is None:
            return None
        with self._lock:
            for held in self._holds:
                if not held.arrived.is_set() and all(m in line for m in held.markers):
                    held.request_line = line.decode(errors="replace")
                    held.arrived.set()
                    return held
        return None

    def _faulted(self, chunk: bytes) -> Fault | None:
        line = _request_line(chunk)
        if line is None:
            return None
        with self._lock:
            for fault in self._faults:
                if fault.applies(line):
                    return fault
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
        unsent = 0  # body bytes still to come of a request answered here, dropped as they arrive
        try:
            while chunk := source.recv(65536):
                if unsent:
                    dropped = min(unsent, len(chunk))
                    unsent, chunk = unsent - dropped, chunk[dropped:]
                    if not chunk:
                        continue
                fault = self._faulted(chunk) if to_server and self._faults else None
                if fault is not None and fault.status is None:
                    self.down()
                    return
                if fault is not None:
                    unsent = max(0, _body_length(chunk) - len(chunk.partition(b"\r\n\r\n")[2]))
                    source.sendall(fault.answer(chunk))
                    continue
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


def _request_line(chunk: bytes) -> bytes | None:
    """The request line a chunk sent to the server starts with, if it starts a request."""
    line = chunk.split(b"\r\n", 1)[0]
    return line if line.endswith((b"HTTP/1.1", b"HTTP/1.0")) else None


def _body_length(chunk: bytes) -> int:
    head = chunk.split(b"\r\n\r\n", 1)[0]
    for header in head.split(b"\r\n")[1:]:
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


# What S3 answers with each status (reason phrase, error code, message): botocore and s3fs key on the code.
_S3_ERRORS = {
    403: ("Forbidden", "AccessDenied", "Access Denied"),
    500: ("Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    503: ("Service Unavailable", "SlowDown", "Please reduce your request rate."),
}


class Fault:
    """Requests :meth:`FlakyProxy.fail` refuses, or the one at which :meth:`FlakyProxy.down_at` goes down.

    ``refused`` lists the request lines it answered (or the one it went down at); ``stop()`` lets
    matching requests through again.
    """

    def __init__(
        self, markers: list[bytes], *, status: int | None = None, times: int | None = None, after: int = 0
    ) -> None:
        self.markers = markers
        self.status = status
        self.times = times
        self.after = after
        self.passed = 0
        self.refused: list[str] = []
        self.stopped = False

    def applies(self, line: bytes) -> bool:
        """Whether the request ``line`` is refused; counts it (call under the proxy's lock)."""
        if self.stopped or not all(m in line for m in self.markers):
            return False
        if self.passed < self.after:
            self.passed += 1
            return False
        if self.times is not None and len(self.refused) >= self.times:
            return False
        self.refused.append(line.decode(errors="replace"))
        if self.status is None:  # a crash happens once
            self.stopped = True
        return True

    def answer(self, request: bytes) -> bytes:
        """S3's XML error response for ``status`` (headers only to a HEAD, as HTTP says)."""
        reason, code, message = _S3_ERRORS[self.status or 500]
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>flaky-proxy</RequestId></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {self.status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nx-amz-request-id: flaky-proxy\r\n\r\n"
        ).encode()
        return head if request.startswith(b"HEAD ") else head + body

    def stop(self) -> None:
        self.stopped = True


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


_TEMPORARY_SERVERS_FIRST_SEEN: dict[tuple[int, int | None], str] = {}


def _running_prefect_servers() -> list[tuple[tuple[int, int | None], Any]]:
    """Prefect's in-process ``SubprocessASGIServer`` instances whose server process runs, each with its key
    in :data:`_TEMPORARY_SERVERS_FIRST_SEEN` (none before Prefect's server module is imported)."""
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:
        return []
    servers = server_module.SubprocessASGIServer._instances.values()
    return [((id(server), server.port), server) for server in list(servers) if server.server_process is not None]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    """Note the first test after whose teardown each temporary Prefect server was running.

    A server a fixture starts and stops (``prefect_test_harness``) is gone by then once its scope ends;
    one still running at session end was started by the test noted here (or by one sharing its fixture).
    """
    yield
    for key, _server in _running_prefect_servers():
        _TEMPORARY_SERVERS_FIRST_SEEN.setdefault(key, item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop what in-process tests left running while pytest's streams are still open.

    A flow run in this process with no Prefect API configured makes Prefect start a temporary server,
    stopped by an ``atexit`` hook that logs to a stream pytest has closed by then; a Ray runtime left
    initialised is shut down by its own hook during interpreter finalisation. Both are done here first.
    """
    for key, server in _running_prefect_servers():
        first_seen = _TEMPORARY_SERVERS_FIRST_SEEN.get(key, "no test's teardown")
        print(
            f"\nstopping the temporary Prefect server a test left running on {server.address}"
            f" (first seen running after {first_seen})"
        )
        server.stop()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    session.config._obliviate_exit_status = int(exitstatus)  # type: ignore[attr-defined]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's exit status once the ``atexit`` hooks have run, without interpreter finalisation.

    A full run of the suite once died with a segmentation fault after pytest's summary (every test had
    passed): finalisation tears down the C++ threads of torch, Ray and gRPC in no fixed order. The hooks
    still run (temporary folders, servers), under ``faulthandler`` so a crash in one of them prints
    every thread's stack instead of a bare "Segmentation fault".
    """
    import atexit
    import faulthandler

    status = getattr(config, "_obliviate_exit_status", None)
    if status is None:
        return
    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
