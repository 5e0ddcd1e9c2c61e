"""Process-wide runtimes the flows need: one Ray runtime and a Prefect API server.

Both follow ``shared/PLATFORM.md``: Ray is initialised once before any flow (prefect-ray would
otherwise start and stop it on every flow run), and when no ``PREFECT_API_URL`` is configured a
real ``prefect server`` is started on 127.0.0.1 for the command's lifetime (the temporary
in-process server runs no schedules and loses logs of work done elsewhere), unless ``obliviate
ui`` keeps one up on the same database. Every server started here serves a dashboard that calls
its own API (``PREFECT_UI_API_URL``), so the "View at" links of flow logs open.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from flows._logging_filter import drop_traceback, logger_filter
from obliviate.errors import ConfigError, ObliviateError
from obliviate.files import write_whole

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


class ServerStartError(ObliviateError, RuntimeError):
    """A helper server (Prefect API) did not become healthy."""


class _ForeseenFailureFilter(logging.Filter):
    """Drops the traceback Prefect logs with a flow's failure when the failure is one of ours.

    Prefect's engine logs every exception that ends a flow run with its traceback. Ours
    (:class:`ObliviateError`) are sentences that name the rule and the fix, and the run's state
    message already holds them; a traceback under them only hides the sentence.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ObliviateError):
            drop_traceback(record)
        return True


def quiet_foreseen_tracebacks() -> None:
    """Log our own flow failures as their sentence, without Prefect's traceback (idempotent)."""
    flow_runs = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, _ForeseenFailureFilter) for f in flow_runs.filters):
        flow_runs.addFilter(_ForeseenFailureFilter())


def writable_folder(location: str | Path, *, what: str) -> Path:
    """``location`` as a local folder that exists and this process can write into; else a ConfigError.

    Commands call it before their work, so a bad output path fails in seconds, not after the work.

    Args:
        location: the folder.
        what: how the user named it, for the error (e.g. ``"the report folder (--out)"``).
    """
    folder = Path(location).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create {what} {str(location)!r} ({err.strerror}); choose a writable path.") from err
    try:
        # os.access says yes to root where nothing can be created (/proc, a read-only mount): create a file.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".obliviate-probe-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"cannot write into {what} {str(location)!r} ({err.strerror or err}); choose a writable path."
        ) from err
    return folder


def apply_prefect_defaults() -> None:
    """Set the Prefect environment defaults PLATFORM.md calls for, keeping explicit user values."""
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)


