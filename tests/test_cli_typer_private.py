"""The command line takes from typer's private copy of click (``typer._click``) only what typer does not export.

typer 0.29 exports BadParameter, Context, Exit, Abort and TyperException; the command line imported Context from
``typer._click.core`` all the same. What stays private (NoSuchOption, UsageError) is why pyproject pins typer<0.30.
"""

from __future__ import annotations

import ast
from pathlib import Path

import typer

CLI = Path(__file__).resolve().parent.parent / "flows" / "cli"


def _private_click_names() -> dict[str, set[str]]:
    """Each name the command line's modules take from ``typer._click``, with the modules that take it."""
    found: dict[str, set[str]] = {}
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("typer._click"):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.startswith("typer._click")]
            elif isinstance(node, ast.Attribute) and node.attr == "_click":
                names = [ast.unparse(node)]
            for name in names:
                found.setdefault(name, set()).add(path.name)
    return found


def test_only_what_typer_does_not_export_comes_from_its_private_click():
    used = _private_click_names()
    assert set(used) == {"NoSuchOption", "UsageError"}, used  # Context was imported from typer._click.core
    exported = sorted(name for name in used if hasattr(typer, name))
    assert not exported, f"typer now exports {exported}: import them from typer, and see whether the pin can go"
