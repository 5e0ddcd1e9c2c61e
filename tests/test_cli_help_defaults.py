"""Every option whose default is a value says it in ``--help`` (the docs quote those defaults; the help must too)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from flows.cli import build_app

ROOT = Path(__file__).resolve().parent.parent
NOT_CHECKED_HERE: set[tuple[str, ...]] = set()


def _options(command=None, path: tuple[str, ...] = ()):
    """(the command's words, an option) for every option of every command: click's parameters, walked."""
    command = command or typer.main.get_command(build_app())
    for name, sub in getattr(command, "commands", {}).items():
        yield from _options(sub, (*path, name))
    for param in command.params:
        if param.param_type_name == "option" and not param.hidden:
            yield path, param


def _valued(option) -> bool:
    # a flag (--quick, --version; --help is not among a command's params) says nothing but itself
    return not option.is_flag and option.default is not None


def _help_of(path: tuple[str, ...], flag: str) -> str | None:
    for where, option in _options():
        if where == path and flag in option.opts:
            return option.help or ""
    return None


def test_the_walk_sees_every_command_and_option() -> None:
    """The walk below must not pass by seeing nothing: nested commands and their options are there."""
    seen = {(path, flag) for path, option in _options() for flag in option.opts}
    assert {(("train",), "--seed"), (("target", "serve"), "--port"), (("tune", "reduction"), "--ks")} <= seen
    assert {(("store", "check"), "--keep-versions"), ((), "--version")} <= seen
    assert len(seen) > 120


def test_every_option_with_a_default_states_it_in_help() -> None:
    missing = [
        f"obliviate {' '.join(path)} {option.opts[-1]} (default {option.default!r})"
        for path, option in _options()
        if _valued(option) and path not in NOT_CHECKED_HERE and "default" not in (option.help or "").lower()
    ]
    assert not missing, "options whose --help does not give their default: " + "; ".join(missing)


@pytest.mark.parametrize(
    ("path", "flag", "default"),
    [
        (("serve",), "--floor-points", "2"),
        (("serve",), "--audit-cron", "0 3 * * *"),
        (("serve",), "--batch-max", "none"),
        (("steal",), "--budgets", "50,150,200,300,600"),
        (("steal",), "--seeds", "2"),
        (("target", "serve"), "--host", "127.0.0.1"),
        (("target", "serve"), "--port", "8000"),
        (("train",), "--optimizer", "adam"),
        (("train",), "--batch-size", "32"),
        (("train",), "--seed", "0"),
    ],
)
def test_defaults_the_docs_state_are_in_help(path: tuple[str, ...], flag: str, default: str) -> None:
    help_text = _help_of(path, flag)
    assert help_text is not None, (path, flag)
    assert re.search(rf"default:? '?{re.escape(default)}(?![\w.])", help_text), help_text


def test_rendered_help_shows_the_serve_defaults(capsys) -> None:
    from flows.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default '0 3 * * *')" in text and "(default 2;" in text and "(default none: no cap)" in text


def test_every_default_the_docs_quote_for_a_flag_is_in_its_help() -> None:
    """README.md and docs/*.md write "`--flag` (default X" or "`--flag`, default X": some command's --flag says X."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    quoted = {
        (match.group(1), match.group(2).strip("`"))
        for doc in docs
        for match in re.finditer(r"`(--[a-z][a-z-]*)`,? \(?default (`[^`]+`|[^\s;),]+)", doc.read_text())
    }
    assert quoted  # the pattern still finds the docs' defaults
    helps: dict[str, list[str]] = {}
    for _, option in _options():
        for flag in option.opts:
            helps.setdefault(flag, []).append(option.help or "")
    wrong = []
    for flag, default in sorted(quoted):
        value = default.removeprefix("./")
        said = [h for h in helps.get(flag, []) if "default" in h and (not value[0].isdigit() or value in h)]
        if not said:
            wrong.append(f"{flag} (docs: default {default}; help: {helps.get(flag)})")
    assert not wrong, wrong
