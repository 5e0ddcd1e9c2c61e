"""Local files written whole: a reader, or a rerun after a crash, never finds half of one."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from obliviate.errors import ObliviateError


class OutputWriteFailed(ObliviateError, OSError):
    """A local output file could not be written (a full disk, a read-only file system, no permission).

    Raised by :func:`write_whole` and the other writers of a command's local outputs, whose file is
    left as it was: the previous content, whole, or none.
    """


#: Why a write failed, in words, and what to do (``{path}``: "another path", with its option if known), by ``errno``.
_REASONS = {
    errno.ENOSPC: ("the disk is full", "free space on that disk, or choose {path}"),
    errno.EDQUOT: ("the disk quota is used up", "free space within the quota, or choose {path}"),
    errno.EROFS: ("the file system is read-only", "choose {path} on a writable disk"),
    errno.EACCES: ("permission denied", "choose {path} this user may write, or change the permissions"),
    errno.EPERM: ("permission denied", "choose {path} this user may write, or change the permissions"),
    errno.EFBIG: ("the file is too large for that file system", "choose {path} on another disk"),
}


def write_failed(path: str | os.PathLike, err: OSError, *, option: str = "", after: str = "") -> OutputWriteFailed:
    """The error for a failed write of the local file ``path``: the file, the reason in words, the fix.

    Args:
        path: the final file (not its partial).
        err: the operating system's error.
        option: the option that chose the path (``--out``), named in the fix.
        after: said last: what was left and what the failure loses (e.g. "The model was not saved ...").
    """
    reason, fix = _REASONS.get(err.errno or 0, (err.strerror or str(err), "choose {path}"))
    told = f"[Errno {err.errno}] {err.strerror}" if err.errno and err.strerror else str(err)
    said = f"{reason} ({told})" if err.errno in _REASONS else told
    another = f"another path ({option})" if option else "another path"
    ending = f" {after}" if after else ""
    return OutputWriteFailed(f"could not write {os.fspath(path)}: {said}; {fix.format(path=another)}.{ending}")


def write_whole(path: str | os.PathLike, *, write: Callable[[Path], object], lost: str = "", option: str = "") -> Path:
    """Run ``write`` on a file beside ``path``, then rename that file onto ``path``.

    The rename is atomic on one file system, so ``path`` holds the old content or the new, never a
    part. On failure the partial file is removed and ``path`` is left as it was; a failure of the
    operating system (a full disk, a read-only file system, no permission) is raised as
    :class:`OutputWriteFailed`, which names the file and the fix.

    Args:
        path: the final file.
        write: writes the whole content to the file it is given (e.g. ``lambda p: p.write_bytes(data)``).
        lost: what a failed write loses, said last in its error (e.g. "The model was not saved anywhere else.").
        option: the option that chose ``path`` (``--out``), named in that error's fix.
    """
    final = Path(path)
    partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, final)
    except OutputWriteFailed:
        raise
    except OSError as err:
        left = "The file was left as it was (the previous one, whole, or none)."
        raise write_failed(final, err, option=option, after=f"{left} {lost}".strip()) from err
    finally:
        partial.unlink(missing_ok=True)
    return final
