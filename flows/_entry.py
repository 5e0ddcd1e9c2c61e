"""The ``obliviate`` console script (pyproject's ``[project.scripts]``): Ctrl-C and SIGTERM said from its first line.

Python takes about 0.3 s to import the command line (typer, numpy, the commands' modules) before
:func:`flows.cli.main` handles Ctrl-C and SIGTERM itself; a Ctrl-C in that time printed a KeyboardInterrupt
traceback and a SIGTERM ended the process with -15. So this module, which imports nothing heavy (it is not under
:mod:`flows.cli`, whose package imports typer and numpy), first installs :class:`_WhileStarting`: one line, exit 130
(Ctrl-C) or 143 (SIGTERM). While the command runs, :func:`flows.cli.main` puts its own handling in its place; once
the command has ended it puts back :func:`_after_command` instead, so a signal that comes while the process exits
(Ray's shutdown, the clean-up at exit) still ends it with 130 or 143, not -15 and no traceback.

A signal the caller ignores (SIGINT for a job started in the background by a script) stays ignored.
"""

# Only modules the interpreter has loaded already (and signal, 1 ms): the handlers are installed within 1 ms of the
# first line (typing alone took 10 ms).
import atexit
import os
import signal
import sys

_LATE: list[int] = []  # the signals that came outside the command: the first is the exit code


def _how(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"


def _after_command(signum: int, frame: object) -> None:
    """After the command: the exit code becomes the signal's once the clean-up at exit has run; a second signal
    ends the process at once."""
    _LATE.append(signum)
    if len(_LATE) > 1:
        _exit_now(signum)
    print(f"obliviate: {_how(signum)} while exiting, after the command had ended.", file=sys.stderr)


class _WhileStarting:
    """SIGINT's and SIGTERM's handler until the command runs: one line, then exit 130 or 143 (nothing was started).

    :func:`flows.cli.main` replaces it while the command runs, then puts back ``after_command(signum)``.
    """

    @staticmethod
    def after_command(signum: int) -> object:
        return _after_command

    def __call__(self, signum: int, frame: object) -> None:
        _LATE.append(signum)  # what comes next (the clean-up at exit) is the way out: as after the command
        for each in (signal.SIGINT, signal.SIGTERM):
            if isinstance(signal.getsignal(each), _WhileStarting):
                signal.signal(each, _after_command)
        print(f"obliviate: {_how(signum)} while starting, before the command ran; nothing was done.", file=sys.stderr)
        raise SystemExit(128 + signum)


def _exit_now(signum: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its reader gone
            pass
    os._exit(128 + signum)


def _exit_as_signalled() -> None:
    """The last clean-up at exit (registered first, run last): the signal that came after the command is the exit
    code. From here the interpreter only tears itself down, and a signal is ignored (exit: the command's code)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is _after_command or isinstance(signal.getsignal(signum), _WhileStarting):
            signal.signal(signum, signal.SIG_IGN)
    if _LATE:
        _exit_now(_LATE[0])


def _install() -> None:
    starting = _WhileStarting()
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is default:
            signal.signal(signum, starting)
    atexit.register(_exit_as_signalled)


_install()


def run() -> None:
    """:func:`flows.cli.run`, imported only now that Ctrl-C and SIGTERM are handled."""
    from flows.cli import run as run_command

    run_command()