#: The settings of this shell a cluster's processes need and do not have: the store, the Prefect API, the S3
#: credentials and endpoint. A joined cluster's workers (and a submitted job) start from the environment of the
#: node they run on, not from this shell's, so both pass these on in their runtime environment.
FORWARDED_ENV = (
    "OBLIVIATE_STORE",
    "PREFECT_API_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
#: Set by Ray in the driver of a submitted job: the job's own config, its runtime environment included.
_JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def forwarded_env() -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables this process has, by name."""
    return {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}


def cluster_runtime_env() -> dict[str, object]:
    """The runtime environment a driver joining a cluster gives its tasks and actors: :func:`forwarded_env`.

    Inside a job ``obliviate submit`` started, the job's runtime environment already holds them, and Ray
    refuses a ``ray.init`` that names one of the job's variables again ("Failed to merge the Job's runtime
    env"): only the variables the job's lacks are passed.
    """
    env_vars = forwarded_env()
    job_config = os.environ.get(_JOB_CONFIG_VARIABLE)
    if job_config:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
            env_vars = {name: value for name, value in env_vars.items() if name not in job_env}
    return {"env_vars": env_vars} if env_vars else {}


class _RayStartNoise(logging.Filter):
    """Drops the two lines Ray 2.60 logs on every start of a local runtime, which tell an obliviate user nothing.

    "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out" is Ray announcing
    its own default (a local runtime with a token), and "Started a local Ray instance." what every command that
    trains or unlearns does. Every other record passes: a warning of real trouble, the token's first creation
    (~/.ray/auth_token), joining a cluster. Setting RAY_AUTH_MODE=token instead would silence the warning only where
    Ray had not yet read its settings in this process; where it had, the local start failed (InvalidAuthToken).
    """

    NOISE = ("Token authentication is enabled for this Ray cluster.", "Started a local Ray instance.")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOISE)


#: Where Ray logs those lines (a logger's filter sees only the records created there).
_RAY_START_LOGGERS = ("ray._private.authentication.authentication_token_setup", "ray._private.worker")


class RayStartFailed(ObliviateError, RuntimeError):
    """A local Ray runtime did not start (Ray's own start-up failed, e.g. its 30 s node registration)."""


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
    check_ray_address(target)
    options: dict[str, object] = {"include_dashboard": False, "log_to_driver": False}
    if target == "local":
        # Ray starts its workers 15 nice levels below the driver: on a busy machine they then get
        # a fraction of the CPU share the same work gets in-process. Workers of a local runtime run
        # at the driver's priority instead (``ray job submit`` does the same for job drivers).
        os.environ.setdefault("RAY_worker_niceness", "0")
        if num_cpus is not None:
            options["num_cpus"] = num_cpus
    else:
        # A local runtime's workers inherit this process's environment; a cluster's do not (its nodes started
        # them), so the S3 credentials and endpoint, the store and the Prefect API travel in the runtime env.
        runtime_env = cluster_runtime_env()
        if runtime_env:
            options["runtime_env"] = runtime_env
    try:
        with logger_filter(_RAY_START_LOGGERS, _RayStartNoise()):
            context = ray.init(address=target, **options)
    except (ray.exceptions.AuthenticationError, ConnectionError) as err:
        # Ray 2.60 clusters want a token by default. ray.init raises the refusal bare, or as a
        # ConnectionError whose cause holds it only as text (the GCS client's last error).
        chain: list[BaseException] = []
        link: BaseException | None = err
        while link is not None and len(chain) < 10:
            chain.append(link)
            link = link.__cause__ or link.__context__
        if any(isinstance(e, ray.exceptions.AuthenticationError) or "AuthenticationError" in str(e) for e in chain):
            raise ConfigError(ray_token_refusal(target, who="this process", again="run the command again")) from err
        raise ConfigError(
            f"could not join the Ray cluster at {target} ({err}); check that it is up (`ray status --address "
            f"{target}`) or fix --ray-address / RAY_ADDRESS."
        ) from err
    except Exception as err:
        if target != "local":
            raise
        load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
        raise RayStartFailed(
            f"could not start a local Ray runtime: {err} (load average {load} on {os.cpu_count()} CPUs). Nothing "
            f"was computed; {_local_start_fix(err)}, or join a running cluster with --ray-address / RAY_ADDRESS."
        ) from err
    session = context.address_info.get("session_dir") if target == "local" else None
    if session:
        _local_session_dirs.append(session)


def _ray_token_source() -> str | None:
    """Where Ray would read this process's authentication token from, as said to the user; ``None``: nowhere."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        return f"{named} (RAY_AUTH_TOKEN_PATH)" if Path(named).expanduser().is_file() else None
    default = Path("~/.ray/auth_token").expanduser()
    return "~/.ray/auth_token" if default.is_file() else None


def ray_token_refusal(address: str, *, who: str, again: str) -> str:
    """Why a token-authenticating Ray cluster refused ``who``, and the fix, from this process's actual settings.

    Ray (2.60) sends a token to an address given explicitly only when ``RAY_AUTH_MODE=token``: with the variable
    unset (or ``disabled``) the right token in ~/.ray/auth_token is never sent, so the fix is the variable, not
    the file. With ``token`` set, the token is missing or not the cluster's.

    Args:
        address: the cluster's address, as given.
        who: what was refused, e.g. ``"this process"``.
        again: what to do once mended, e.g. ``"run the command again"``.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    source = _ray_token_source()
    where = "~/.ray/auth_token, the file RAY_AUTH_TOKEN_PATH names, or RAY_AUTH_TOKEN"
    get_token = "`ray get-auth-token` on the head prints it"
    if mode is None or mode.lower() != "token":
        state = "RAY_AUTH_MODE is not set" if mode is None else f"RAY_AUTH_MODE={mode}"
        token = (
            f"Ray then sends the token in {source}"
            if source
            else f"Ray then reads the cluster's token from {where}, and none holds one here: put it there ({get_token})"
        )
        return (
            f"the Ray cluster at {address} wants an authentication token, and {who} sent none: {state}, and Ray "
            f"sends a token only with RAY_AUTH_MODE=token. Run `export RAY_AUTH_MODE=token` and {again}; {token}."
        )
    if source is None:
        return (
            f"the Ray cluster at {address} wants an authentication token, and {who} has none: RAY_AUTH_MODE=token, "
            f"but {where} hold no token. Put the cluster's token there ({get_token}) and {again}."
        )
    return (
        f"the Ray cluster at {address} refused the authentication token of {who} (from {source}): it is not the "
        f"cluster's. Replace it with the cluster's token ({get_token}) and {again}."
    )


#: The session folders (logs, sockets) of the local Ray runtimes this process started, in order. A runtime joined
#: (a cluster's) is not listed: its session belongs to it.
_local_session_dirs: list[str] = []


def remove_local_ray_sessions() -> None:
    """Shut Ray down, then remove the session folder of every local Ray runtime this process started.

    Ray keeps one folder per ``ray.init`` that starts a runtime (``/tmp/ray/session_*``: its processes' logs and
    sockets) and never removes it; its documentation leaves that to the user, so every command added one. The
    console script (:func:`flows.cli.run`) calls this once its command has succeeded, after the command (and every
    command it ran in-process, as ``demo`` does) is done with Ray: a failed or interrupted one keeps its folders,
    logs and all. Nothing is removed after joining an existing cluster (its session belongs to it).
    """
    if not _local_session_dirs:
        return
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()  # its processes are gone (or killed) when it returns: nothing writes there any more
    while _local_session_dirs:
        folder = Path(_local_session_dirs.pop(0))
        for _ in range(2):  # a worker ending meanwhile may add a log file under a folder being removed
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                break
        latest = folder.parent / "session_latest"
        with contextlib.suppress(OSError):
            if os.readlink(latest) == str(folder):
                latest.unlink()


def _local_start_fix(err: Exception) -> str:
    """What mends a failed local Ray start, judged from Ray's own error."""
    if isinstance(err, OSError) and not isinstance(err, (TimeoutError, ConnectionError)):
        # Ray writes its session folder (sockets, logs) under RAY_TMPDIR before anything starts.
        folder = os.environ.get("RAY_TMPDIR") or "/tmp"
        return (
            f"Ray keeps its session folder under {folder} (RAY_TMPDIR, default /tmp): make it a writable folder "
            "with free space, then run the command again"
        )
    if "timed out" in str(err).lower() or isinstance(err, TimeoutError):
        # Ray gives a new local node a fixed 30 s to register; a loaded machine can miss it.
        return "run the command again when the machine is less busy"
    return "mend what Ray's reason above names, then run the command again"


#: What a client sends first on an HTTP/2 connection (RFC 9113 section 3.4): the connection preface,
#: then an empty SETTINGS frame. Ray's GCS and its client server are gRPC, so they answer with SETTINGS.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS_FRAME = 4


def check_ray_address(address: str | None, *, timeout_s: float = 5.0, option: str = "--ray-address") -> None:
    """Refuse a Ray cluster address no Ray cluster answers at, before ``ray.init`` waits on it for good.

    ``ray.init`` on an address where no cluster runs retries its GCS connection without end (Ray
    2.60 logs "Failed to connect to GCS ... within 5 seconds" over and over), so a mistyped
    ``--ray-address`` or a stopped cluster would hang the command. It waits the same way on a port
    where some other server listens (a web server, the Prefect API), so the check also opens an
    HTTP/2 connection: Ray's GCS and its client server speak gRPC and answer it with a SETTINGS
    frame; anything else is not a Ray cluster.

    ``option`` is the option of the calling command that gives the address (``submit``'s is ``--address``), named
    in the errors' fix.

    Raises:
        ConfigError: the address is malformed, no server accepts a TCP connection there, or the
            server there does not speak gRPC.
    """
    if address in (None, "", "local"):
        return
    shown = address
    if address == "auto":
        # Ray's "auto" is the cluster `ray start` last recorded on this machine; without one ray.init
        # fails only after the command has started Prefect and prepared the store.
        from ray._private.utils import read_ray_address

        address = read_ray_address()
        if not address:
            raise ConfigError(
                f"{option} auto (or RAY_ADDRESS=auto) joins the cluster `ray start --head` last started on this "
                "machine, and none is running here. Start one with `ray start --head`, give the head's address "
                "HOST:6379, or leave both unset for a local Ray runtime."
            )
        shown = f"{address} (the cluster 'auto' found, recorded by `ray start`)"
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"a Ray address is HOST:PORT (the head's GCS, e.g. 10.0.0.5:6379), ray://HOST:PORT, 'auto' or 'local'; "
            f"got {address!r}."
        )
    fix = f"start one (`ray start --head`, or `ray up cluster.yaml`) or fix {option} / RAY_ADDRESS."
    try:
        connection = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s)
    except OSError as err:
        raise ConfigError(f"no Ray cluster answers at {shown} ({err}); {fix}") from err
    with connection:
        try:
            connection.sendall(_HTTP2_PREFACE)
            reply: bytes | None = _read_up_to(connection, 9)
        except OSError:  # a timeout or a reset: either way, not a gRPC server
            reply = None
    if reply is None or len(reply) < 9 or reply[3] != _HTTP2_SETTINGS_FRAME:
        seen = (
            f"it said nothing in {timeout_s:.0f} s"
            if not reply
            else f"it answered {reply.decode('ascii')!r}, not gRPC"
            if reply.isascii() and reply.decode("ascii").isprintable()
            else "it does not speak gRPC"
        )
        raise ConfigError(
            f"a server listens at {shown} but it is not a Ray cluster ({seen}); point {option} / RAY_ADDRESS "
            "at a Ray head's GCS port, which `ray start --head` prints (6379 by default), or at ray://HOST:10001 "
            "for Ray Client."
        )


