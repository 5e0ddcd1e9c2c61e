"""Edges of the typer command line that argparse handled and the first typer version did not."""

from __future__ import annotations

import pytest

from flows.cli import parse_args


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["train", "--run-id", "x2", "--data", "--blocks", "3"],
            "obliviate train: error: option --data needs a value; got the option --blocks after it",
        ),
        (
            ["train", "--run-id", "--blocks", "3"],
            "obliviate train: error: option --run-id needs a value; got the option --blocks after it",
        ),
        (
            ["target", "train", "--out", "--seed", "1"],
            "obliviate target train: error: option --out needs a value; got the option --seed after it",
        ),
    ],
)
def test_an_option_without_its_value_before_an_option_that_takes_one_is_named(capsys, argv, said):
    """`--data --blocks 3` took --blocks as the data and ended in "Got unexpected extra argument(s) (3)"."""
    err = refused(capsys, argv)
    assert said in err
    assert "unexpected extra argument" not in err


def test_a_value_given_with_equals_may_look_like_an_option():
    """`--reason='--now'` was refused as an option without its value; the old CLI's own error advised that form."""
    args = parse_args(["forget", "--ids", "5", "--data", "digits", "--reason=--now", "--no-event"])
    assert args.reason == "--now"


def help_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        parse_args([*argv, "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


def test_help_is_as_wide_as_the_terminal_and_breaks_no_word(capsys, monkeypatch):
    """click's help stopped at 80 columns whatever COLUMNS said, and broke `auto,cluster_centers,...` mid-word."""
    monkeypatch.setenv("COLUMNS", "80")
    narrow = help_of(capsys, ["steal"])
    assert max(map(len, narrow.splitlines())) <= 80
    for name in ("cluster_centers", "jacobian", "adaptive"):
        assert name in narrow
    monkeypatch.setenv("COLUMNS", "200")
    wide = help_of(capsys, ["steal"])
    assert max(map(len, wide.splitlines())) > 100


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["foo"], "obliviate: error: No such command 'foo'. Choose one of: reduce, demo, submit, train, forget,"),
        (["store"], "obliviate store: error: name an ACTION: check."),
        (["target"], "obliviate target: error: name an ACTION: train, serve."),
        (["tune"], "obliviate tune: error: name a SWEEP: unlearning, reduction."),
    ],
)
def test_a_missing_or_unknown_command_lists_the_commands(capsys, argv, said):
    """`obliviate foo` said only "No such command 'foo'." and `obliviate store` "Missing command."."""
    assert said in refused(capsys, argv)


@pytest.mark.parametrize("bogus", ["--bogus", "--bogus=2"])
def test_an_unknown_option_of_submit_before_the_job_is_refused_alone(capsys, bogus):
    """submit passed `--bogus` on to its job, and the error then blamed the job `--bogus train --run-id r`."""
    err = refused(capsys, ["submit", "--timeout", "1", bogus, "--", "train", "--run-id", "r"])
    assert "obliviate submit: error: No such option: --bogus" in err
    assert "job" not in err


def test_the_options_of_the_job_after_the_separator_stay_the_jobs():
    args = parse_args(["submit", "--timeout", "1", "--", "train", "--run-id", "r", "--data", "digits"])
    assert args.job == ["train", "--run-id", "r", "--data", "digits"]


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--run-id", "r", "--data", ""],
        ["reduce", "--data", ""],
        ["forget", "--ids", "1", "--data", "", "--no-event"],
        ["tune", "unlearning", "--data", " "],
    ],
)
def test_an_empty_dataset_is_refused_by_every_command(capsys, argv):
    """train, reduce, forget and tune took `--data ''` as the current folder; target train and steal refused it."""
    err = refused(capsys, argv)
    assert "Invalid value for '--data': a dataset is needed (mnist5k, digits, an .npz file or a folder)" in err


def test_a_ray_address_nobody_answers_at_names_the_option_of_the_command():
    """submit's error told its user to fix --ray-address, an option submit does not have (its own is --address)."""
    from flows.cli.submit import jobs_address
    from flows.runtime import check_ray_address
    from obliviate.errors import ConfigError

    with pytest.raises(ConfigError, match="no Ray cluster answers at 127.0.0.1:9 .*fix --address / RAY_ADDRESS"):
        jobs_address("127.0.0.1:9")
    with pytest.raises(ConfigError, match="fix --ray-address / RAY_ADDRESS"):
        check_ray_address("127.0.0.1:9")


def test_an_unknown_option_is_offered_only_a_close_name(capsys):
    """`--bogus` got "(Possible options: --blocks)": click's difflib counted the two leading dashes as alike."""
    err = refused(capsys, ["train", "--bogus"])
    assert "obliviate train: error: No such option: --bogus" in err
    assert "Possible options" not in err
    assert "No such option: --blokcs (Possible options: --blocks)" in refused(capsys, ["train", "--blokcs", "3"])


def test_no_shell_completion_answers(capsys, monkeypatch):
    """typer's completion hook answered `_OBLIVIATE_COMPLETE=bash_source obliviate` ("Shell source not supported.")
    though the command line offers no completion."""
    monkeypatch.setenv("_OBLIVIATE_COMPLETE", "bash_source")
    assert parse_args([]).command is None
    assert "Shell source" not in capsys.readouterr().out
