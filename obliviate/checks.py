"""Argument checks shared by the domain package: whole numbers and index arrays.

Each check is O(1) or one look at an array's dtype, so public functions call them at their
entrance without slowing anything.
"""

from __future__ import annotations

import numbers
from typing import TypeGuard

import numpy as np

from obliviate.errors import ConfigError


def is_whole(value: object) -> TypeGuard[int | np.integer]:
    """True for a Python or numpy integer, False for bools, floats, strings and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def whole_number(value: object, *, name: str, minimum: int) -> int:
    """``value`` as an int, or :class:`ConfigError` unless it is a whole number >= ``minimum``.

    Args:
        value: the argument as passed (numpy integer types are accepted, bools are not).
        name: the argument's name, for the message.
        minimum: the smallest allowed value.

    Raises:
        ConfigError: ``value`` is not an integer, is a bool, or is below ``minimum``.
    """
    if not is_whole(value):
        raise ConfigError(
            f"{name} must be a whole number >= {minimum}; got {value!r} ({type(value).__name__}). Pass an int."
        )
    if value < minimum:  # type: ignore[operator]
        raise ConfigError(f"{name} must be a whole number >= {minimum}; got {value}.")
    return int(value)  # type: ignore[call-overload]


def index_array(values: object, *, name: str) -> np.ndarray:
    """``values`` as a flat C-contiguous int64 array, refusing booleans and non-integer numbers.

    A boolean mask would otherwise be read as the indices 0 and 1, and ``0.7`` truncated to 0.
    Range checks stay with the caller, which knows what the indices point into.

    Raises:
        ConfigError: ``values`` holds booleans, fractions or anything but integers.
    """
    arr = np.asarray(values)
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(
            f"{name} must be integer indices; got an array of dtype {arr.dtype}. Pass positions as ints "
            "(np.flatnonzero(mask) turns a boolean mask into them)."
        )
    return np.ascontiguousarray(arr, dtype=np.int64).reshape(-1)
