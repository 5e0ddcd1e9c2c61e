"""A logging filter on named loggers for the length of a block.

Only the standard library: :mod:`flows.cli` imports it at its top, to put it around every command, so importing it
must cost nothing (:mod:`flows.runtime`, where 5c13b47 put it, takes 50 to 100 ms more: urllib's HTTP stack).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence


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
