"""Every option whose default is a value says it in ``--help`` (the docs quote those defaults; the help must too)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from flows.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
NOT_CHECKED_HERE: set[tuple[str, ...]] = set()


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif action.option_strings and action.help != argparse.SUPPRESS:
            yield path, action


def _valued(action: argparse.Action) -> bool:
    silent = (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._VersionAction)
    return not isinstance(action, silent) and action.default is not None


def _help_of(path: tuple[str, ...], flag: str) -> str | None:
    for where, action in _options(build_parser()):
        if where == path and flag in action.option_strings:
            return action.help or ""
    return None


def test_every_option_with_a_default_states_it_in_help() -> None:
    missing = [
        f"obliviate {' '.join(path)} {action.option_strings[-1]} (default {action.default!r})"
        for path, action in _options(build_parser())
        if _valued(action) and path not in NOT_CHECKED_HERE and "default" not in (action.help or "").lower()
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
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
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
    for _, action in _options(build_parser()):
        for flag in action.option_strings:
            helps.setdefault(flag, []).append(action.help or "")
    wrong = []
    for flag, default in sorted(quoted):
        value = default.removeprefix("./")
        said = [h for h in helps.get(flag, []) if "default" in h and (not value[0].isdigit() or value in h)]
        if not said:
            wrong.append(f"{flag} (docs: default {default}; help: {helps.get(flag)})")
    assert not wrong, wrong
