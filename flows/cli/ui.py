"""``obliviate ui``: the Prefect dashboard of every run the commands recorded, until interrupted.

Starts ``prefect server`` on 127.0.0.1 on the database the commands share
(``~/.obliviate/prefect``, kept between runs), so flow runs, their logs and the artifacts
(reduction summary, extraction audit, unlearning record, deletion ledger entry) stay browsable
after the commands exited. While it runs, commands use this server instead of starting their own,
so the "View at" links they print stay live. Ctrl-C (or SIGTERM) stops it cleanly.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from flows.cli._types import Args, integer, option, parsed

DEFAULT_PORT = 4200


def ui_command(
    ctx: typer.Context,
    port: Annotated[
        int,
        option(
            "--port",
            parser=integer,
            help=f"port on 127.0.0.1 (default {DEFAULT_PORT}, Prefect's usual one; 0 picks a free port)",
        ),
    ] = DEFAULT_PORT,
) -> Args:
    return parsed(ctx, run_ui)


def register(app: typer.Typer) -> None:
    help = "browse flow runs, logs and artifacts in the Prefect dashboard (until Ctrl-C)"
    app.command("ui", help=help, short_help=help)(ui_command)


def run_ui(args: Args) -> int:
    from flows.runtime import ServerStartError, prefect_home, running_ui_server, ui_url_of

    if not 0 <= args.port <= 65535:
        raise ServerStartError(f"--port must be between 0 and 65535; got {args.port}.")
    home = prefect_home()
    already = running_ui_server(home)
    if already is not None:
        print(f"obliviate ui already serves {home}: open {ui_url_of(already)}", flush=True)
        return 0
    if os.environ.get("PREFECT_API_URL"):
        print(
            f"note: PREFECT_API_URL is set ({os.environ['PREFECT_API_URL']}): commands record their runs there, "
            f"not in {home}; that server's own dashboard shows them.",
            file=sys.stderr,
        )
    stop, serving = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not serving.is_set():
            raise KeyboardInterrupt  # still starting: unwind now (the server is stopped on the way out)
        stop.set()  # serving: leave the wait loop, then stop the server in order

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _serve(home, args.port, stop=stop, serving=serving)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped; the runs stay in the database for the next `obliviate ui`.", file=sys.stderr, flush=True)
    return 0


def _serve(home: Path, port: int, *, stop: threading.Event, serving: threading.Event) -> None:
    """Run the server on ``home`` until ``stop`` is set; ``serving`` is set once it answers."""
    from flows.runtime import ServerStartError, forget_ui_server, prefect_server, record_ui_server

    print(f"starting the Prefect server on {home} (about 15 s) ...", file=sys.stderr, flush=True)
    home.mkdir(parents=True, exist_ok=True)
    # A person waits for it: a generous start-up time beats failing on a busy machine.
    with prefect_server(home=home, port=port, startup_timeout=180.0, log_path=home / "ui-server.log") as server:
        record_ui_server(home, server)
        serving.set()
        try:
            print(f"Prefect dashboard: {server.ui_url}", flush=True)
            print(f"  flow runs: {server.ui_url}/runs", flush=True)
            print(f"  artifacts: {server.ui_url}/artifacts", flush=True)
            print(
                f"database {home} (server log {server.log_path}); commands run meanwhile use this server. "
                "Ctrl-C stops it.",
                file=sys.stderr,
                flush=True,
            )
            while not stop.is_set() and server.process.poll() is None:
                stop.wait(0.5)
            if not stop.is_set():
                tail = server.log_path.read_text(errors="replace")[-2000:]
                raise ServerStartError(
                    f"the Prefect server exited with code {server.process.returncode}; "
                    f"its log ({server.log_path}) ends with:\n{tail}"
                )
            print("stopping the Prefect server ...", file=sys.stderr, flush=True)
        finally:
            forget_ui_server(home, server)
