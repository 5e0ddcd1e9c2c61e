"""Option value types shared by the commands: a bad value is refused by the parser, before any work."""

from __future__ import annotations

import argparse


def seed(text: str) -> int:
    """A random seed: an integer >= 0 (numpy's generators refuse negative seeds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0; got {text!r}.") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0; got {value}. Use 0, 1, 2, ...")
    return value
