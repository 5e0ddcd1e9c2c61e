"""Option value types shared by the commands: a bad value is refused by the parser, before any work."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from obliviate.data import dataset_source
from obliviate.errors import ConfigError

T = TypeVar("T")


#: The largest seed: numpy's generators refuse negative seeds, torch.manual_seed anything past 64 bits, and
#: seeds are offset (ensemble members take seed + i), so a signed 64-bit integer is the range all of them take.
MAX_SEED = 2**63 - 1


def seed(text: str) -> int:
    """A random seed: an integer in ``0..MAX_SEED``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0; got {text!r}.") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0; got {value}. Use 0, 1, 2, ...")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"a seed is an integer in 0..{MAX_SEED} (what numpy and torch both take); got {value}. Use a smaller one."
        )
    return value


def dataset(text: str) -> str:
    """A dataset option's value (:func:`obliviate.data.dataset_source`); an empty one is refused, as it would
    name the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"a dataset is needed (mnist5k, digits, an .npz file or a folder); got {text!r}. Give one, e.g. mnist5k."
        )
    return dataset_source(text)


def comma_list(
    text: str, cast: Callable[[str], T], option: str, *, kind: str | None = None, alike: str = "value"
) -> list[T]:
    """The values of a comma-separated option, each given once.

    Args:
        text: the option's text, e.g. ``"50,150"``; blank parts are skipped.
        cast: makes one value of a part (``int``, ``float``, ``str``), raising ``ValueError`` on a bad one.
        option: the option's flag, for the error (``"--budgets"``).
        kind: how the error names the values (default ``"<cast> values"``, e.g. ``"int values"``).
        alike: what two floats that print alike (``format(v, "g")``) would both name, for the error.

    Raises:
        ConfigError: a part ``cast`` refuses, no value at all, or a value given twice (a float
            counts as its ``"g"`` form: results are keyed by it, so two such values would collide).
    """
    try:
        values = [cast(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        what = kind or f"{getattr(cast, '__name__', 'comma-separated')} values"
        raise ConfigError(f"{option} takes comma-separated {what}; got {text!r}.") from None
    if not values:
        raise ConfigError(f"{option} needs at least one value; got {text!r}.")
    seen: dict[str, T] = {}
    for value in values:
        shown = format(value, "g") if isinstance(value, float) else str(value)
        if shown in seen:
            same = "twice" if seen[shown] == value else f"as {seen[shown]!r} and {value!r}, which name the same {alike}"
            raise ConfigError(f"{option} lists {shown} {same}; got {text!r}. Give each value once.")
        seen[shown] = value
    return values
