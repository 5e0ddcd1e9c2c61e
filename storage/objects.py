"""One small object-store API over fsspec, addressed by URL.

``ObjectStore("file://./runs")`` (the default backend; a bare path means the same) or
``ObjectStore("s3://bucket/prefix")``. For S3 the endpoint and credentials come only from the
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), never from arguments or files
here, so the same code serves AWS, MinIO and a moto test server.

Visibility rule (atomic from a reader's point of view):

* every object is written data first, then a small commit record ``<key>.sha256`` holding its
  SHA-256 and size. Until the commit record exists the object does not exist for
  :meth:`get_bytes`, :meth:`exists` and :meth:`list`; a write that fails half way leaves
  nothing visible. Each single write is itself atomic: a rename on local disk, one PUT on S3.
* reads verify the bytes against the commit record and raise :class:`CorruptObject` on mismatch.
* groups of objects are published by a manifest written last (:meth:`commit_manifest`) that
  records every member's checksum; a reader that finds the manifest finds all members.
* mutable "current" pointers use :meth:`swap_pointer`: versions are create-if-absent objects
  (``O_EXCL`` locally, ``If-None-Match: *`` on S3), so of two writers expecting the same
  version exactly one wins and the other gets :class:`PointerConflict`. A pointer created with
  ``expected_version=0`` doubles as an exactly-once record (e.g. one per request id: a repeat
  gets :class:`PointerConflict`), and its later versions as that record's status transitions;
  :meth:`list_pointers` enumerates them. A pointer each version of which holds its whole state may
  drop its old versions (:meth:`drop_pointer_versions`), never its newest.
* an object that must be written once (a deletion request's record, a run's spec) uses
  :meth:`put_json_once`: its bytes are created by the same create-if-absent write, so of two writers
  exactly one stores it and the other gets :class:`ObjectExists`, never an object replaced.

Objects other than pointers are meant to be written once (or rewritten with identical
content, as deterministic tiles are). Small documents that a process rewrites in place (a
serve's announcement and heartbeat) are read safely too: a read that lands between a rewrite's
data and its commit record sees them disagree, so a mismatch is read again over about 1.5 s
before it is reported as :class:`CorruptObject`; only damage outlasts that.

All backend exceptions are translated in :func:`_translated`, the single boundary. On S3 every
call is also watched there (:func:`storage.retry.watched_call`): a store that stops answering is
reported within about 10 s, and a call it leaves unanswered for 120 s (more for a large transfer)
fails as :class:`StorageUnavailable` instead of waiting out botocore's and s3fs's retries.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import re
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from fsspec.exceptions import FSTimeoutError

from obliviate.errors import ConfigError, ObliviateError
from storage.errors import (
    CorruptObject,
    ObjectExists,
    ObjectNotFound,
    PointerConflict,
    StorageError,
    StorageUnavailable,
    StoreNotShared,
    WriteFailed,
)
from storage.retry import call_overdue, heard_from, unanswered_s, watched_call

COMMIT_SUFFIX = ".sha256"
_TMP_MARK = ".tmp-"
#: The name :meth:`ObjectStore.check_writable` writes at a store's root (and removes at once).
WRITE_CHECK_MARK = f"{_TMP_MARK}write-check-"
_POINTER_VERSION = re.compile(r"^v(\d{9})\.json$")
# Listings of a pointer's versions before a read gives up: a version listed can be dropped before it is read
# (by a burst of swaps and drops from other writers each time).
_POINTER_READ_ATTEMPTS = 10
# How many of the versions it descends from each pointer version names (ObjectStore.swap_pointer): the newest
# version tells whether it descends from a writer's unless that many swaps came after the writer's.
_CHAIN = 32
# Waits before reading a mismatched object again (1.55 s in all): a rewrite in flight settles in
# milliseconds, so only damage outlasts them.
_REREAD_WAITS_S = (0.05, 0.1, 0.2, 0.4, 0.8)
# :meth:`ObjectStore.verify` hashes a local object in pieces of this size, never holding it whole.
_VERIFY_CHUNK_BYTES = 2**20


@dataclass(frozen=True)
class ObjectInfo:
    """A committed object: its key (relative to the store), SHA-256 hex digest and size in bytes."""

    key: str
    sha256: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Manifest:
    """A published group of objects: member name -> :class:`ObjectInfo`, plus free metadata."""

    key: str
    members: dict[str, ObjectInfo]
    metadata: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class Pointer:
    """One version of a mutable pointer (e.g. a run's current model)."""

    key: str
    version: int
    target: dict[str, Any]
    created_at: float


class ObjectStore:
    """Bytes, arrays, JSON and torch state under one URL prefix.

    Args:
        url: ``file:///abs/path``, ``file://./relative``, a plain path, or ``s3://bucket/prefix``.
    """

    def __init__(self, url: str = "file://./runs") -> None:
        self._url, self._protocol, self._root = _parse_url(url)
        self._endpoint_url = _endpoint_from_environment() if self._protocol == "s3" else None
        self._fs_cache: fsspec.AbstractFileSystem | None = None

    # The filesystem object is rebuilt after unpickling (stores travel to Ray actors); only the
    # URL and the endpoint travel, credentials are looked up in the receiving process's environment.
    def __getstate__(self) -> dict[str, Any]:
        return {"url": self._url, "endpoint_url": self._endpoint_url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._url, self._protocol, self._root = _parse_url(state["url"])
        self._endpoint_url = state["endpoint_url"]
        self._fs_cache = None

    def __repr__(self) -> str:
        return f"ObjectStore({self._url!r})"

    @property
    def url(self) -> str:
        """The store's root URL (absolute for local paths)."""
        return self._url

    @property
    def is_local(self) -> bool:
        return self._protocol == "file"

    def uri(self, key: str = "") -> str:
        """Full URL of ``key``, for messages and reports."""
        key = _check_key(key, allow_empty=True)
        return f"{self._url}/{key}" if key else self._url

    def child(self, prefix: str) -> ObjectStore:
        """A store rooted at ``prefix`` inside this one."""
        return ObjectStore(self.uri(_check_key(prefix)))

    # ----- bytes -----------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> ObjectInfo:
        """Write ``data`` under ``key``, then its commit record; returns what was committed.

        Raises:
            ConfigError: ``data`` is not bytes-like (a ``str``: encode it, or use :meth:`put_json`).
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError(
                f"put_bytes stores bytes; got {type(data).__name__}. Encode text first (text.encode()) or use put_json."
            )
        return self.put_chunks(key, [bytes(data)])

    def put_chunks(self, key: str, chunks: Iterable[bytes]) -> ObjectInfo:
        """Write the concatenation of ``chunks``; if producing a chunk fails, nothing is written."""
        key = _check_key(key)
        # Everything is gathered before the first backend call: an exception while producing
        # the data (a crash, a serialisation error) therefore never reaches storage.
        data = b"".join(chunks)
        info = ObjectInfo(key=key, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        with self._backend(self.uri(key), writing=True, payload_bytes=len(data)):
            self._write_atomic(self._path(key), data)
            self._write_atomic(self._path(key) + COMMIT_SUFFIX, _commit_record(data))
        return info

    def get_bytes(self, key: str) -> bytes:
        """The committed bytes of ``key``, verified against their checksum.

        Raises:
            ObjectNotFound: nothing committed under ``key``.
            CorruptObject: the bytes differ from what was committed.
            StorageUnavailable: the backend cannot be reached.
        """
        return self._get_verified(_check_key(key), expected=None)

    def verify(self, key: str) -> None:
        """Check the committed bytes of ``key`` against their checksum, as :meth:`get_bytes` does, without keeping them.

        On a file store the bytes are hashed in pieces (1 MiB), so checking a store holds one piece,
        not its largest object; on S3 they are read in one call, as :meth:`get_bytes` reads them.

        Raises:
            ObjectNotFound: nothing committed under ``key``, or its bytes are gone.
            CorruptObject: the bytes differ from what was committed.
            StorageUnavailable: the backend cannot be reached.
        """
        self._get_verified(_check_key(key), expected=None, keep=False)

    def info(self, key: str) -> ObjectInfo:
        """Checksum and size recorded when ``key`` was committed."""
        key = _check_key(key)
        record = self._read_commit_record(key)
        return ObjectInfo(key=key, sha256=record["sha256"], size=int(record["size"]))

    def exists(self, key: str) -> bool:
        """Whether ``key`` is committed (its commit record exists)."""
        key = _check_key(key)
        with self._backend(self.uri(key)):
            return bool(self._fs.exists(self._path(key) + COMMIT_SUFFIX))

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Committed keys under ``prefix`` (a folder-like prefix), sorted; half-written ones are hidden."""
        return _committed_keys(self._names_under(prefix))

    def list_keys_and_pointers(self, prefix: str = "") -> tuple[builtins.list[str], builtins.list[str]]:
        """:meth:`list` and :meth:`list_pointers` of ``prefix`` from one listing (one walk of a large folder)."""
        names = self._names_under(prefix)
        return _committed_keys(names), _pointer_keys(names)

    def delete(self, key: str) -> None:
        """Remove ``key``: its commit record first, so readers never see data without a record."""
        key = _check_key(key)
        with self._backend(self.uri(key)):
            for path in (self._path(key) + COMMIT_SUFFIX, self._path(key)):
                with contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(path)

    def remove_empty_folder(self, prefix: str) -> None:
        """On a file store, remove the folder ``prefix`` if nothing is left in it; S3 has no folders to remove.

        Best effort: a folder that is not empty (or already gone) stays as it is.
        """
        prefix = _check_key(prefix)
        if self._protocol == "s3":
            return
        with contextlib.suppress(OSError):
            os.rmdir(self._path(prefix))

    # ----- typed helpers ---------------------------------------------------------------------

    def put_array(self, key: str, array: np.ndarray) -> ObjectInfo:
        """A numpy array as ``.npy`` bytes (no pickled objects)."""
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array), allow_pickle=False)
        return self.put_bytes(key, buffer.getvalue())

    def get_array(self, key: str) -> np.ndarray:
        """The array stored by :meth:`put_array`.

        Raises:
            CorruptObject: the bytes are not a ``.npy`` array (another kind of object under this key).
        """
        data = self.get_bytes(key)
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise CorruptObject(
                f"{self.uri(key)} is not a .npy array ({err}); it was written by something other than put_array."
            ) from err

    def put_json(self, key: str, value: Any) -> ObjectInfo:
        """``value`` as JSON; numpy scalars are written as the Python numbers they hold.

        Raises:
            ConfigError: a value JSON cannot hold (an object, an array: convert it first).
        """
        return self.put_bytes(key, self._json_bytes(key, value))

    def put_json_once(self, key: str, value: Any) -> ObjectInfo:
        """``value`` as JSON under ``key`` only if nothing is stored there: of two writers exactly one creates it.

        A check with :meth:`exists` before :meth:`put_json` lets two writers both find the key absent and
        both write (the last one wins, the first one's object is lost). Here the bytes are created
        if absent, as :meth:`swap_pointer`'s versions are (``O_EXCL`` locally, ``If-None-Match: *`` on
        S3), then committed. A writer that finds bytes already there writes none of its own: if they
        are not committed yet (their writer's commit record is in flight, or that writer died before
        writing it) it commits them as found, the same record whoever writes it, so that what it is
        refused for can be read.

        Raises:
            ObjectExists: something is stored under ``key``; read it (:meth:`get_json`) to decide.
            ConfigError: a value JSON cannot hold.
        """
        key = _check_key(key)
        data = self._json_bytes(key, value)
        info = ObjectInfo(key=key, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        path = self._path(key)
        with self._backend(self.uri(key), writing=True, payload_bytes=len(data)):
            try:
                self._create_exclusive(path, data)
            except FileExistsError:
                if not self._fs.exists(path + COMMIT_SUFFIX):
                    found = self._fs.cat_file(path)
                    self._write_atomic(path + COMMIT_SUFFIX, _commit_record(found))
                raise ObjectExists(
                    f"{self.uri(key)} is already stored; it is created once (by whoever writes it first), "
                    "so read it and decide from what it holds."
                ) from None
            self._write_atomic(path + COMMIT_SUFFIX, _commit_record(data))
        return info

    def _json_bytes(self, key: str, value: Any) -> bytes:
        try:
            text = json.dumps(value, indent=2, sort_keys=True, default=_json_scalar)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{self.uri(key)}: the value cannot be stored as JSON ({err}).") from err
        return text.encode()

    def get_json(self, key: str) -> Any:
        """The value stored by :meth:`put_json`.

        Raises:
            CorruptObject: the bytes are not UTF-8 JSON (another kind of object under this key).
        """
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            raise CorruptObject(
                f"{self.uri(key)} is not JSON ({str(err)[:120]}); it was written by something other than put_json."
            ) from err

    def put_torch(self, key: str, state: Any) -> ObjectInfo:
        """Tensors / state dicts via ``torch.save``; read back with :meth:`get_torch`."""
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        return self.put_bytes(key, buffer.getvalue())

    def get_torch(self, key: str) -> Any:
        """Load torch state with ``weights_only=True``: a pickle carrying code is refused.

        Raises:
            CorruptObject: checksum mismatch, or the bytes are not loadable as plain weights.
        """
        import torch

        data = self.get_bytes(key)
        try:
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as err:  # torch raises UnpicklingError / RuntimeError for refused content
            raise CorruptObject(
                f"{self.uri(key)} is not loadable with torch.load(weights_only=True): {err}. Only plain "
                "tensors and containers of them are accepted; re-save the state dict without custom objects."
            ) from err

    # ----- manifests and pointers -------------------------------------------------------------

    def commit_manifest(
        self, key: str, members: Mapping[str, ObjectInfo], metadata: Mapping[str, Any] | None = None
    ) -> ObjectInfo:
        """Publish a group: write a manifest listing each member's checksum, after the members."""
        for name, member in members.items():
            committed = self.info(member.key)
            if committed.sha256 != member.sha256:
                raise CorruptObject(
                    f"manifest member {name!r} ({self.uri(member.key)}) holds sha256 {committed.sha256[:12]}..., "
                    f"not the {member.sha256[:12]}... written; it was overwritten before publication."
                )
        body = {
            "members": {name: member.as_dict() for name, member in members.items()},
            "metadata": dict(metadata or {}),
            "created_at": time.time(),
        }
        return self.put_json(key, body)

    def read_manifest(self, key: str) -> Manifest:
        body = self.get_json(key)
        members = {name: ObjectInfo(**value) for name, value in body["members"].items()}
        return Manifest(key=key, members=members, metadata=body["metadata"], created_at=float(body["created_at"]))

    def get_member(self, manifest: Manifest, name: str) -> bytes:
        """A manifest member's bytes, verified against the checksum in the manifest."""
        if name not in manifest.members:
            raise ObjectNotFound(
                f"manifest {self.uri(manifest.key)} has no member {name!r}; it has {sorted(manifest.members)}."
            )
        member = manifest.members[name]
        return self._get_verified(member.key, expected=member.sha256)

    def read_pointer(self, key: str) -> Pointer | None:
        """The newest version of pointer ``key``, or ``None`` if it was never set.

        A version listed as the newest can be gone when it is read, only if :meth:`drop_pointer_versions`
        dropped it after newer ones were written: the versions are then listed again.
        """
        key = _check_key(key)
        for attempt in range(_POINTER_READ_ATTEMPTS):
            versions = self._pointer_versions(key)
            if not versions:
                return None
            try:
                return self._load_pointer(key, versions[-1])
            except ObjectNotFound:
                if attempt == _POINTER_READ_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")  # the loop returns or raises

    def read_pointer_version(self, key: str, version: int) -> Pointer:
        """One past (or the current) version of pointer ``key``: its history, for audit trails."""
        return self._load_pointer(_check_key(key), version)

    def swap_pointer(self, key: str, target: Mapping[str, Any], *, expected_version: int) -> Pointer:
        """Move pointer ``key`` to ``target`` if its current version is ``expected_version``.

        Use ``expected_version=0`` to create it. The new version is written with
        create-if-absent semantics, so concurrent swaps from the same version cannot both win.

        A pointer whose old versions :meth:`drop_pointer_versions` deletes needs one more step: a writer
        stalled between listing the versions and writing its own could re-create a number dropped
        meanwhile, below versions written since, and its change would be lost. So each version carries
        the nonces of the versions it descends from (``chain``: the one it replaced and, from that one's
        chain, those before, the newest :data:`_CHAIN` of them), and after its write a swap lists the
        versions again: if a newer one is there, the newest must descend from this very version, else
        the swap loses (its version removed when the newest descends from another under its number;
        kept when its chain no longer reaches down this far, as only a burst of swaps in the moment
        since the write leaves it). The newest, not the next one up: a version above this one may be
        another stalled writer's, itself about to lose. On a pointer nobody drops versions of the
        newest always descends.

        Raises:
            PointerConflict: the pointer is at another version; re-read it and decide again.
        """
        key = _check_key(key)
        seen = max(self._pointer_versions(key), default=0)
        if seen != expected_version:
            raise PointerConflict(
                f"pointer {self.uri(key)} is at version {seen}, not the expected {expected_version}; "
                "read it again with read_pointer() and retry from the current version."
            )
        version = expected_version + 1
        moved = PointerConflict(
            f"pointer {self.uri(key)} moved to version {version} while this swap ran; "
            "re-read it and retry from the current version."
        )
        chain: dict[str, str] = {}
        if expected_version:
            try:
                replaced = self._raw_pointer_body(key, expected_version)
            except ObjectNotFound:  # dropped: newer versions were written since it was listed
                raise moved from None
            chain = _descent(replaced, expected_version)
        created_at = time.time()
        nonce = uuid.uuid4().hex[:16]  # 64 random bits: two writers never draw the same
        body = {"version": version, "target": dict(target), "created_at": created_at, "nonce": nonce, "chain": chain}
        payload = json.dumps(body, sort_keys=True)
        data = json.dumps({"body": body, "sha256": hashlib.sha256(payload.encode()).hexdigest()}).encode()
        path = self._path(f"{key}/v{version:09d}.json")
        with self._backend(self.uri(key), writing=True):
            try:
                self._create_exclusive(path, data)
            except FileExistsError as err:
                raise moved from err
        above = self._descent_above(key, version)
        if above is not None and above != nonce:
            if above:  # the newest descends from another version under this number: this one is below the newest
                with self._backend(self.uri(key), writing=True), contextlib.suppress(FileNotFoundError):
                    self._fs.rm_file(path)
            raise moved
        return Pointer(key=key, version=version, target=dict(target), created_at=created_at)

    def drop_pointer_versions(self, key: str, *, keep_last: int = 2) -> builtins.list[int]:
        """Delete the oldest versions of pointer ``key``, keeping its newest ``keep_last``; returns those deleted.

        For a pointer each version of which holds its whole state (a run's pruned record), the older
        versions are copies nobody reads, and keeping them all makes its folder grow with the square of
        its changes. A pointer whose history is read (a request's status history) must keep them all.

        The newest version is never deleted (``keep_last`` >= 1): :meth:`swap_pointer` decides by the
        newest version there is, so deleting it would let a writer that read the version below swap
        again from there, and two writers would both win. Deleting older ones leaves that decision as
        it was: versions are deleted oldest first, and a writer that re-creates a deleted number (it
        listed the versions before they were written and deleted) loses its swap (:meth:`swap_pointer`).
        Keeping more than the newest lets a reader that listed the versions just before a swap still
        read the one it listed (:meth:`read_pointer` lists again if that one is gone).

        Raises:
            ConfigError: ``keep_last`` is not a whole number >= 1.
        """
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError(
                f"drop_pointer_versions keeps at least the newest version (keep_last >= 1), which decides every "
                f"compare-and-swap of the pointer; got keep_last={keep_last!r}."
            )
        key = _check_key(key)
        dropped = self._pointer_versions(key)[:-keep_last]
        for version in dropped:  # oldest first: swap_pointer's check of a re-created number relies on it
            with self._backend(self.uri(key), writing=True), contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(self._path(f"{key}/v{version:09d}.json"))
        return dropped

    def list_pointers(self, prefix: str = "") -> builtins.list[str]:
        """Keys of the pointers under ``prefix`` (e.g. one per ledger entry), sorted."""
        return _pointer_keys(self._names_under(prefix))

    def container_exists(self) -> bool:
        """Whether the bucket (S3) or folder (local) the store lives in exists."""
        with self._backend(self._url):
            if self._protocol == "s3":
                # s3fs's exists() says False for an endpoint it cannot reach: ask for the bucket, so that
                # only "no such bucket" means missing and an outage is reported as one.
                try:
                    self._fs.info(self._root.split("/", 1)[0])
                except FileNotFoundError:
                    return False
                return True
            return os.path.isdir(self._root)

    def ensure_container(self) -> None:
        """Create the bucket (S3) or folder (local) the store lives in, if missing."""
        with self._backend(self._url):
            if self._protocol == "s3":
                bucket = self._root.split("/", 1)[0]
                if not self._fs.exists(bucket):
                    self._fs.mkdir(bucket)
            else:
                try:
                    os.makedirs(self._root, exist_ok=True)
                except OSError as err:  # not "no object at": the folder itself cannot be made here
                    raise WriteFailed(
                        f"cannot create folder {self._root} ({err.strerror or err}); choose a path this process can "
                        "write, or create the folder first."
                    ) from err

    # ----- maintenance (storage.check: integrity checks and orphan collection) ----------------

    def stored_names(self, prefix: str = "") -> builtins.list[str]:
        """Every name stored under ``prefix``: objects, commit records, pointer versions, temporary files."""
        return self._names_under(prefix)

    def pointer_versions(self, key: str) -> builtins.list[int]:
        """The versions pointer ``key`` has had, oldest first."""
        return self._pointer_versions(_check_key(key))

    def get_unverified_json(self, key: str) -> Any:
        """JSON read *without* its checksum check: only to report what a damaged object referred to."""
        key = _check_key(key)
        with self._backend(self.uri(key)):
            return json.loads(self._fs.cat_file(self._path(key)))

    def committed_at(self, key: str) -> float:
        """When ``key`` was committed (0.0 if its commit record does not say)."""
        key = _check_key(key)
        with self._backend(self.uri(key)):
            raw = self._fs.cat_file(self._path(key) + COMMIT_SUFFIX)
        try:
            return float(json.loads(raw).get("committed_at", 0.0))
        except (ValueError, TypeError, AttributeError):
            return 0.0

    def stored_age_s(self, name: str) -> float:
        """Seconds since a stored name (e.g. a temporary file) was last modified."""
        with self._backend(self.uri()):
            info = self._fs.info(self._path(name))
        value = info.get("mtime") or info.get("LastModified") or info.get("created")
        stamp = value.timestamp() if hasattr(value, "timestamp") else float(value or time.time())
        return max(0.0, time.time() - float(stamp))

    def remove_temporary(self, name: str) -> None:
        """Delete a leftover temporary file of a crashed write (never a committed object)."""
        if _TMP_MARK not in name.rsplit("/", 1)[-1]:
            raise ConfigError(f"{name!r} is not a temporary file; delete committed objects with delete().")
        with self._backend(self.uri(), writing=True), contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self._path(name))

    def remove_uncommitted(self, name: str, *, older_than_s: float) -> bool:
        """Delete bytes stored under ``name`` that no commit record commits (a write interrupted before it committed).

        Checked again just before: nothing is removed if ``name`` is committed by now, or its bytes
        were written within ``older_than_s`` seconds (a write in flight commits them next).

        Returns:
            whether the bytes were removed.
        """
        name = _check_key(name)
        if self.exists(name):
            return False
        try:
            if self.stored_age_s(name) < older_than_s:
                return False
        except ObjectNotFound:
            return False
        with self._backend(self.uri(name), writing=True), contextlib.suppress(FileNotFoundError):
            self._fs.rm_file(self._path(name))
        return True

    def check_writable(self) -> None:
        """Write and delete a temporary name at the store's root, to learn early that writes fail.

        The name carries the temporary mark, so listings never show it; it is removed whether the
        write succeeds or fails, and ``store check --repair`` collects one a crash left, whatever its
        age (nothing reads it). Nothing else (no folder) is created.

        Raises:
            WriteFailed: the store cannot be written.
            StorageUnavailable: the backend cannot be reached.
        """
        path = f"{self._root}/{WRITE_CHECK_MARK}{uuid.uuid4().hex[:12]}"
        with self._backend(self.uri(), writing=True):
            try:
                self._fs.pipe_file(path, b"write check")
            except BaseException:
                # A failed write (a full disk) can still leave the name, empty: removed too, best effort.
                with contextlib.suppress(Exception):
                    self._fs.rm_file(path)
                raise
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(path)

    # ----- internals ---------------------------------------------------------------------------

    def _names_under(self, prefix: str) -> builtins.list[str]:
        """Every stored name under ``prefix`` (objects, commit records, pointer versions), relative to the root."""
        prefix = _check_key(prefix, allow_empty=True)
        base = self._path(prefix) if prefix else self._root
        with self._backend(self.uri(prefix)):
            try:
                found = self._fs.find(base)
            except FileNotFoundError:
                return []
        root = self._root.rstrip("/") + "/"
        return [p.removeprefix(root) for p in (_strip(p, self._protocol) for p in found)]

    @contextlib.contextmanager
    def _backend(self, where: str, *, writing: bool = False, payload_bytes: int = 0) -> Iterator[None]:
        """Around backend calls: errors translated (:func:`_translated`); on S3 also watched and time-limited.

        A network call that goes unanswered is reported after a few seconds and abandoned as
        :class:`StorageUnavailable` after :func:`storage.retry.call_limit_s` (see :mod:`storage.retry`).
        """
        if self._protocol != "s3":
            with _translated(where, writing=writing):
                yield
            return
        with (
            watched_call(self._url, self._endpoint_url, payload_bytes=payload_bytes),
            _translated(where, writing=writing, endpoint=self._endpoint_url),
        ):
            yield

    @property
    def _fs(self) -> fsspec.AbstractFileSystem:
        if self._fs_cache is None:
            if self._protocol == "s3":
                # skip_instance_cache: a cached client would keep an endpoint from an older
                # environment (tests move AWS_ENDPOINT_URL between servers).
                self._fs_cache = fsspec.filesystem(
                    "s3",
                    skip_instance_cache=True,
                    # No listings cache: pointer versions and commit records are discovered by
                    # listing, and a cached listing would hide versions other processes wrote.
                    use_listings_cache=False,
                    endpoint_url=self._endpoint_url,
                    session=_heard_by(self._url, self._endpoint_url),
                    config_kwargs={"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}},
                )
                _limit_calls(self._fs_cache)
            else:
                self._fs_cache = fsspec.filesystem("file")
        return self._fs_cache

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}"

    def _write_atomic(self, path: str, data: bytes) -> None:
        if self._protocol == "s3":
            self._fs.pipe_file(path, data)  # one PUT: visible whole or not at all
            return
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f"{_TMP_MARK}{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise

    def _create_exclusive(self, path: str, data: bytes) -> None:
        if self._protocol == "s3":
            self._fs.pipe_file(path, data, IfNoneMatch="*")
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{os.path.dirname(path)}/{_TMP_MARK}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.link(tmp, path)  # fails with FileExistsError if another writer got there first
        finally:  # a write that fails (a full disk) leaves no temporary file either
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def _read_commit_record(self, key: str) -> dict[str, Any]:
        with self._backend(self.uri(key)):
            raw = self._fs.cat_file(self._path(key) + COMMIT_SUFFIX)
        try:
            record = json.loads(raw)
            return {"sha256": str(record["sha256"]), "size": int(record["size"])}
        except (ValueError, KeyError, TypeError) as err:
            raise CorruptObject(f"commit record of {self.uri(key)} is unreadable ({err}); rewrite the object.") from err

    def _get_verified(self, key: str, *, expected: str | None, keep: bool = True) -> bytes:
        """``key``'s verified bytes; ``keep=False``: only checked (``b""`` returned), a local file hashed in pieces."""
        # A read caught between a rewrite's data and its commit record sees them disagree for the
        # moment the rewrite takes; damage stays. So a mismatch is read again before it is reported.
        data = b""
        for wait_s in (*_REREAD_WAITS_S, None):
            try:
                record = self._read_commit_record(key)
            except ObjectNotFound:
                with self._backend(self.uri(key)):
                    has_bytes = bool(self._fs.exists(self._path(key)))
                if not has_bytes:
                    raise
                raise ObjectNotFound(
                    f"{self.uri(key)} has bytes but no commit record ({COMMIT_SUFFIX}): a write interrupted before "
                    "it committed, or the record was lost outside obliviate. `obliviate store check` says whether "
                    "anything needs it; `--repair` rebuilds a chain checkpoint by replay."
                ) from None
            try:
                with self._backend(self.uri(key), payload_bytes=record["size"]):
                    if keep or self._protocol == "s3":
                        data = self._fs.cat_file(self._path(key))
                        digest, size = hashlib.sha256(data).hexdigest(), len(data)
                        if not keep:
                            data = b""
                    else:
                        digest, size = _hash_file(self._path(key))
            except ObjectNotFound as err:
                raise ObjectNotFound(
                    f"{self.uri(key)} is committed ({record['size']} bytes) but its bytes are missing: deleted while "
                    "being read, or lost outside obliviate. `obliviate store check` lists such objects; `--repair` "
                    "rebuilds a chain checkpoint by replay."
                ) from err
            if digest == record["sha256"] and size == record["size"]:
                break
            # The data may be the rewrite whose record landed after this read's: a whole version, if that
            # record says so. Read at once, it spares the wait of a reader racing a rewrite.
            with contextlib.suppress(ObjectNotFound):  # deleted meanwhile: the next read says so in its words
                later = self._read_commit_record(key)
                if digest == later["sha256"] and size == later["size"]:
                    break
            if wait_s is None:
                raise CorruptObject(
                    f"{self.uri(key)} has sha256 {digest[:12]}... and {size} bytes, but was committed with "
                    f"{record['sha256'][:12]}... and {record['size']} bytes (read {len(_REREAD_WAITS_S) + 1} "
                    "times); the object is damaged (`obliviate store check` says what needs it and how to mend it)."
                )
            time.sleep(wait_s)
        if expected is not None and digest != expected:
            raise CorruptObject(
                f"{self.uri(key)} has sha256 {digest[:12]}..., but its manifest recorded {expected[:12]}...; "
                "it was overwritten after publication."
            )
        return data

    def _pointer_versions(self, key: str) -> builtins.list[int]:
        with self._backend(self.uri(key)):
            try:
                if self._protocol == "s3":
                    # One listing limited to <key>/v: s3fs's ls() of a missing path lists its parent
                    # too (all of ledger/status/ for a new request), a cost that grows with the store.
                    found = self._fs.find(self._path(key), maxdepth=1, prefix="v")
                else:
                    found = self._fs.ls(self._path(key), detail=False)
            except FileNotFoundError:
                return []
        names = [p.rsplit("/", 1)[-1] for p in found]
        return sorted(int(m.group(1)) for m in map(_POINTER_VERSION.match, names) if m)

    def _raw_pointer_body(self, key: str, version: int) -> Any:
        """The body of one version of pointer ``key`` as stored, unchecked (``None`` if it is not a pointer version's).

        Raises:
            ObjectNotFound: the version is not there (never written, or dropped).
        """
        with self._backend(self.uri(key)):
            raw = self._fs.cat_file(self._path(f"{key}/v{version:09d}.json"))
        try:
            return json.loads(raw)["body"]
        except (ValueError, KeyError, TypeError):
            return None

    def _descent_above(self, key: str, version: int) -> str | None:
        """The nonce of ``version`` of pointer ``key`` that its newest version descends from (see :meth:`swap_pointer`).

        Returns:
            ``None`` when nothing tells: ``version`` is the newest, or the newest is damaged or was written
            before versions carried their chain. ``""`` when the newest's chain does not reach down to
            ``version``.
        """
        for _ in range(_POINTER_READ_ATTEMPTS):
            newest = max(self._pointer_versions(key), default=0)
            if newest <= version:
                return None
            try:
                body = self._raw_pointer_body(key, newest)
            except ObjectNotFound:
                continue  # newer ones were written and this one dropped since the listing: list again
            chain = body.get("chain") if isinstance(body, dict) else None
            if not isinstance(chain, dict):
                return None
            return str(chain.get(str(version), ""))
        return ""

    def _load_pointer(self, key: str, version: int) -> Pointer:
        with self._backend(self.uri(key)):
            raw = self._fs.cat_file(self._path(f"{key}/v{version:09d}.json"))
        try:
            wrapped = json.loads(raw)
            body = wrapped["body"]
            ok = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() == wrapped["sha256"]
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise CorruptObject(f"pointer {self.uri(key)} version {version} fails its checksum; it was damaged.")
        return Pointer(
            key=key, version=int(body["version"]), target=body["target"], created_at=float(body["created_at"])
        )


