"""The ``obliviate`` console script (pyproject's ``[project.scripts]``): Ctrl-C and SIGTERM said from its first line.

Python takes about 0.3 s to import the command line (typer, numpy, the commands' modules) before
:func:`flows.cli.main` handles Ctrl-C and SIGTERM itself; a Ctrl-C in that time printed a KeyboardInterrupt
traceback and a SIGTERM ended the process with -15. So this module, which imports nothing heavy (it is not under
:mod:`flows.cli`, whose package imports typer and numpy), first installs :class:`_WhileStarting`: one line, exit 130
(Ctrl-C) or 143 (SIGTERM). While the command runs, :func:`flows.cli.main` puts its own handling in its place.

A signal the caller ignores (SIGINT for a job started in the background by a script) stays ignored.
"""

# Only modules the interpreter has loaded already (and signal, 1 ms): the handlers are installed within 1 ms of the
# first line (typing alone took 10 ms).
import signal
import sys


def _how(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"


class _WhileStarting:
    """SIGINT's and SIGTERM's handler until the command runs: one line, then exit 130 or 143 (nothing was started).

    :func:`flows.cli.main` replaces it while the command runs, then puts back ``after_command(signum)``.
    """

    @staticmethod
    def after_command(signum: int) -> object:
        return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL

    def __call__(self, signum: int, frame: object) -> None:
        print(f"obliviate: {_how(signum)} while starting, before the command ran; nothing was done.", file=sys.stderr)
        raise SystemExit(128 + signum)


def _install() -> None:
    starting = _WhileStarting()
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) is default:
            signal.signal(signum, starting)


_install()


def run() -> None:
    """:func:`flows.cli.run`, imported only now that Ctrl-C and SIGTERM are handled."""
    from flows.cli import run as run_command

    run_command()
