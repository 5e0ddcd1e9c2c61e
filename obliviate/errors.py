"""Exceptions of the domain package.

Every error states the rule that was broken, the value seen, and how to fix it.
"""


class ObliviateError(Exception):
    """Base class of every error raised on purpose by obliviate."""


class DataError(ObliviateError, ValueError):
    """A dataset could not be loaded or has the wrong shape, dtype or content."""


class ConfigError(ObliviateError, ValueError):
    """An option or argument breaks a documented rule."""
