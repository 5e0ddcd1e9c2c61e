"""Object storage: the only layer that touches fsspec / s3fs.

One URL decides the backend (``file://`` by default, ``s3://`` for any S3 endpoint);
checkpoints, MI tiles, subsets, manifests and ledgers are written and read here.
"""

from storage.errors import CorruptObject, ObjectNotFound, PointerConflict, StorageError, StorageUnavailable
from storage.objects import Manifest, ObjectInfo, ObjectStore, Pointer

__all__ = [
    "CorruptObject",
    "Manifest",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "Pointer",
    "PointerConflict",
    "StorageError",
    "StorageUnavailable",
]