def _read_up_to(connection: socket.socket, size: int) -> bytes:
    """Up to ``size`` bytes: fewer only when the peer closes the connection first."""
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def ray_gcs_answers(*, timeout_s: float = 1.0) -> bool:
    """Whether the GCS of the Ray runtime this process joined still accepts connections."""
    import ray

    if not ray.is_initialized():
        return False
    host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def cluster_cpus() -> int:
    """CPUs of the Ray cluster this process is connected to."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_autoscales() -> bool | None:
    """Whether the Ray cluster this process joined has an autoscaler that can add nodes; ``None``: Ray does not say.

    Ray 2.60 has no public call for it. The head's monitor (Ray's v1 autoscaler, the default) publishes its status
    in the GCS key-value store (what ``ray status`` prints). On a cluster started by hand (``ray start`` without an
    autoscaling config) it runs Ray's read-only provider, which only mirrors the nodes that joined, naming each one's
    type ``node_<node id>`` (``ray.autoscaler._private.util.format_readonly_node_type``); an autoscaler started by
    ``ray up`` or KubeRay names the node types of its config instead. Anything else (no status yet, autoscaler v2,
    Ray Client) is ``None``: the caller must assume the cluster may grow.
    """
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.autoscaler._private.util import format_readonly_node_type
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):  # v2 publishes no such status
            return None
        status = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        mapping = json.loads(status)["autoscaler_report"]["node_type_mapping"] if status else None
    except Exception:  # noqa: BLE001 - Ray's internals moved or the status is not there: Ray does not say
        return None
    if not isinstance(mapping, dict) or not mapping:
        return None
    return not all(node_type == format_readonly_node_type(node) for node, node_type in mapping.items())


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
        if is_healthy(api_url):
            return
        time.sleep(0.5)
    raise ServerStartError(f"prefect server at {api_url} was not healthy after {timeout:.0f} s.")


DEFAULT_PREFECT_HOME = Path("~/.obliviate/prefect")
#: Where ``obliviate ui`` records the server it keeps up, so commands run meanwhile use it.
UI_SERVER_RECORD = "ui-server.json"


def prefect_home(home: str | Path | None = None) -> Path:
    """The Prefect home (database, logs) the commands share: ``home`` or ``~/.obliviate/prefect``."""
    return Path(home or DEFAULT_PREFECT_HOME).expanduser()


def ui_url_of(api_url: str) -> str:
    """The dashboard URL of a Prefect API URL (``http://host:port/api`` -> ``http://host:port``)."""
    return api_url.rstrip("/").removesuffix("/api")


def server_environment(*, port: int, home: Path) -> dict[str, str]:
    """Environment of a ``prefect server start`` on 127.0.0.1:``port`` whose UI calls its own API.

    The UI asks ``GET /ui-settings`` for the API address; unless ``PREFECT_UI_API_URL`` says
    otherwise the server answers with port 4200 whatever ``--port`` was (PLATFORM.md, Prefect), so
    the dashboard of a server on any other port shows "Oops. Something went wrong" and no runs.
    """
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_UI_URL": ui_url_of(api_url),
    }
    env.pop("PREFECT_API_URL", None)
    return env


