"""The one store rule every command follows (README "Stores: one rule for every command").

* Which store: ``--store URL``, else ``$OBLIVIATE_STORE``, else ``file://./runs``, resolved when
  the command runs (never at import time).
* Before any work: the store must be reachable. A command that writes (``train``, ``serve``,
  ``reduce``, ``tune``, ``store check --repair``) creates a missing bucket or folder and
  proves it can write by writing and deleting a temporary name at its root (no folder is left); a command that only reads
  (``forget --status``, ``store check``) refuses a store that does not exist, and so does ``forget --ids`` (a request
  filed in a store no run and no serve know of would never be applied: a mistyped store loses it); ``verify`` refuses
  one too, then proves it can write its result there before replaying. A failure is
  reported before anything is computed, as what it is (unreachable, not writable, missing).
* While the command runs: a store that stops answering is said on stderr within about 10 s (which
  store, for how long, until when it is waited for), every 30 s while it lasts and when it answers
  again (:mod:`storage.retry`); a call it never answers ends as an unreachable store.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING, Annotated

from flows.cli._types import Args, option
from obliviate.errors import ConfigError

if TYPE_CHECKING:
    from storage import ObjectStore

DEFAULT_STORE = "file://./runs"
STORE_HELP = "file://PATH or s3://bucket/prefix (default: $OBLIVIATE_STORE, else file://./runs)"


#: The ``--store`` option of a command's signature: ``store: StoreOption = None``.
StoreOption = Annotated[str | None, option("--store", help=STORE_HELP)]


def store_url(args: Args) -> str:
    """``--store``, else ``$OBLIVIATE_STORE``, else ``file://./runs``.

    Raises:
        ConfigError: an empty ``--store`` (a shell variable that was unset, most likely), which would
            otherwise fall back to another store without a word.
    """
    given = getattr(args, "store", None)
    if given is not None and not given.strip():
        raise ConfigError(
            "--store is empty; give file://PATH or s3://bucket/prefix, or leave --store out for $OBLIVIATE_STORE "
            "(else file://./runs)."
        )
    return given or os.environ.get("OBLIVIATE_STORE") or DEFAULT_STORE


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def local_path(value: str, *, flag: str, what: str, instead: str) -> str:
    """``value`` of an option that takes a local path, refused when it is a URL (``s3://b/p``, ``file:///x``).

    Taken as a path, ``s3://bucket/p`` is the folder ``./s3:/bucket/p``: the command would write there, under the
    current folder, and say it wrote to ``s3:/bucket/p``.

    Raises:
        ConfigError: the rule, the value seen and ``instead`` (what to give for a URL).
    """
    if _URL_SCHEME.match(value):
        raise ConfigError(f"{flag} is {what}, a path on this machine, not a URL; got {value!r}. {instead}")
    return value


def probe_store(url: str, *, named_by: str = "--store / $OBLIVIATE_STORE") -> tuple[ObjectStore, bool]:
    """The store and whether its bucket or folder exists, creating and writing nothing.

    A command whose rules read the store (``forget --deadline`` reads its policy) checks them on this
    before :func:`prepare_store` creates a missing store, so a refused command leaves no folder behind.

    Raises:
        ConfigError: a malformed URL, or a local store that is a file.
        storage.StorageUnavailable: the backend cannot be reached.
    """
    from storage import ObjectStore
    from storage.retry import set_stall_reporter

    set_stall_reporter(_say_on_stderr)  # from here on, a store that stops answering is said, not silent
    store = ObjectStore(url)
    if store.is_local and os.path.isfile(store.url.removeprefix("file://")):
        raise ConfigError(
            f"store {store.url} is a file; a store is a folder (or an S3 bucket and prefix). Check {named_by}."
        )
    return store, store.container_exists()


def prepare_store(url: str, *, write: bool, named_by: str = "--store / $OBLIVIATE_STORE") -> str:
    """Check the store before any work; returns its normalised URL.

    ``named_by``: the option the user chose the store with, named in the refusals (``reduce --out``).

    Raises:
        ConfigError: a malformed URL, or (reading) a store that does not exist.
        storage.StorageUnavailable: the backend cannot be reached.
        storage.errors.WriteFailed: (writing) the store cannot be created or written.
    """
    from storage import StorageError, StorageUnavailable
    from storage.errors import WriteFailed

    store, exists = probe_store(url, named_by=named_by)
    if not exists:
        if not write:
            raise ConfigError(
                f"store {store.url} does not exist (no bucket or folder there); nothing to read. Check {named_by}, "
                "or create it by writing to it (train, serve)."
            )
        try:
            store.ensure_container()
        except StorageUnavailable:
            raise
        except StorageError as err:
            raise WriteFailed(f"could not create store {store.url}: {err}") from err
    if write:
        try:
            store.check_writable()
        except (WriteFailed, StorageUnavailable):
            raise
        except StorageError as err:
            raise WriteFailed(f"store {store.url} is not writable: {err}") from err
    return store.url


def _say_on_stderr(line: str) -> None:
    """A storage notice as one plain line on stderr (above the progress bars when they are shown)."""
    print(f"obliviate: {line}", file=sys.stderr, flush=True)
