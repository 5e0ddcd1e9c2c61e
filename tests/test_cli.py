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


def test_a_refused_command_line_says_the_command_usage_and_one_error_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["target", "train", "--steps", "x"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Usage: obliviate target train [OPTIONS]" in err
    assert "obliviate target train: error: Invalid value for '--steps': 'x' is not a valid integer." in err
    with pytest.raises(SystemExit):
        main(["train", "--run-id", "r", "--blocks"])
    assert "obliviate train: error: Option '--blocks' requires an argument." in capsys.readouterr().err


def test_an_option_is_not_taken_as_the_value_of_the_option_before_it(capsys):
    """click takes the word after an option as its value: `--reason --no-event` kept "--no-event" as the reason
    and sent the event it asked not to send."""
    with pytest.raises(SystemExit) as stopped:
        main(["forget", "--reason", "--no-event", "--ids", "3"])
    assert stopped.value.code == 2
    assert "option --reason needs a value; got the option --no-event after it" in capsys.readouterr().err


def test_dash_h_is_help_too(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["store", "check", "-h"])
    assert stopped.value.code == 0
    assert "--keep-versions N" in capsys.readouterr().out
