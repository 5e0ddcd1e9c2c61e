"""Writes that overlap with compute: one background thread, a bounded queue, failures surfaced.

A block-sequenced chain produces a checkpoint per block and then trains the next block; the
checkpoint's serialisation, checksum and upload do not depend on that training. A
:class:`BackgroundWriter` takes each item as it is produced and writes it on one thread, in the
order given, while the caller goes on (issue 14: "checkpoint writes overlapped with the next
block's training"). What it keeps from the synchronous sink:

* order and atomicity: items are written one at a time, in order, each through the store's own
  atomic put (bytes, then the commit record), so a reader sees the same contiguous prefix of
  committed checkpoints it would have seen before, never a half-written one;
* back-pressure: at most ``depth`` items wait; the producer blocks on the next one, so memory is
  bounded and the writer can never fall arbitrarily behind;
* failures: the first write that raises stops the writer; the producer's next call, or
  :meth:`BackgroundWriter.close`, raises that error (with the failed item's description), so a
  caller never publishes a version whose checkpoints were not all written.

The items handed over must not change afterwards (checkpoints are snapshots: the trainer copies
the model and optimizer state before handing them out), so the result is bit-identical to
writing synchronously.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Generic, TypeVar

from storage.errors import StorageError

T = TypeVar("T")

_STOP = object()


class BackgroundWriteError(StorageError):
    """A background write failed; nothing after it was written.

    A storage error like the write's own, so a command reports it in one line (it surfaced as two
    tracebacks from a Ray worker when a bucket vanished mid-training).
    """


class BackgroundWriter(Generic[T]):
    """Call ``write(item)`` for every item on one background thread, in order.

    Args:
        write: writes one item (may raise; the first failure is re-raised to the producer).
        depth: items that may wait for the writer before the producer blocks (>= 1).
        name: the thread's name (shows up in py-spy profiles).
        describe: how a failed item is named in the error.

    Use as a context manager: leaving the block normally waits for every write and raises the
    first failure; leaving it with an exception drops the items not yet written and lets the
    exception through.
    """

    def __init__(
        self,
        write: Callable[[T], None],
        *,
        depth: int = 2,
        name: str = "background-writer",
        describe: Callable[[T], str] = repr,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1 (items waiting for the writer); got {depth}.")
        self._write, self._describe = write, describe
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._failed_item = ""
        self._abandon = threading.Event()
        self.written = 0
        self.write_seconds = 0.0  # time spent writing, overlapped with the producer's own work
        self.wait_seconds = 0.0  # time the producer blocked on a full queue or on close
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def __call__(self, item: T) -> None:
        """Queue ``item`` (blocks while ``depth`` items wait); raises if an earlier write failed."""
        self._raise_if_failed()
        began = time.perf_counter()
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                break
            except queue.Full:
                self._raise_if_failed()
        self.wait_seconds += time.perf_counter() - began

    def close(self) -> None:
        """Wait until every queued item is written; raise the first failure, if any."""
        began = time.perf_counter()
        self._queue.put(_STOP)
        self._thread.join()
        self.wait_seconds += time.perf_counter() - began
        self._raise_if_failed()

    def abandon(self) -> None:
        """Stop without writing what still waits (the producer failed); returns once the thread ended."""
        self._abandon.set()
        with_stop = False
        while not with_stop:
            try:
                self._queue.put_nowait(_STOP)
                with_stop = True
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join()

    def __enter__(self) -> BackgroundWriter[T]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise BackgroundWriteError(
                f"a background write failed ({self._failed_item}): {type(self._error).__name__}: {self._error}; "
                "nothing after it was written, so nothing that depends on it may be published."
            ) from self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._abandon.is_set():
                return
            if self._error is not None:
                continue  # drain: the producer learns of the failure on its next call
            began = time.perf_counter()
            try:
                self._write(item)  # type: ignore[arg-type]
                self.written += 1
            except BaseException as err:  # noqa: BLE001 -- handed to the producer, never lost
                self._error = err
                self._failed_item = self._describe(item)[:200]  # type: ignore[arg-type]
            self.write_seconds += time.perf_counter() - began