@dataclass(frozen=True)
class PrefectServer:
    """A running ``prefect server start``: its API and dashboard URLs, process and log file."""

    api_url: str
    ui_url: str
    process: subprocess.Popen
    log_path: Path


@contextlib.contextmanager
def prefect_server(
    *,
    home: str | Path | None = None,
    port: int | None = None,
    startup_timeout: float = 90.0,
    log_path: Path | None = None,
    while_starting: Callable[[], None] | None = None,
) -> Iterator[PrefectServer]:
    """Run ``prefect server start`` on 127.0.0.1 with its database under ``home`` meanwhile.

    Args:
        home: the Prefect home (default ``~/.obliviate/prefect``, kept between runs).
        port: the port (default or 0: a free one).
        startup_timeout: seconds to wait for ``/health``.
        log_path: the server's log (default: a new temporary file).
        while_starting: work done once the server's process is started, before waiting for it to
            answer (the server takes 5-15 s to come up; the work overlaps that wait).

    Raises:
        ServerStartError: the port is taken, or the server did not become healthy.
    """
    home_dir = prefect_home(home)
    home_dir.mkdir(parents=True, exist_ok=True)
    if not port:
        port = free_port()
    elif not port_is_free(port):
        raise ServerStartError(
            f"port {port} on 127.0.0.1 is already in use (another Prefect server?); "
            "choose another with --port N, or --port 0 for any free one."
        )
    env = server_environment(port=port, home=home_dir)
    api_url = f"http://127.0.0.1:{port}/api"
    if log_path is None:
        with tempfile.NamedTemporaryFile(prefix="prefect-server-", suffix=".log", delete=False) as handle:
            log_path = Path(handle.name)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            _dying_with_this_process(
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
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the command, which stops the server in order
        )
    try:
        if while_starting is not None:
            while_starting()
        try:
            wait_healthy(api_url, timeout=startup_timeout, process=process)
        except ServerStartError as err:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ServerStartError(f"{err} Its log ({log_path}) ends with:\n{tail}") from err
        yield PrefectServer(api_url=api_url, ui_url=ui_url_of(api_url), process=process, log_path=log_path)
    finally:
        _stop(process)


