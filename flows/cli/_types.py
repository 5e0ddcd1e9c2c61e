"""What the commands share to declare their options on typer: the apps' settings, option helpers and value types.

A value type is a function from the option's text to its value, given to ``typer.Option(parser=...)``;
a bad value raises :class:`typer.BadParameter`, so the parser refuses it before any work, as
``obliviate CMD: error: Invalid value for '--seed': a seed is ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any, TypeVar

import typer

from obliviate.data import dataset_source
from obliviate.errors import ConfigError

T = TypeVar("T")


class Args(SimpleNamespace):
    """A command line, parsed: ``command`` (``train``), its action where it has one (``action``: ``target train``;
    ``store_action``; ``sweep``), ``handler`` (a function of these arguments returning the exit code) and one
    attribute per option, named as the option without its dashes (``--batch-size``: ``batch_size``)."""


#: Every app and sub-app: plain help (no rich markup: the same text on every terminal and in tests), no shell
#: completion options, no rich tracebacks (main prints our errors as one line), ``-h`` as well as ``--help``, and help
#: as wide as the terminal ($COLUMNS), like argparse's (click's stops at 80 columns).
APP_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": None,
    "context_settings": {"help_option_names": ["-h", "--help"], "max_content_width": 10_000},
}


def new_app(**settings: Any) -> typer.Typer:
    """A typer app (a command group) with :data:`APP_SETTINGS`."""
    return typer.Typer(**(APP_SETTINGS | settings))


def parsed(ctx: typer.Context, handler: Callable[[Args], int], **extra: Any) -> Args:
    """The command line of ``ctx`` (a command's context) as :class:`Args`: its options' values by name."""
    command = ctx.command_path.split()[1]  # "obliviate target train": target
    # An option given another option as its value (`--reason --no-event`) is refused before: flows.cli.parse_args.
    return Args(command=command, handler=handler, **extra, **ctx.params)


def usage_error(ctx: typer.Context, message: str) -> typer.TyperException:
    """A usage error of the command of ``ctx`` (two options that exclude each other, say): exit 2, like a bad value."""
    # typer's own copy of click (hence the pin typer<0.30): typer 0.29 exports BadParameter, a UsageError whose
    # message reads "Invalid value: ...", not UsageError itself
    from typer._click.exceptions import UsageError

    return UsageError(message, ctx=ctx)


def option(*flags: str, help: str, metavar: str | None = None, parser: Callable[[str], Any] | None = None) -> Any:
    """An option that takes a value; its help states its default itself (typer's ``[default: ...]`` is not added).

    The value is shown as argparse did: ``--run-id RUN_ID``, unless ``metavar`` says otherwise.
    """
    shown = metavar or flags[0].lstrip("-").replace("-", "_").upper()
    return typer.Option(*flags, help=help, metavar=shown, parser=parser, show_default=False)


def flag(name: str, *, help: str) -> Any:
    """An option without a value, off unless given (``--quick``; no ``--no-quick`` twin)."""
    return typer.Option(name, help=help, show_default=False)


def integer(text: str) -> int:
    """An integer option's value, as ``int()`` reads it."""
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a valid integer.") from None


def number(text: str) -> float:
    """A number option's value, as ``float()`` reads it (``1e-3``, ``inf``)."""
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a valid number.") from None


def choice(*values: str) -> Callable[[str], str]:
    """The value type of an option that takes one of ``values``."""

    def one_of(text: str) -> str:
        if text not in values:
            raise typer.BadParameter(f"{text!r} is not one of {', '.join(map(repr, values))}.")
        return text

    return one_of


def choices(*values: str) -> str:
    """How an option of :func:`choice` shows its value in ``--help``: ``{lenet5,c3f2,resnet18}``."""
    return "{" + ",".join(values) + "}"


def flag_named(err: ConfigError, *, flags: Mapping[str, tuple[str, object]]) -> ConfigError:
    """``err`` with the flag of the setting it names, from ``flags`` (setting: (flag, default)).

    obliviate's messages speak of the config (``num_blocks must be ...``); a command reports them as
    ``--blocks (num_blocks) must be ... Pass another --blocks (default 6).``. A message that names no
    setting of ``flags``, or already its flag, is kept; one that says its default gets only the flag.
    """
    message = str(err)
    field, _, rest = message.partition(" ")
    if field not in flags or not rest:
        return err
    flag, default = flags[field]
    if flag in message:
        return err
    named = flag if flag == "--" + field.replace("_", "-") else f"{flag} ({field})"
    if "default" in rest:  # the message says its default already ("The spec default is 256.")
        return ConfigError(f"{named} {rest}")
    return ConfigError(f"{named} {rest} Pass another {flag} (default {default}).")


#: The largest seed: numpy's generators refuse negative seeds, torch.manual_seed anything past 64 bits, and
#: seeds are offset (ensemble members take seed + i), so a signed 64-bit integer is the range all of them take.
MAX_SEED = 2**63 - 1


def seed(text: str) -> int:
    """A random seed: an integer in ``0..MAX_SEED``."""
    try:
        value = int(text)
    except ValueError:
        raise typer.BadParameter(f"a seed is an integer >= 0; got {text!r}.") from None
    if value < 0:
        raise typer.BadParameter(f"a seed is an integer >= 0; got {value}. Use 0, 1, 2, ...")
    if value > MAX_SEED:
        raise typer.BadParameter(
            f"a seed is an integer in 0..{MAX_SEED} (what numpy and torch both take); got {value}. Use a smaller one."
        )
    return value


def dataset(text: str) -> str:
    """A dataset option's value (:func:`obliviate.data.dataset_source`); an empty one is refused, as it would
    name the current folder."""
    if not text.strip():
        raise typer.BadParameter(
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
