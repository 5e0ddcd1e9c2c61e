"""The top level of the ``obliviate`` command: no command, ``--version``."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from flows.cli import main


def test_no_command_prints_the_commands_and_how_to_get_their_options(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "reduce" in err and "forget" in err and "steal" in err  # the list of commands, not only "required"
    assert "obliviate COMMAND --help" in err


def test_version_names_obliviate_torch_and_python(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"obliviate {version('obliviate')} (torch {version('torch')}, Python 3.")