def _dying_with_this_process(command: list[str]) -> list[str]:
    """``command`` started so that it gets SIGTERM when this process dies (Linux), else as it is.

    The server's own session keeps Ctrl-C away from it, so a command killed outright (``kill -9``, a CI
    timeout) left its Prefect server running for good, port and all. A short launcher asks the kernel
    for the parent-death signal, then execs the command (the setting survives exec). The signal fires
    when the *thread* that started the child ends, so only the main thread asks for it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return command
    return [sys.executable, "-c", _PARENT_DEATH_LAUNCHER, str(os.getpid()), *command]


#: prctl(PR_SET_PDEATHSIG = 1, SIGTERM); a parent already gone would never send it, so exit then.
_PARENT_DEATH_LAUNCHER = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


@contextlib.contextmanager
def prefect_api(
    *,
    home: str | Path | None = None,
    startup_timeout: float = 90.0,
    while_starting: Callable[[], None] | None = None,
) -> Iterator[str]:
    """Use the configured Prefect API, or run ``prefect server start`` on 127.0.0.1 meanwhile.

    In order: ``PREFECT_API_URL`` when set (nothing started); the server an ``obliviate ui``
    keeps up on the same ``home`` (its links stay live after the command); else a server started
    on a free port with its database under ``home`` (default ``~/.obliviate/prefect``, kept between
    runs so flow history survives, browsable later with ``obliviate ui``) and stopped on exit.
    Meanwhile ``PREFECT_API_URL`` and ``PREFECT_UI_URL`` point every later process (Ray workers
    included) at it.

    Args:
        home: the Prefect home.
        startup_timeout: seconds to wait for a server started here to answer.
        while_starting: work to do before the API is used, e.g. ``ensure_ray``. When a server is
            started here it runs while the server comes up, so the two start-ups overlap (a tiny
            ``train`` waited 5 s for Ray after 5 s for the server). It runs with ``PREFECT_API_URL``
            already pointing at the API, so the processes it starts (a local Ray runtime's
            workers) inherit it.

    Yields:
        the API URL in use.
    """
    apply_prefect_defaults()
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        with _api_must_answer(configured, configured=True):
            if while_starting is not None:
                while_starting()
            yield configured
        return
    home_dir = prefect_home(home)
    running = running_ui_server(home_dir)
    if running is not None:
        with _pointed_at(running), _api_must_answer(running):
            if while_starting is not None:
                while_starting()
            yield running
        return
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    with (
        _environment_pointed_at(api_url),
        prefect_server(home=home_dir, port=port, startup_timeout=startup_timeout, while_starting=while_starting),
        _pointed_at(api_url),
        _api_must_answer(api_url),
    ):
        yield api_url


@contextlib.contextmanager
def prefect_api_and_ray(*, ray_address: str | None = None, num_cpus: int | None = None) -> Iterator[str]:
    """:func:`prefect_api` with Ray started (or joined, :func:`ensure_ray`) while its server comes up.

    Every command that runs flows on Ray starts both here: one after the other they took about 5 s each. Ray starts
    with ``PREFECT_API_URL`` already set, so a local runtime's workers inherit it.

    Args:
        ray_address: as :func:`ensure_ray`'s ``address``.
        num_cpus: as :func:`ensure_ray`'s.

    Yields:
        the API URL in use.
    """
    with prefect_api(while_starting=lambda: ensure_ray(address=ray_address, num_cpus=num_cpus)) as api_url:
        yield api_url


class PrefectUnavailable(ObliviateError, ConnectionError):
    """The Prefect API a command used stopped answering (or never answered) while it ran."""


def _unreachable_api_cause(err: BaseException) -> BaseException | None:
    """The httpx connection error in ``err``'s chain (Prefect wraps one in ``RuntimeError('Failed to reach API')``)."""
    import httpx

    seen: BaseException | None = err
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, httpx.TransportError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def _api_must_answer(api_url: str, *, configured: bool = False) -> Iterator[None]:
    """A connection error from a Prefect API that no longer answers becomes one sentence (:class:`PrefectUnavailable`).

    It was a 100-line ``httpx.ConnectError`` traceback, e.g. when the ``obliviate ui`` server a
    command found went away while the command ran. An error while the API still answers (another
    HTTP service failed) goes on as it is.
    """
    try:
        yield
    except Exception as err:
        cause = _unreachable_api_cause(err)
        if cause is None or is_healthy(api_url):
            raise
        raise PrefectUnavailable(
            f"the Prefect API at {api_url} must answer while the command runs; it does not "
            f"({type(cause).__name__}: {str(cause)[:200] or 'no detail'}), so the command stopped. "
            + (
                "PREFECT_API_URL names it: start that server or unset PREFECT_API_URL (a command then starts "
                "its own), and run the command again."
                if configured
                else "Run the command again: it uses an `obliviate ui` server that answers, else starts its own."
            )
        ) from None


