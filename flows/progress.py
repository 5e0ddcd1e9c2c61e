"""A dependency-free progress bar for long CLI work, drawn on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Redraws one line ``label [#####.....] done/total  elapsed`` as work completes."""

    def __init__(self, label: str, *, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._started = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        filled = int(self.width * done / total) if total else self.width
        elapsed = time.perf_counter() - self._started
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if done >= total else ""
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total}  {elapsed:5.1f}s{end}")
        self.stream.flush()
