"""The ``obliviate`` command line.

Each sub-command lives in its own module under :mod:`flows.cli` and exposes
``register(subparsers)``, which adds its parser and sets ``handler`` to a function taking the
parsed arguments and returning an exit code. Parsers are built when :func:`main` runs, never
at import time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from obliviate.errors import ObliviateError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="obliviate",
        description="Audit how cheaply a model can be stolen (DRMI) and forget data fast and safely.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ObliviateError as err:
        print(f"obliviate {args.command}: error: {err}", file=sys.stderr)
        return 2
