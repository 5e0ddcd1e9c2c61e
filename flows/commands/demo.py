"""``obliviate demo``: the README's main job on the embedded default."""

from __future__ import annotations

import argparse

from flows.commands.reduce import run_reduce


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the main job on the embedded default (mnist5k, ./runs)")
    parser.add_argument("--out", default="runs", help="folder for every artefact (default ./runs)")
    parser.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    reduce_args = argparse.Namespace(
        data="mnist5k", k=600, bins=256, normalize=False, starts=None, seed=0, out=args.out
    )
    return run_reduce(reduce_args)
