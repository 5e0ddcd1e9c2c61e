"""``obliviate submit``: run an ``obliviate`` command as a Ray job on a cluster.

A thin wrapper over Ray's ``JobSubmissionClient``: it uploads the working directory (without the
virtual environment, git data and local runs), forwards the storage and Prefect settings of this
shell to the job's runtime environment, waits for the job and prints its logs. Everything it
does is also possible with ``ray job submit --working-dir . --runtime-env-json ... -- obliviate ...``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from obliviate.errors import ConfigError

FORWARDED_ENV = (
    "OBLIVIATE_STORE",
    "PREFECT_API_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
UPLOAD_EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".hypothesis", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="run an obliviate command as a Ray job (e.g. obliviate submit -- reduce --k 600)",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_JOBS_ADDRESS", "http://127.0.0.1:8265"),
        help="Ray dashboard address of the cluster (default: $RAY_JOBS_ADDRESS or http://127.0.0.1:8265)",
    )
    parser.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job (default 3600)")
    parser.add_argument("job", nargs=argparse.REMAINDER, help="the obliviate command to run, after --")
    parser.set_defaults(handler=run_submit)


def job_runtime_env(working_dir: str) -> dict:
    """The runtime environment of a submitted job: code upload plus forwarded settings."""
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return {"working_dir": working_dir, "excludes": UPLOAD_EXCLUDES, "env_vars": env_vars}


def run_submit(args: argparse.Namespace) -> int:
    job = [part for part in args.job if part != "--"] if args.job else []
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
    _check_job_command(job)
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
    except ConnectionError as err:
        raise ConfigError(
            f"no Ray cluster answers at --address {args.address} ({err}); start one (`ray start --head`, or "
            "`ray up cluster.yaml`) or pass its dashboard address, e.g. http://HEAD:8265."
        ) from err
    entrypoint = "python -m flows.cli " + shlex.join(job)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_runtime_env(args.working_dir))
    print(f"submitted {job_id} to {args.address}: obliviate {shlex.join(job)}")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    status = str(client.get_job_status(job_id))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1.0)
        status = str(client.get_job_status(job_id))
    sys.stdout.write(client.get_job_logs(job_id))
    state = status.split(".")[-1]
    print(f"job {job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _check_job_command(job: list[str]) -> None:
    """Parse the job's command line here, so a typo fails now rather than on the cluster after the upload."""
    from flows.cli import build_parser

    try:
        build_parser().parse_args(job)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # `-- train --help`: the help was printed here; nothing to run
            raise SystemExit(0) from None
        raise ConfigError(
            f"the job after '--' must be an obliviate command line; {shlex.join(job)!r} is not (the parser's "
            "message is above). Fix it and submit again; nothing was sent to the cluster."
        ) from None
