"""Process-wide runtimes the flows need: one Ray runtime and a Prefect API server.

Both follow ``shared/PLATFORM.md``: Ray is initialised once before any flow (prefect-ray would
otherwise start and stop it on every flow run), and when no ``PREFECT_API_URL`` is configured a
real ``prefect server`` is started on 127.0.0.1 for the command's lifetime (the temporary
in-process server runs no schedules and loses logs of work done elsewhere).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from obliviate.errors import ObliviateError

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


class ServerStartError(ObliviateError, RuntimeError):
    """A helper server (Prefect API) did not become healthy."""


def apply_prefect_defaults() -> None:
    """Set the Prefect environment defaults PLATFORM.md calls for, keeping explicit user values."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def ensure_ray(*, address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process.

    Args:
        address: a cluster address (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); default
            ``RAY_ADDRESS`` from the environment, else a fresh local runtime (``"local"``, never an
            unrelated cluster that happens to run on this machine).
        num_cpus: CPUs of a local runtime (default: all).
    """
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    options: dict[str, object] = {"include_dashboard": False, "log_to_driver": False}
    if target == "local":
        # Ray starts its workers 15 nice levels below the driver: on a busy machine they then get
        # a fraction of the CPU share the same work gets in-process. Workers of a local runtime run
        # at the driver's priority instead (``ray job submit`` does the same for job drivers).
        os.environ.setdefault("RAY_worker_niceness", "0")
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
    ray.init(address=target, **options)


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(api_url: str, *, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``{api_url}/health`` until it answers 200, the process dies, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerStartError(f"prefect server exited with code {process.returncode} before becoming healthy.")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise ServerStartError(f"prefect server at {api_url} was not healthy after {timeout:.0f} s.")


@contextlib.contextmanager
def prefect_api(*, home: str | Path | None = None, startup_timeout: float = 90.0) -> Iterator[str]:
    """Use the configured Prefect API, or run ``prefect server start`` on 127.0.0.1 meanwhile.

    When ``PREFECT_API_URL`` is set, nothing is started and that URL is yielded. Otherwise a
    server is started on a free port with its database under ``home`` (default
    ``~/.obliviate/prefect``, kept between runs so flow history survives), ``PREFECT_API_URL``
    points every later process (Ray workers included) at it, and the server is stopped on exit.

    Yields:
        the API URL in use.
    """
    apply_prefect_defaults()
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home_dir = Path(home or Path.home() / ".obliviate" / "prefect").expanduser()
    home_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home_dir), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = tempfile.NamedTemporaryFile(prefix="prefect-server-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--analytics-off",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        try:
            wait_healthy(api_url, timeout=startup_timeout, process=process)
        except ServerStartError as err:
            tail = Path(log.name).read_text(errors="replace")[-2000:]
            raise ServerStartError(f"{err} Its log ({log.name}) ends with:\n{tail}") from err
        os.environ["PREFECT_API_URL"] = api_url
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            try:
                yield api_url
            finally:
                _drain_prefect_workers()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        _stop(process)
        log.close()


def _drain_prefect_workers() -> None:
    """Flush Prefect's background log and event senders while the server still answers.

    Otherwise they retry against a stopped server at interpreter exit ("Error logging to API")
    and delay the command's exit by a minute.
    """
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        with contextlib.suppress(RuntimeError):
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)  # the server's own session: uvicorn and its children
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
