"""``obliviate submit``: run an ``obliviate`` command as a Ray job on a cluster.

A thin wrapper over Ray's ``JobSubmissionClient``: it uploads the working directory (without the
virtual environment, git data and local runs), forwards the storage and Prefect settings of this
shell to the job's runtime environment, waits for the job and prints its logs. Everything it
does is also possible with ``ray job submit --working-dir . --runtime-env-json ... -- obliviate ...``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from typing import Annotated

import typer

from flows.cli._store import DEFAULT_STORE
from flows.cli._types import Args, number, option, parsed
from flows.cli._types import flag as flag_option
from flows.runtime import forwarded_env
from obliviate.errors import ConfigError

UPLOAD_EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".hypothesis", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
#: Ray's Jobs client lets these override the address it is given; ``submit`` reads them itself instead.
_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def submit_command(
    ctx: typer.Context,
    address: Annotated[
        str | None,
        option(
            "--address",
            help="the cluster's dashboard URL http://HEAD:8265, or its head's GCS address HEAD:6379 (default: "
            f"$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else {DEFAULT_DASHBOARD})",
        ),
    ] = None,
    working_dir: Annotated[
        str, option("--working-dir", help="directory uploaded as the job's working dir (default .)")
    ] = ".",
    no_wait: Annotated[bool, flag_option("--no-wait", help="print the job id and return at once")] = False,
    timeout: Annotated[
        float, option("--timeout", parser=number, help="seconds to wait for the job (default 3600)")
    ] = 3600.0,
    job: Annotated[
        list[str] | None,
        # hidden: typer would list it as "JOB <list[str]>"; the epilog says what it is
        typer.Argument(metavar="JOB", help="the obliviate command to run, after --", show_default=False, hidden=True),
    ] = None,
) -> Args:
    return parsed(ctx, run_submit)


def register(app: typer.Typer) -> None:
    help = "run an obliviate command as a Ray job (e.g. obliviate submit -- reduce --k 600)"
    # Everything from the job's command on is the job's, options included: they are its to parse.
    settings = {"allow_interspersed_args": False, "ignore_unknown_options": True}
    epilog = "JOB, after --: the obliviate command to run, e.g. obliviate submit -- reduce --data mnist5k --k 600"
    app.command("submit", help=help, short_help=help, epilog=epilog, context_settings=settings)(submit_command)


def job_runtime_env(working_dir: str) -> dict:
    """The runtime environment of a submitted job: code upload plus forwarded settings."""
    return {"working_dir": working_dir, "excludes": UPLOAD_EXCLUDES, "env_vars": forwarded_env()}


def jobs_address(given: str | None) -> str:
    """The address ``submit`` sends the job to: ``--address``, else Ray's variables, else the local dashboard.

    Raises:
        ConfigError: a URL whose scheme is not http, https or ray, or a GCS address (``HOST:PORT``,
            ``auto``) where no Ray cluster answers: Ray's Jobs client would wait about 40 s on it, then
            fail with a traceback.
    """
    from flows.runtime import check_ray_address

    address = (given or next((os.environ[n] for n in _ADDRESS_ENV if os.environ.get(n)), DEFAULT_DASHBOARD)).strip()
    scheme = address.split("://", 1)[0].lower() if "://" in address else None
    if scheme is None:
        check_ray_address(address, option="--address")  # a GCS address: the client finds the dashboard through it
    elif scheme not in ("http", "https", "ray"):
        raise ConfigError(
            f"--address is the cluster's dashboard URL (http://HEAD:8265) or its head's GCS address (HEAD:6379); "
            f"got {address!r}."
        )
    return address


@contextlib.contextmanager
def _address_env_set_aside() -> Iterator[None]:
    """Hide the variables with which Ray's Jobs client would override the address ``submit`` chose."""
    saved = {name: os.environ.pop(name) for name in _ADDRESS_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def run_submit(args: Args) -> int:
    # the parser took the separator "--" (a job may pass another on to its own command)
    job = list(args.job or [])
    if not job:
        raise ConfigError(
            "submit needs the obliviate command to run after '--', e.g. "
            "'obliviate submit -- reduce --data mnist5k --k 600'; got nothing."
        )
    if not args.timeout > 0:
        raise ConfigError(f"--timeout is the most seconds to wait for the job and must be > 0; got {args.timeout}.")
    if not os.path.isdir(args.working_dir):
        raise ConfigError(
            f"--working-dir {args.working_dir!r} is not a folder; pass the repository root (default '.') so the job "
            "can import obliviate."
        )
    parsed = _check_job_command(job)
    _check_outputs_outlive_the_job(parsed)
    _check_inputs_are_uploaded(parsed, args.working_dir)
    args.address = jobs_address(args.address)
    from ray.exceptions import AuthenticationError, RpcError
    from ray.job_submission import JobSubmissionClient

    try:
        with _address_env_set_aside():
            client = JobSubmissionClient(args.address)
        job_id = client.submit_job(
            entrypoint="python -m flows.cli " + shlex.join(job), runtime_env=job_runtime_env(args.working_dir)
        )
    except AuthenticationError as err:
        raise ConfigError(_refused_message(args.address)) from err
    except (ConnectionError, RpcError) as err:
        raise ConfigError(
            f"no Ray cluster answers at --address {args.address} ({err}); start one (`ray start --head`, or "
            "`ray up cluster.yaml`) or pass its dashboard address, e.g. http://HEAD:8265."
        ) from err
    print(f"submitted {job_id} to {args.address}: obliviate {shlex.join(job)}", flush=True)
    if args.no_wait:
        return 0
    try:
        state, logs = _follow(client, job_id, timeout_s=args.timeout)
    except KeyboardInterrupt:
        from flows.cli import EXIT_INTERRUPTED

        print(
            f"obliviate submit: stopped waiting; job {job_id} keeps running on the cluster. Follow it with "
            f"`ray job logs --address {args.address} --follow {job_id}`, stop it with "
            f"`ray job stop --address {args.address} {job_id}`.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if state not in TERMINAL:
        print(
            f"job {job_id}: still {state} after --timeout {args.timeout:g} s; it keeps running on the cluster. Follow "
            f"it with `ray job logs --address {args.address} --follow {job_id}`, stop it with "
            f"`ray job stop --address {args.address} {job_id}`."
        )
        return 1
    print(f"job {job_id}: {state}")
    if state == "FAILED" and _missing_import(logs):
        print(_MISSING_DEPENDENCIES, file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


#: Said under a failed job whose log shows an import that failed: the job runs the cluster's own ``python``.
_MISSING_DEPENDENCIES = (
    "obliviate submit: the job's log shows an import that failed: the cluster's python (the job runs `python -m "
    "flows.cli` there) lacks obliviate's dependencies. Install them on every node (cluster.yaml setup_commands, e.g. "
    "`pip install -e .`), or run the job with a python that has them (the runtime env's py_executable)."
)


#: The packages the upload carries (the working dir): one of these missing is not the python's fault.
_UPLOADED_PACKAGES = {"flows", "obliviate", "storage", "actors"}


def _missing_import(logs: str) -> bool:
    """Whether a job's log shows a failed import of a dependency (``ModuleNotFoundError`` / ``ImportError``)."""
    for line in (raw.strip() for raw in logs.splitlines()):
        if line.startswith("ImportError:"):
            return True
        missing = re.match(r"ModuleNotFoundError: No module named '([\w.]+)'", line)
        if missing and missing.group(1).split(".")[0] not in _UPLOADED_PACKAGES:
            return True
    return False


def _follow(client, job_id: str, *, timeout_s: float) -> tuple[str, str]:
    """Print the job's log as it grows until the job ends or ``timeout_s`` passes; returns its last state and log."""
    deadline = time.monotonic() + timeout_s
    printed = 0
    while True:
        state = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if state in TERMINAL or time.monotonic() >= deadline:
            return state, logs
        time.sleep(1.0)


def _refused_message(address: str) -> str:
    """Why a Ray 2.60 cluster refused the Jobs client, and the fix for this shell."""
    from flows.runtime import ray_token_refusal

    refusal = ray_token_refusal(address, who="this shell's Jobs client", again="submit again")
    return f"{refusal} Nothing was sent to the cluster."


def _check_outputs_outlive_the_job(job: Args) -> None:
    """Refuse a job whose results would land in its uploaded working directory.

    A job runs in a copy of ``--working-dir`` that Ray unpacks under its session folder on whichever
    node runs the driver and deletes with the session, so a relative store or output path (the
    default ``file://./runs`` among them) would lose every result the job writes. A job that only reads its
    store (:func:`_reads_only`) loses nothing there: its store need only travel with the upload.
    """
    for flag, where in _job_outputs(job):
        path = where.removeprefix("file://")
        if where.startswith("s3://") or os.path.isabs(os.path.expanduser(path)):
            continue
        if _reads_only(job):
            _check_store_is_uploaded(flag, where, path)
            continue
        fix = (
            "pass --out an absolute path on a filesystem every node shares, e.g. --out /shared/obliviate/out"
            if flag == "--out"
            else "set OBLIVIATE_STORE=s3://bucket/prefix (or pass --store), or use an absolute path on a filesystem "
            "every node shares, e.g. --store file:///shared/obliviate"
        )
        raise ConfigError(
            f"the job would write to {where} ({flag}), a path relative to the job's working directory: Ray unpacks "
            "that on the node running the job and deletes it when the job's session ends, so the results would be "
            f"lost. To keep them, {fix}. Nothing was sent to the cluster."
        )


def _reads_only(job: Args) -> bool:
    """Whether the job only reads its store: ``store check`` without ``--repair``, ``forget --status``."""
    if job.command == "store":
        return not getattr(job, "repair", True)
    return job.command == "forget" and bool(getattr(job, "status", None))


def _check_store_is_uploaded(flag: str, where: str, path: str) -> None:
    """Refuse a read-only job whose relative store is in a folder the upload leaves out (``runs/``: the default).

    The job reads the copy of its store unpacked with the working directory; a store the upload leaves out is not
    there, and the job would fail on the cluster, finding no store. A relative store elsewhere travels with it.
    """
    top = os.path.normpath(os.path.expanduser(path)).split(os.sep, 1)[0]
    if top not in {"runs", ".venv", ".git"}:
        return
    raise ConfigError(
        f"the job reads the store {where} ({flag}), inside {top}/, which submit does not upload (it leaves out "
        f"{', '.join(UPLOAD_EXCLUDES[:3])}): the job would find no store there. Point it at a store every node can "
        "read: set OBLIVIATE_STORE=s3://bucket/prefix (or pass --store), or use an absolute path on a filesystem "
        "every node shares, e.g. --store file:///shared/obliviate. Nothing was sent to the cluster."
    )


def _check_inputs_are_uploaded(job: Args, working_dir: str) -> None:
    """Refuse a job that reads a file from a folder the upload leaves out (``runs/``, ``.venv``, ``.git``).

    The job would fail on the cluster after the upload, with the file not found.
    """
    root = os.path.abspath(working_dir)
    for flag in ("target", "data", "pool"):
        value = getattr(job, flag, None)
        if not isinstance(value, str) or "://" in value:
            continue
        path = os.path.relpath(value, root) if os.path.isabs(value) else os.path.normpath(value)
        top = path.split(os.sep, 1)[0]
        if path.startswith("..") or top == path or top not in {"runs", ".venv", ".git"}:
            continue  # outside the upload (a path the nodes must have), a name, or a file that travels
        raise ConfigError(
            f"the job reads --{flag} {value}, inside {top}/, which submit does not upload (it leaves out "
            f"{', '.join(UPLOAD_EXCLUDES[:3])}); the job would not find it. Copy the file elsewhere in the working "
            "directory, or give a path or URL every node can read. Nothing was sent to the cluster."
        )


def _job_outputs(job: Args) -> list[tuple[str, str]]:
    """Where the parsed job command would write: (the flag that says so, the store URL or path)."""
    store = getattr(job, "store", None)
    out = getattr(job, "out", None)
    if store:
        return [("--store", store)]
    outputs: list[tuple[str, str]] = []
    if out:
        outputs.append(("--out", out))
    elif hasattr(job, "out") and job.command == "demo":
        outputs.append(("--out", "runs/demo"))
    if hasattr(job, "store") and not (out and job.command == "reduce"):  # reduce's --out is its store
        env_store = os.environ.get("OBLIVIATE_STORE")
        outputs.append(("$OBLIVIATE_STORE", env_store) if env_store else ("the default store", DEFAULT_STORE))
    return outputs


def _check_job_command(job: list[str]) -> Args:
    """Parse the job's command line here, so a typo fails now rather than on the cluster after the upload."""
    from flows.cli import parse_args

    try:
        return parse_args(job)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # `-- train --help`: the help was printed here; nothing to run
            raise SystemExit(0) from None
        raise ConfigError(
            f"the job after '--' must be an obliviate command line; {shlex.join(job)!r} is not (the parser's "
            "message is above). Fix it and submit again; nothing was sent to the cluster."
        ) from None
