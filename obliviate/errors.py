"""Exceptions of the domain package.

Every error states the rule that was broken, the value seen, and how to fix it.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

_Choice = TypeVar("_Choice", bound=Enum)


class ObliviateError(Exception):
    """Base class of every error raised on purpose by obliviate."""


class DataError(ObliviateError, ValueError):
    """A dataset could not be loaded or has the wrong shape, dtype or content."""


class ConfigError(ObliviateError, ValueError):
    """An option or argument breaks a documented rule."""


def named_choice(
    kind: type[_Choice], *, value: object, what: str, error: type[ObliviateError] | None = None, means: str = ""
) -> _Choice:
    """``kind(value)``; otherwise ``error`` (default :class:`ConfigError`) listing the valid names.

    Args:
        kind: the enum of valid names.
        value: a member or its value as given.
        what: the option's name in the message (``schedule``, ``policy``).
        error: the error class to raise.
        means: what the option means, said in brackets after the names.
    """
    try:
        return kind(value)
    except ValueError:
        meaning = f" ({means})" if means else ""
        raise (error or ConfigError)(
            f"{what} must be one of {[member.value for member in kind]}{meaning}; got {value!r}."
        ) from None