def not_shared_text(store: ObjectStore, *, missing: str, written_in: str, what: str) -> str:
    """The line a worker says when what its driver wrote before handing out the work is not in ``store`` as it reads it.

    On a cluster of several machines that is a worker whose node does not see the driver's store: a ``file://``
    folder that only the driver's machine has (the worker's node reads an empty or another folder at that path),
    or an S3 endpoint or bucket other than the driver's.

    Args:
        store: the store as the worker reads it.
        missing: what is not there, with its URL (``claim on s3://b/runs/... (version 3)``).
        written_in: whose store it was written in (``the claim was taken in``).
        what: the work that stopped (``the training of run r1``).
    """
    if store.is_local:
        fix = (
            "on a cluster of more than one machine a file:// store must be a folder every node mounts at the same "
            "path (NFS, EFS); otherwise use an s3:// store"
        )
    else:
        fix = "every node must reach the same S3 endpoint (AWS_ENDPOINT_URL) and bucket as the process that handed out the work"
    return (
        f"{missing} is not in the store as this process (pid {os.getpid()} on {socket.gethostname()}) reads it, so "
        f"this store is not the one {written_in}: {fix}; {what} stopped without writing"
    )


def check_shared(store: ObjectStore, key: str, *, described: str, written_in: str, what: str) -> None:
    """Refuse to work on ``store`` unless ``key``, which the process handing out the work wrote first, is in it.

    Args:
        key: what that process wrote before handing out the work.
        described: what ``key`` is, said before its URL (``the sweep's settings``).
        written_in: as :func:`not_shared_text`.
        what: as :func:`not_shared_text`.

    Raises:
        StoreNotShared: ``key`` is not committed in ``store`` as this process reads it.
    """
    if not store.exists(key):
        raise StoreNotShared(
            not_shared_text(store, missing=f"{described} {store.uri(key)}", written_in=written_in, what=what)
        )


