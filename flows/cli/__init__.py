"""The ``obliviate`` command line, on typer (click underneath).

Each sub-command lives in its own module under :mod:`flows.cli` and exposes ``register(app)``, which
adds its command (or group of commands) to the ``obliviate`` :class:`typer.Typer` app. A command only
parses: it returns its options as :class:`flows.cli._types.Args`, with ``handler``, a function taking
them and returning an exit code, which :func:`main` runs, so that every command's errors, Ctrl-C and
SIGTERM are said the same way. The app is built when :func:`main` runs, never at import time.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, NoReturn

import typer

from flows._logging_filter import drop_traceback, logger_filter, record_error
from flows.cli._types import Args, new_app
from obliviate.errors import ObliviateError

EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by SIGINT (128 + 2)
EXIT_TERMINATED = 143  # ... and by SIGTERM (128 + 15)

COMMAND_MODULES: tuple[str, ...] = (
    "flows.cli.reduce",
    "flows.cli.demo",
    "flows.cli.submit",
    "flows.cli.train",
    "flows.cli.forget",
    "flows.cli.serve",
    "flows.cli.store",
    "flows.cli.target",
    "flows.cli.steal",
    "flows.cli.tune",
    "flows.cli.verify",
    "flows.cli.ui",
)
DESCRIPTION = "Audit how cheaply a model can be stolen, and forget data fast, provably and safely."


def version_line() -> str:
    """``obliviate 0.1.0 (torch 2.x, Python 3.11.y)``, read from the installed packages (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    python = ".".join(str(part) for part in sys.version_info[:3])
    return f"obliviate {installed('obliviate')} (torch {installed('torch')}, Python {python})"


def _show_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit(0)


def _no_command(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_show_version,
            help="show obliviate's version with torch's and Python's (replay needs the same torch) and exit",
        ),
    ] = False,
) -> Args | None:
    # Not required: with no command, main prints this help (the list of commands), not a terse error.
    if ctx.invoked_subcommand is None:
        return Args(command=None, help=ctx.get_help())
    return None


def build_app() -> typer.Typer:
    """The ``obliviate`` app: every command of :data:`COMMAND_MODULES`, in that order."""
    app = new_app(name="obliviate", help=DESCRIPTION, subcommand_metavar="COMMAND [ARGS]...")
    app.callback(invoke_without_command=True)(_no_command)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(app)
    return app