@contextlib.contextmanager
def _pointed_at(api_url: str) -> Iterator[None]:
    """Point this process and its children at ``api_url`` meanwhile; flush Prefect's senders on exit."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    ui_url = ui_url_of(api_url)
    with (
        _environment_pointed_at(api_url),
        temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_UI_URL: ui_url}),
    ):
        try:
            yield
        finally:
            if is_healthy(api_url):  # a server gone away drains nothing: its senders would retry for a minute
                _drain_prefect_workers()


@contextlib.contextmanager
def environment_set(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in this process's environment while the block runs (children inherit them); each variable's
    value from before is put back after it, however it ends, and one that was unset is unset again."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _environment_pointed_at(api_url: str) -> contextlib.AbstractContextManager[None]:
    """``PREFECT_API_URL`` and ``PREFECT_UI_URL`` in this process's environment meanwhile (children inherit them)."""
    return environment_set({"PREFECT_API_URL": api_url, "PREFECT_UI_URL": ui_url_of(api_url)})


def record_ui_server(home: Path, server: PrefectServer) -> Path:
    """Record ``server`` as the one ``obliviate ui`` keeps up on ``home`` (written atomically)."""
    text = json.dumps({"api_url": server.api_url, "pid": server.process.pid})
    return write_whole(home / UI_SERVER_RECORD, write=lambda partial: partial.write_text(text))


def forget_ui_server(home: Path, server: PrefectServer) -> None:
    """Remove the record of ``server`` (only if it still names this server)."""
    record = home / UI_SERVER_RECORD
    with contextlib.suppress(OSError, ValueError):
        if json.loads(record.read_text()).get("pid") == server.process.pid:
            record.unlink()


def running_ui_server(home: Path) -> str | None:
    """The API URL of the server an ``obliviate ui`` keeps up on ``home``, if it answers."""
    try:
        recorded = json.loads((home / UI_SERVER_RECORD).read_text())
        api_url, pid = str(recorded["api_url"]), int(recorded["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return api_url if is_healthy(api_url) else None


def is_healthy(api_url: str) -> bool:
    """Whether ``{api_url}/health`` answers 200 now."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