def _descent(replaced: Any, version: int) -> dict[str, str]:
    """The chain a pointer version replacing ``version`` (whose body is ``replaced``) carries: its nonce and its chain's.

    Version (as text) -> nonce, the newest :data:`_CHAIN`; a version whose body cannot be read (damaged,
    or written before versions had nonces) adds nothing.
    """
    if not isinstance(replaced, dict):
        return {}
    inherited = replaced.get("chain")
    chain = {str(v): str(n) for v, n in inherited.items() if str(v).isdigit()} if isinstance(inherited, dict) else {}
    if replaced.get("nonce"):
        chain[str(version)] = str(replaced["nonce"])
    newest = sorted(chain, key=int, reverse=True)[:_CHAIN]
    return {v: chain[v] for v in sorted(newest, key=int)}


def _commit_record(data: bytes) -> bytes:
    """The commit record of ``data``: its SHA-256, its size and when it was committed."""
    return json.dumps(
        {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "committed_at": time.time()}
    ).encode()


def _hash_file(path: str) -> tuple[str, int]:
    """SHA-256 hex digest and size of a local file, read in pieces of :data:`_VERIFY_CHUNK_BYTES`."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_VERIFY_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _endpoint_from_environment() -> str | None:
    """``AWS_ENDPOINT_URL`` checked before use: botocore refuses a bare host:port only deep inside a call.

    Raises:
        ConfigError: a value that is not an http(s) URL with a host.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if not endpoint:
        return None
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        fix = f"http://{endpoint.split('://', 1)[-1]}" if parsed.scheme not in ("http", "https") else None
        raise ConfigError(
            f"AWS_ENDPOINT_URL must be an http(s) URL with a host, like http://127.0.0.1:9000; got {endpoint!r}. "
            + (f"Write {fix}, or unset it to use AWS S3." if fix else "Unset it to use AWS S3.")
        )
    return endpoint


