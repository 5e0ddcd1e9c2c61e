"""A logging filter on named loggers for the length of a block.

Only the standard library: :mod:`flows.cli` imports it at its top, to put it around every command, so importing it
must cost nothing (:mod:`flows.runtime`, where 5c13b47 put it, takes 50 to 100 ms more: urllib's HTTP stack).
Filters that take a record's traceback away keep its error on the record (:func:`drop_traceback`), so a filter that
sees the record after them (:func:`record_error`) still knows which error it reports, whatever order they were added in.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

# Where drop_traceback keeps the error of a record whose exc_info it cleared.
_ERROR_ATTRIBUTE = "obliviate_error"


def drop_traceback(record: logging.LogRecord) -> None:
    """Take the traceback off ``record``, keeping its error where :func:`record_error` finds it."""
    if record.exc_info and record.exc_info[1] is not None:
        setattr(record, _ERROR_ATTRIBUTE, record.exc_info[1])
    record.exc_info = None
    record.exc_text = None


def record_error(record: logging.LogRecord) -> BaseException | None:
    """The error ``record`` was logged with, also once a filter before this one dropped its traceback; else None."""
    if record.exc_info and record.exc_info[1] is not None:
        return record.exc_info[1]
    return getattr(record, _ERROR_ATTRIBUTE, None)


@contextlib.contextmanager
def logger_filter(names: Sequence[str], record_filter: logging.Filter) -> Iterator[None]:
    """``record_filter`` on each logger of ``names`` while the block runs, removed after it, however it ends.

    A logger's filter sees every record created there before any handler does, and logging set-ups that run later
    (Prefect's, when the first flow starts) replace handlers but keep filters.

    Args:
        names: the loggers' names (``prefect.flow_runs``).
        record_filter: what each record logged there passes through first (it may drop it, or change it).

    Yields:
        None, once the filter is on every logger.
    """
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(record_filter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(record_filter)
