"""Storage exceptions: every backend error leaves :mod:`storage` as one of these.

Each derives from the builtin a caller would naturally catch (``FileNotFoundError``,
``ConnectionError``, ``ValueError``) and from :class:`obliviate.errors.ObliviateError`, so the
CLI reports it as a clean error and retry logic can key on ``ConnectionError``.
"""

from __future__ import annotations

from obliviate.errors import ObliviateError


class StorageError(ObliviateError, OSError):
    """Base class of storage failures."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """No committed object under this key (it was never written, or its write never finished)."""


class ObjectExists(StorageError, FileExistsError):
    """An object created only if absent (:meth:`storage.objects.ObjectStore.put_json_once`) was already stored."""


class StorageUnavailable(StorageError, ConnectionError):
    """The backend could not be reached or refused the request; retrying later may succeed."""


class CorruptObject(ObliviateError, ValueError):
    """An object's bytes do not match the checksum recorded when it was committed."""


class PointerConflict(ObliviateError, RuntimeError):
    """A compare-and-swap on a pointer found a different version than the caller expected."""


class StoreNotShared(StorageError):
    """A worker's node reads another store at the URL it was handed than the process that handed out the work.

    A ``file://`` folder that only the driver's machine has, or another S3 endpoint or bucket: what the driver
    wrote before handing the work out is not there. The worker stopped before writing
    (:func:`storage.objects.not_shared_text` says what was missing and the fix).
    """


class WriteFailed(StorageError):
    """A write did not happen (missing bucket or folder, no permission, read-only store): nothing was stored."""