def _parse_url(url: str) -> tuple[str, str, str]:
    """``(normalised url, protocol, root path as fsspec wants it)``."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(
            f"a store URL must be a non-empty string like file://./runs or s3://bucket/prefix; got {url!r}."
        )
    url = url.strip()
    prefix = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):(//)?", url)
    if prefix and not prefix.group(2):
        # `s3:/bucket` or `file:runs` would otherwise be a local folder of that odd name, silently.
        scheme, rest = prefix.group(1), url[prefix.end() :]
        if scheme.lower() == "file" and rest.startswith("/"):
            # file://tmp/x is the relative ./tmp/x: an absolute folder keeps its slash after the '//'
            fix = f"file://{'/' + rest.lstrip('/')} for the folder {'/' + rest.lstrip('/')}"
        else:
            fix = f"{scheme}://{rest.lstrip('/')}"
        raise ConfigError(
            f"a store URL is file://PATH or s3://bucket/prefix, with '//' after the scheme; got {url!r}. "
            f"Write {fix} (or ./{url} for a local folder of that name)."
        )
    if url.startswith("file://"):
        path = url[len("file://") :]
        _refuse_empty_segment(url, "file://", path.rstrip("/"))
        if not path:
            raise ConfigError(
                "a file store URL must name a folder: file://PATH, e.g. file://./runs or file:///srv/obliviate; "
                "got 'file://'."
            )
        if path == "localhost" or path.startswith("localhost/"):
            path = path[len("localhost") :] or "/"  # RFC 8089: file://localhost/srv/x is /srv/x
        root = os.path.abspath(os.path.expanduser(path.rstrip("/") or "/"))
        return f"file://{root}", "file", root
    url = url.rstrip("/")
    if url in ("s3:", "s3:/"):
        raise ConfigError(f"an S3 store URL must name a bucket: s3://bucket[/prefix]; got {url + '//'!r}.")
    if url.startswith("s3://"):
        _refuse_empty_segment(url, "s3://", url[len("s3://") :])
        root = url[len("s3://") :].strip("/")
        if not root:
            raise ConfigError(f"an S3 store URL must name a bucket: s3://bucket[/prefix]; got {url!r}.")
        return f"s3://{root}", "s3", root
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ConfigError(f"store URL scheme {scheme!r} is not supported; use file://PATH or s3://bucket/prefix.")
    root = os.path.abspath(os.path.expanduser(url))
    return f"file://{root}", "file", root


def _refuse_empty_segment(url: str, scheme: str, path: str) -> None:
    """Refuse ``//`` inside a store URL's path (``path``: what follows ``scheme``, trailing slashes removed).

    On S3 an empty segment is part of every key (``s3://b//p`` writes ``/p/...``), so listings see the store
    under one name and reads look under another; a local path would be normalised, so two spellings would
    name one folder. Either way the URL is refused, never silently rewritten.

    Raises:
        ConfigError: the rule, the URL seen and the URL with the empty segment removed.
    """
    # file:///srv/x keeps the one '/' that makes its path absolute; any other '//' is an empty segment
    inner = path[1:] if scheme == "file://" and path.startswith("/") else path
    if "//" not in inner and not inner.startswith("/"):
        return
    lead = "/" if scheme == "file://" and path.startswith("/") else ""
    fixed = scheme + lead + "/".join(part for part in path.split("/") if part)
    why = (
        "S3 would keep it in every key, so the store written would not be the one read"
        if scheme == "s3://"
        else "the folder would be another spelling of one without it"
    )
    raise ConfigError(
        f"a store URL must not have an empty path segment ('//' inside it): {why}; got {url!r}. Write {fixed}."
    )


def _committed_keys(names: Iterable[str]) -> list[str]:
    """The committed keys among stored ``names``, sorted: a key with its commit record, no temporary file."""
    stored = set(names)
    return sorted(
        name[: -len(COMMIT_SUFFIX)]
        for name in stored
        if name.endswith(COMMIT_SUFFIX) and _TMP_MARK not in name and name[: -len(COMMIT_SUFFIX)] in stored
    )


def _pointer_keys(names: Iterable[str]) -> list[str]:
    """The pointer keys among stored ``names`` (the folders of their ``vNNNNNNNNN.json`` versions), sorted."""
    keys: set[str] = set()
    for relative in names:
        parent, _, name = relative.rpartition("/")
        if parent and _POINTER_VERSION.match(name):
            keys.add(parent)
    return sorted(keys)


def _strip(path: str, protocol: str) -> str:
    return path[len("file://") :] if protocol == "file" and path.startswith("file://") else path


def _check_key(key: str, *, allow_empty: bool = False) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"object keys are strings; got {type(key).__name__}.")
    key = key.strip("/")
    if not key and not allow_empty:
        raise ConfigError("an object key must not be empty.")
    parts = key.split("/") if key else []
    if any(part in ("", ".", "..") or part.startswith(_TMP_MARK) for part in parts):
        raise ConfigError(
            f"object key {key!r} has an empty, '.', '..' or reserved '{_TMP_MARK}' segment; use plain names."
        )
    if key.endswith(COMMIT_SUFFIX):
        raise ConfigError(f"object key {key!r} ends with the reserved suffix {COMMIT_SUFFIX!r}.")
    if "\\" in key or any(ord(char) < 32 for char in key):
        # A backslash is a folder separator on some systems, a control character a broken name on all.
        raise ConfigError(
            f"object key {key!r} holds a backslash or a control character; use '/' between segments and plain text."
        )
    return key


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# The s3fs calls ObjectStore makes; each is run on s3fs's event loop and cancelled (FSTimeoutError
# in the caller) once the store has left its watched call unanswered past the limit.
_LIMITED_CALLS = ("cat_file", "pipe_file", "exists", "info", "ls", "find", "rm_file", "mkdir")


def _limit_calls(fs: fsspec.AbstractFileSystem) -> None:
    """Bound every blocking call on ``fs``: a frozen endpoint otherwise holds one for many minutes.

    botocore waits ``read_timeout`` per attempt and s3fs repeats the attempts, so a frozen endpoint
    held one call for more than 15 minutes; :func:`storage.retry.call_overdue` ends it instead.
    """
    for name in _LIMITED_CALLS:
        coroutine = getattr(fs, f"_{name}")

        def limited(*args: Any, _coroutine: Any = coroutine, **kwargs: Any) -> Any:
            future = asyncio.run_coroutine_threadsafe(_coroutine(*args, **kwargs), fs.loop)
            try:
                while not concurrent.futures.wait([future], timeout=0.5).done:
                    if call_overdue():
                        raise FSTimeoutError
                return future.result()
            finally:
                future.cancel()  # nothing once it is done; a call abandoned or interrupted stops its request

        setattr(fs, name, limited)


def _heard_by(store: str, endpoint: str | None) -> Any:
    """An aiobotocore session that tells the stall watch of every answer the store gives."""
    from aiobotocore.session import AioSession

    session = AioSession()

    def answered(**_: Any) -> None:
        heard_from(store, endpoint)

    session.register("after-call.s3", answered)
    return session


@contextlib.contextmanager
def _translated(where: str, *, writing: bool = False, endpoint: str | None = None) -> Iterator[None]:
    """The single boundary where backend exceptions become :mod:`storage.errors` ones.

    ``writing``: the call writes, so a missing bucket / folder or a refusal is a failed write
    (:class:`WriteFailed`), never a missing object. ``endpoint``: the S3 endpoint, for messages.
    """
    try:
        yield
    except ObliviateError:
        raise
    except FSTimeoutError as err:
        waited = unanswered_s()
        for_how_long = f"for {waited:.0f} s" if waited is not None else "in time"
        at = f" at {endpoint}" if endpoint else ""
        raise StorageUnavailable(
            f"storage at {where} has not answered {for_how_long}: the endpoint{at} takes requests but does not reply "
            "(frozen, overloaded, or the network drops its packets). Check that the S3 service answers "
            "(AWS_ENDPOINT_URL, network), then run the command again."
        ) from err
    except FileNotFoundError as err:
        if writing and _temporary_taken(err):
            raise WriteFailed(
                f"could not write {where}: its temporary file {os.path.basename(str(err.filename))} was deleted by "
                "another process after it was written and before it was renamed into place (`obliviate store check "
                "--repair` with a short --orphan-age collects such files). Run the command again; give --orphan-age "
                "60 or more (the default is 600) to a repair while commands write the store."
            ) from err
        if writing:
            raise WriteFailed(
                f"could not write {where}: {err}. The bucket or folder of the store does not exist (any more); "
                "create it, or run a command that creates a missing store (`obliviate train` or `obliviate serve`)."
            ) from err
        raise ObjectNotFound(f"no object at {where} ({err}); check the key, or that the write was committed.") from err
    except FileExistsError as err:
        raise StorageError(f"an object or folder already exists at {where}: {err}.") from err
    except PermissionError as err:
        error = WriteFailed if writing else StorageError
        raise error(f"permission denied at {where}: {err}. Check the credentials in the environment.") from err
    except Exception as err:
        if _is_unavailable(err):
            raise StorageUnavailable(
                f"storage at {where} is unreachable: {err}. Check AWS_ENDPOINT_URL / network and retry."
            ) from err
        if _is_credentials(err):
            raise StorageError(
                f"no usable credentials for {where}: {err}. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
            ) from err
        if isinstance(err, OSError):
            if writing:
                raise WriteFailed(f"could not write {where}: {err}") from err
            raise StorageError(f"storage error at {where}: {err}") from err
        raise


def _temporary_taken(err: FileNotFoundError) -> bool:
    """Whether a local write failed because its own temporary file vanished from a folder that still exists.

    ``os.replace`` / ``os.link`` of the temporary name it had just written (``err.filename``) found nothing: another
    process deleted it in between. A missing folder (the store deleted) fails on the folder, and says so instead.
    """
    name = str(err.filename or "")
    return (
        os.path.basename(name).startswith(_TMP_MARK)
        and err.filename2 is not None
        and os.path.isdir(os.path.dirname(name))
    )


def _is_unavailable(err: BaseException) -> bool:
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(
        names
        & {
            "EndpointConnectionError",
            "ConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ClientOSError",
        }
    ) or (isinstance(err, OSError) and any(code in str(err) for code in ("503", "SlowDown", "ServiceUnavailable")))


def _is_credentials(err: BaseException) -> bool:
    return any(cls.__name__ in {"NoCredentialsError", "PartialCredentialsError"} for cls in type(err).__mro__)
