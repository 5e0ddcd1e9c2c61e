"""Local files written whole: a reader, or a rerun after a crash, never finds half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_whole(path: str | os.PathLike, *, write: Callable[[Path], object]) -> Path:
    """Run ``write`` on a file beside ``path``, then rename that file onto ``path``.

    The rename is atomic on one file system, so ``path`` holds the old content or the new, never a
    part. On failure the partial file is removed and ``path`` is left as it was.

    Args:
        path: the final file.
        write: writes the whole content to the file it is given (e.g. ``lambda p: p.write_bytes(data)``).
    """
    final = Path(path)
    partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final