def parse_args(argv: Sequence[str] | None = None) -> Args:
    """``argv`` (default ``sys.argv[1:]``) parsed into the command's :class:`Args`; ``command`` is None without one.

    Raises:
        SystemExit: 0 after ``--help`` or ``--version`` printed what they print; 2 for a command line the parser
            refuses (an unknown command or option, a bad value), said on stderr with the command's usage.
    """
    command = typer.main.get_command(build_app())
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        _refuse_an_option_as_a_value(command, words)
        # complete_var "": no shell completion (typer's hook answered _OBLIVIATE_COMPLETE though none is offered)
        result = command.main(args=words, prog_name="obliviate", complete_var="", standalone_mode=False)
    except typer.TyperException as err:  # click's UsageError and BadParameter (typer vendors click)
        ctx = getattr(err, "ctx", None)  # none for an option given without its value
        name = ctx.command_path if ctx is not None else _command_path(command, words)
        if ctx is not None:
            print(f"{ctx.get_usage()}\nTry '{name} --help' for help.", file=sys.stderr)
        print(f"{name}: error: {_said(err, ctx)}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    if not isinstance(result, Args):  # --help or --version printed, or a Ctrl-C while parsing: its exit code
        raise SystemExit(result)
    return result


def _said(err: Any, ctx: Any) -> str:
    """click's message for ``err``; for a missing or unknown command, with the commands there are to choose from."""
    # typer's own copy of click: typer 0.29 exports BadParameter, Context, Exit and Abort, not NoSuchOption (nor
    # UsageError), hence the pin typer<0.30 in pyproject.toml
    from typer._click.exceptions import NoSuchOption
    from typer.core import TyperGroup

    if isinstance(err, NoSuchOption) and err.possibilities:
        # click offers any option difflib finds close, `--` included: `--bogus` got "(Possible options: --blocks)"
        bare = err.option_name.lstrip("-")
        err.possibilities = [name for name in err.possibilities if _alike(bare, name.lstrip("-"))]
    message = str(err.format_message())
    if ctx is None or not isinstance(ctx.command, TyperGroup):
        return message
    names = ", ".join(name for name, command in ctx.command.commands.items() if not command.hidden)
    if message == "Missing command.":
        kind = (ctx.command.subcommand_metavar or "COMMAND").split()[0]  # ACTION, SWEEP
        return f"name a{'n' if kind[0] in 'AEIOU' else ''} {kind}: {names}."
    if message.startswith("No such command"):
        return f"{message} Choose one of: {names}."
    return message


def _alike(typed: str, name: str) -> bool:
    """Whether ``name`` is close enough to ``typed`` to suggest: difflib's default cutoff, 0.6, on the names alone."""
    from difflib import SequenceMatcher

    return SequenceMatcher(None, typed, name).ratio() >= 0.6


def _refuse_an_option_as_a_value(root: object, words: list[str]) -> None:
    """A usage error for an option whose value is missing, the next word being another option (``--data --blocks 3``).

    click takes the word after an option as its value, even another option: ``--reason --no-event`` kept
    "--no-event" as the reason and sent the event, and ``--data --blocks 3`` ended in "unexpected extra argument
    (3)". argparse refused both; so does this, before click parses. A value given with ``=`` (``--reason=--now``)
    is a value whatever it looks like.
    """
    from typer._click.exceptions import NoSuchOption, UsageError  # typer 0.29 exports neither (see _said)
    from typer.core import TyperGroup, TyperOption

    command: Any = root
    ctx = typer.Context(command, info_name="obliviate", **command.context_settings)
    rest = iter(words)
    while isinstance(command, TyperGroup):  # the command's words (`target train`); the app's own options take no value
        word = next(rest, None)
        if word is None:
            return
        if word.startswith("-"):
            continue
        sub = command.commands.get(word)
        if sub is None:
            return  # click says it is no command
        command, ctx = sub, typer.Context(sub, info_name=word, parent=ctx, **sub.context_settings)
    if isinstance(command, TyperGroup):
        return
    names = {name for param in command.params for name in (*param.opts, *param.secondary_opts)}
    names |= set(ctx.help_option_names)
    takes_value = {
        name: param
        for param in command.params
        if isinstance(param, TyperOption) and not param.is_flag and not param.count
        for name in param.opts
    }
    for word in rest:
        if word == "--":
            return
        param = takes_value.get(word)
        if param is None:
            if not word.startswith("-") and not ctx.allow_interspersed_args:
                return  # submit: the job's words from here on are the job's
            if ctx.ignore_unknown_options and word.startswith("--") and word.split("=", 1)[0] not in names:
                # submit passes unknown options on to its job, but one before the job's command is no job's
                raise NoSuchOption(word.split("=", 1)[0], ctx=ctx)
            continue
        value = next(rest, None)
        if value is not None and value.split("=", 1)[0] in names:
            raise UsageError(f"option {param.opts[0]} needs a value; got the option {value} after it", ctx=ctx)


def _command_path(command: object, words: list[str]) -> str:
    """``obliviate target train``: the commands ``words`` name before their options."""
    path = ["obliviate"]
    for word in words:
        command = getattr(command, "commands", {}).get(word)
        if command is None:
            break
        path.append(word)
    return " ".join(path)


class _OwnErrorsSaidOnce(logging.Filter):
    """Drops a flow or task run's "encountered an exception" record when the error is one of ours.

    Such an error states its rule and fix, and it was said three times on stderr: by Prefect's
    "Encountered exception during execution" line, by the run's "Finished in state Failed(...)" line
    that follows it, and by :func:`main` as the command's error. The flow run's state line stays (it
    says how the run ended, in the UI's log too, and holds the sentence where no command prints it, as
    under ``serve``); the record before it, with its traceback, goes. A task run's state line goes too
    once its own error was dropped: the flow that called the task says the same sentence in its state
    line (or, where it goes on, in its own warning), and the task run's state keeps it in the UI. A stop
    by SIGTERM, which :func:`main` says in a sentence, keeps its line but loses the traceback.
    """

    def __init__(self) -> None:
        super().__init__()
        self._task_runs_failed_with_own_error: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        # The error also when flows.runtime's filter, on prefect.flow_runs for good after an earlier command in
        # this process, took the traceback off first.
        error = record_error(record)
        task_run = getattr(record, "task_run_id", None)
        if isinstance(error, ObliviateError):
            if task_run is not None:
                self._task_runs_failed_with_own_error.add(task_run)
            return False
        if task_run in self._task_runs_failed_with_own_error and record.getMessage().startswith(
            "Finished in state Failed("
        ):
            self._task_runs_failed_with_own_error.discard(task_run)
            return False
        if error is not None and _caused_by_termination(error):
            drop_traceback(record)
        return True


# The loggers whose records Prefect's engine creates for a run's failure.
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command is None:
        print(args.help, file=sys.stderr)
        print(
            "\nobliviate: error: name a COMMAND (listed above); obliviate COMMAND --help shows its options.",
            file=sys.stderr,
        )
        return 2
    try:
        with logger_filter(_RUN_LOGGERS, _OwnErrorsSaidOnce()), _sigterm_raises():
            return int(args.handler(args) or 0)
    except ObliviateError as err:
        print(f"obliviate {command_name(args)}: error: {error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        if isinstance(err, _Terminated):
            print(interrupted_message(args, how="stopped by SIGTERM"), file=sys.stderr)
            return EXIT_TERMINATED
        print(interrupted_message(args), file=sys.stderr)
        return EXIT_INTERRUPTED
    except BaseException as err:
        # Inside a flow run Prefect turns SIGTERM into its TerminationSignal (sometimes wrapped by a
        # Ray call it interrupted, as a SystemError): the same stop, said the same way.
        if not _caused_by_termination(err):
            raise
        print(interrupted_message(args, how="stopped by SIGTERM"), file=sys.stderr)
        return EXIT_TERMINATED


def run() -> NoReturn:
    """The ``obliviate`` console script: :func:`main`, then a prompt exit.

    A command that used Ray took about 6 s to exit after its last line: Ray's shutdown at exit,
    then the interpreter walking every object it still held. Ray is shut down here, and the
    objects left are frozen out of the collector's way (tests call :func:`main`, which does neither).
    A command that succeeded (exit 0) also removes the session folder of each local Ray runtime it
    started (Ray never does, so every command left one in /tmp/ray); a failed or interrupted one keeps
    them, logs and all. Here, once the whole command is done with Ray: ``demo`` runs others in-process.
    """
    import gc

    code = main()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    runtime = sys.modules.get("flows.runtime")  # not imported: no Ray runtime was started through it
    if code == 0 and runtime is not None:
        runtime.remove_local_ray_sessions()
    gc.freeze()
    sys.exit(code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside a flow run, raised like Ctrl-C so the same clean-up runs on the way out."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM stops the command like Ctrl-C (it killed the process without a word, exit -15).

    Only where nobody else handles it: the main thread, and the default handler in place (or the console script's,
    :mod:`flows._entry`, which also hands Ctrl-C over to Python's KeyboardInterrupt here). A command that handles
    SIGTERM itself (``serve``) installs its own handler inside, and Prefect installs its own for the length of each
    flow run. On the way out the handlers found are put back; where one names what should follow the command
    (``after_command``: the console script's, which exits 130 or 143 once the process has cleaned up), that. So a
    SIGTERM after the command still ends the console script with 143 (the default put back ended it with -15).

    A signal the command ignores by then stays ignored: a server stopped by Ctrl-C ignores further ones
    (:func:`flows.model_server.ignore_stop_signals`), for a stop has nothing left to stop, and GNU ``timeout`` sends a
    second. Putting the console script's handler back over that reopened them until the clean-up at exit ignored
    them again: one landing in between ended ``target serve`` with "interrupted while exiting" and 130, not 0.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    found = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    raising = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
    taken = [
        signum
        for signum, handler in found.items()
        if hasattr(handler, "after_command") or (signum == signal.SIGTERM and handler == signal.SIG_DFL)
    ]
    for signum in taken:
        signal.signal(signum, raising[signum])
    try:
        yield
    finally:
        _put_back(
            [
                (signum, _after_command(found[signum], signum))
                for signum in taken
                if signal.getsignal(signum) != signal.SIG_IGN
            ]
        )


def _after_command(handler: Any, signum: int) -> Any:
    """What to put back once the command has ended: ``handler``, or what it names (the console script's)."""
    follow = getattr(handler, "after_command", None)
    return handler if follow is None else follow(signum)


def _put_back(handlers: list[tuple[int, Any]]) -> None:
    """Installs each of ``handlers`` (signal, handler), all of them even if a signal raises on the way."""
    import signal

    if handlers:
        try:
            signal.signal(*handlers[0])
        finally:
            _put_back(handlers[1:])


def _caused_by_termination(err: BaseException) -> bool:
    from prefect.exceptions import TerminationSignal

    seen: BaseException | None = err
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, TerminationSignal):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


#: What a Ctrl-C leaves behind, for commands that store nothing to resume from.
_INTERRUPTED = {
    "steal": (
        "the report's files in --out are replaced together only when an audit ends, so --out holds the previous "
        "report, whole, or none. An audit keeps nothing to resume from: rerunning the command starts it over."
    ),
    "forget": "no request was filed yet, so the ledger is as it was; rerunning the command files it.",
    "verify": (
        "a replay's result is recorded (ledger/verifications/) only when it ends, so the replay under way left "
        "nothing, and the models are untouched (verify only reads them); of a sharded run, the shards already "
        "verified have their results recorded. A replay keeps nothing to resume from: rerunning the command replays "
        "every block asked for again."
    ),
    "target train": (
        "the checkpoint (--out) is written whole only when training ends, so it was left as it was. Training "
        "keeps nothing to resume from: rerunning the command starts it over."
    ),
}


def command_name(args: Args) -> str:
    """The command with its action (``store check``, ``target train``); ``tune``'s sweep kind is its argument."""
    action = next((getattr(args, dest) for dest in ("action", "store_action") if getattr(args, dest, None)), None)
    return " ".join(str(part) for part in (args.command, action) if part)


def interrupted_message(args: Args, *, how: str = "interrupted") -> str:
    """The line a command stopped by Ctrl-C (or SIGTERM: ``how``) prints: what it left behind and what a rerun does.

    A command whose state at the stop decides that sets ``args.interrupted_note`` as it goes (``forget``: once its
    request is filed, rerunning it would file a second one).
    """
    name = command_name(args)
    # a command whose state at the stop decides what a rerun does says it as it goes (``forget``: filed or not)
    left = (
        getattr(args, "interrupted_note", None)
        or _INTERRUPTED.get(name)
        or (
            "stores hold only whole objects, so nothing half-written was kept; rerunning the same command resumes "
            "from whatever it had stored."
        )
    )
    return f"obliviate {name}: {how}. {left[0].upper()}{left[1:]}"


def error_message(err: ObliviateError) -> str:
    """The error's own words; for one raised in a Ray worker, the worker's error without Ray's traceback.

    Ray re-raises a worker's exception as a ``RayTaskError`` that is also an instance of the
    original class, but whose text is the remote traceback; the original is its ``cause``.
    """
    cause = getattr(err, "cause", None)
    return str(cause) if isinstance(cause, ObliviateError) else str(err)
