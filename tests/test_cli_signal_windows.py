"""Ctrl-C and SIGTERM outside the command itself: while ``obliviate`` starts, and once the command has ended.

Python takes about 0.3 s to import the command line before :func:`flows.cli.main` handles the signals; a Ctrl-C then
printed a KeyboardInterrupt traceback (exit -2) and a SIGTERM ended the process with -15. And main put SIGTERM's
default back on its way out, so a SIGTERM while the process exited (Ray's shutdown, the clean-up at exit) ended it
with -15 too. Now the console script (:mod:`flows._entry`) handles both from its first lines: 130 or 143 and one line.

Each process is held at a chosen point (a ``sitecustomize`` on PYTHONPATH: an import hook, or a wrapped
``gc.freeze``, which :func:`flows.cli.run` calls once the command has returned) and signalled once it says it is
there: no timing race.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("obliviate")

# Writes $HOLD_MARK once the process reaches the point, then waits there until $HOLD_RELEASE exists (30 s at most).
_SITECUSTOMIZE = """
import os, sys, time

def _hold():
    open(os.environ["HOLD_MARK"], "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(os.environ["HOLD_RELEASE"]) and time.monotonic() < deadline:
        time.sleep(0.01)

_at = os.environ["HOLD_AT"]
if _at.startswith("import "):
    class _HoldAtImport:
        def find_spec(self, name, path=None, target=None):
            if name == _at[len("import "):]:
                _hold()
            return None

    sys.meta_path.insert(0, _HoldAtImport())
else:  # "after the command" or "at exit": flows.cli.run freezes the collector once main has returned
    import atexit, gc
    _freeze = gc.freeze

    def _freeze_held():
        if _at == "at exit":
            atexit.register(_hold)  # runs with the clean-up at exit (Ray's shutdown, Prefect's)
        else:
            _hold()
        _freeze()

    gc.freeze = _freeze_held
"""


def _run_held(tmp_path: Path, command: list[str], at: str, signum: int) -> tuple[int, str]:
    """Runs ``command``, sends ``signum`` once it is held ``at`` its point, then lets it go on; its code and stderr."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    mark, release = tmp_path / "held", tmp_path / "release"
    env = {**os.environ, "HOLD_AT": at, "HOLD_MARK": str(mark), "HOLD_RELEASE": str(release)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    # a Python handler here (not SIG_IGN, as in a job a script started in the background) is SIG_DFL in the child
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert process.poll() is None, process.communicate()[1].decode()
            assert time.monotonic() < deadline, f"never reached {at!r}"
            time.sleep(0.01)
        process.send_signal(signum)
        release.touch()
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, err.decode()


STARTING = {
    signal.SIGINT: (130, "obliviate: interrupted while starting, before the command ran; nothing was done."),
    signal.SIGTERM: (143, "obliviate: stopped by SIGTERM while starting, before the command ran; nothing was done."),
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(
    "at",
    [
        "import flows.cli",  # the console script's own import of the command line (typer, numpy)
        "import flows.cli.train",  # parsing: main builds the app, importing every command's module
    ],
)
def test_a_signal_while_the_console_script_starts_ends_it_with_one_line(tmp_path, at, signum):
    code, err = _run_held(tmp_path, [str(SCRIPT), "train", "--help"], at, signum)
    assert (code, err.strip()) == STARTING[signum]  # was -2 with a KeyboardInterrupt traceback, or -15


def test_python_m_flows_cli_says_a_ctrl_c_while_parsing_the_same_way(tmp_path):
    code, err = _run_held(tmp_path, [sys.executable, "-m", "flows.cli", "train", "--help"], "import flows.cli.train", 2)
    assert (code, err.strip()) == STARTING[signal.SIGINT]


@pytest.mark.parametrize(
    ("at", "signum", "said"),
    [
        ("after the command", signal.SIGTERM, "stopped by SIGTERM"),
        ("after the command", signal.SIGINT, "interrupted"),
        ("at exit", signal.SIGTERM, "stopped by SIGTERM"),
    ],
)
def test_a_signal_once_the_command_has_ended_still_ends_it_with_130_or_143(tmp_path, at, signum, said):
    """main put SIGTERM's default back on its way out: a SIGTERM then ended the process with -15 (a Ctrl-C
    printed a KeyboardInterrupt traceback). The command's own error is said first; the exit code is the signal's."""
    command = [str(SCRIPT), "store", "check", "--store", str(tmp_path / "no-store")]
    code, err = _run_held(tmp_path, command, at, signum)
    lines = err.strip().splitlines()
    assert code == 128 + signum, err
    assert "Traceback" not in err
    assert lines[0].startswith("obliviate store check: error: store ") and "does not exist" in lines[0]
    assert lines[1:] == [f"obliviate: {said} while exiting, after the command had ended."]


def test_main_in_process_puts_back_the_handlers_it_found(tmp_path, capsys):
    """Callers of main (tests, the demo) keep their handlers: SIGTERM's default or another's (Prefect's, Ray's)."""
    from flows.cli import main

    def others(signum: int, frame: object) -> None:
        pass

    found = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        for term in (signal.SIG_DFL, others):
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, term)
            assert main(["store", "check", "--store", str(tmp_path / "no-store")]) == 2
            assert signal.getsignal(signal.SIGTERM) == term
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for signum, handler in found.items():
            signal.signal(signum, handler)
