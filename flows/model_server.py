"""A tiny HTTP model server for a black-box target (stdlib ``http.server``).

Service code, so it lives outside the pure package. It speaks the protocol of
:class:`obliviate.extraction.target.HttpBackend`:

* ``POST /predict`` with ``{"shape", "dtype", "data", "output"}`` answers ``{"labels": [...]}``
  or, only when ``output`` is ``"probabilities"`` and the server allows it,
  ``{"probabilities": [[...]]}``. An empty batch (shape ``[0, H, W]``, any H and W) is answered at once,
  ``{"labels": []}`` or ``{"probabilities": []}``, without a model call. A malformed request gets HTTP 400; a body without Content-Length 411, over
  64 MiB (``max_body_bytes``) 413, shorter than its Content-Length 408; an unexpected failure 500, with a
  JSON error in every case.
* ``GET /info`` answers the metadata given at start (model name, training indices) so an
  auditor can keep its pool disjoint from the target's training data; for a run
  (:class:`RunBackend`) also what is served now and the erased rows of its dataset, the ids it forgot
  and those of every other deletion request of the dataset (:meth:`RunBackend.training_data` says what
  each field means).
* ``GET /health`` answers ``{"ok": true}``.

It serves a torch model, or (issue 11) what a run of a store serves now (:class:`RunBackend`):
the run's current version, re-read when its pointer moves, so an interim (rolled-back) or
progressive version is served the moment it is published; a sharded run (``train --shards S``,
``groups/<run>.json``) answers with the argmax of the mean of its shards' softmax probabilities,
ties to the lowest class (:mod:`obliviate.unlearning.shards`), and a shard paused by a rollback
leaves the vote. When nothing can be served (every shard paused) a prediction gets HTTP 503.

Usage::

    with TargetServer(model, info={"arch": "lenet5"}) as server:
        print(server.url)  # http://127.0.0.1:<port>/predict
    with TargetServer(backend=RunBackend("file://./runs", "g")) as server: ...
"""

from __future__ import annotations

import atexit
import errno
import json
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self, cast

import numpy as np
import torch
from torch import nn

from obliviate.errors import ConfigError
from obliviate.extraction.target import Backend, LocalTorchBackend, OutputMode, decode_images
from obliviate.models import images_to_tensor
from obliviate.unlearning.shards import MEAN, combine, shard_probabilities
from storage.errors import ObjectNotFound, StorageError
from storage.objects import ObjectStore
from storage.registry import RunRegistry
from storage.serving import DatasetErasures, pointer_target, served_model

#: Reloads of a shard whose served version's objects vanished because its pointer moved meanwhile (a purge).
_MOVED_RELOADS = 3


class RunBackend:
    """Answers with the model run ``run_id`` of a store serves now (a sharded run: mean of probabilities).

    Args:
        store_url: the store of runs.
        run_id: a run, or the name of a sharded run (its ``groups/<run_id>.json`` lists the shards).
        refresh_s: how often the version pointers are re-read (a moved pointer reloads that shard).
        batch_size: images per forward pass.

    Raises:
        ConfigError: no such run or group in the store.
    """

    def __init__(self, store_url: str, run_id: str, *, refresh_s: float = 1.0, batch_size: int = 512) -> None:
        self.store = ObjectStore(store_url)
        self.registry = RunRegistry(self.store)
        self.run_id, self.refresh_s, self.batch_size = run_id, refresh_s, batch_size
        group_key = f"groups/{run_id}.json"
        if self.store.exists(group_key):
            group = self.store.get_json(group_key)
            self.members, self.rule = [str(m) for m in group["members"]], str(group.get("rule", "mean_probability"))
        else:
            self.members, self.rule = [run_id], "single"
        if self.registry.current(self.members[0]) is None:
            raise ConfigError(f"run {run_id!r} has no published version in {self.store.uri()}; train it first.")
        spec = self.registry.spec(self.members[0])
        self.levels = int(spec.config.levels)
        self.image_size = int(spec.config.image_size)
        self.spec_info = {
            "run_id": run_id,
            "members": self.members,
            "rule": self.rule,
            "dataset": spec.dataset,
            "arch": spec.config.model,
            "levels": self.levels,
            "num_classes": int(spec.config.num_classes),  # an HttpBackend's (0, C) answer to an empty batch needs C
            "train_indices": sorted({int(i) for m in self.members for i in self.registry.spec(m).train_ids}),
        }
        self.erasures = DatasetErasures(self.store, spec.dataset)  # rows erased from the dataset, any run's
        self._loaded: dict[str, tuple[int | None, nn.Module | None]] = {}
        self._deleted: dict[str, frozenset[int]] = {}  # dataset ids each shard's served version forgot
        self._serve_block: dict[str, Any] = {}  # "final", or the block M_s a rolled-back version serves
        self._checked = float("-inf")
        self.lock = threading.Lock()

    def refresh(self, *, force: bool = False) -> None:
        """Reload every shard whose version pointer moved (at most every ``refresh_s`` unless forced).

        A version whose objects were purged between the pointer read and the load (a deletion published
        meanwhile supersedes it) is not an error: the pointer is read again and the new version loaded (at most
        ``_MOVED_RELOADS`` times); :class:`ObjectNotFound` is raised only when the pointer did not move.
        """
        with self.lock:
            if not force and time.monotonic() - self._checked < self.refresh_s:
                return
            for member in self.members:
                current, target = pointer_target(self.registry, member)
                for attempt in range(_MOVED_RELOADS + 1):
                    version = None if current is None else current.version
                    if member in self._loaded and self._loaded[member][0] == version:
                        break
                    try:
                        model = served_model(self.registry, member)
                    except ObjectNotFound:
                        # a deletion published since the pointer was read purges the version read (SPEC 5): serve
                        # the new one; a pointer that did not move means the object is missing (raised as such)
                        moved, moved_target = pointer_target(self.registry, member)
                        if attempt == _MOVED_RELOADS or (None if moved is None else moved.version) == version:
                            raise
                        current, target = moved, moved_target
                        continue
                    self._loaded[member] = (version, model)
                    self._deleted[member] = frozenset() if current is None else frozenset(current.deleted_ids)
                    self._serve_block[member] = target.get("serve_block", "final")
                    break
            self._checked = time.monotonic()

    def served(self) -> dict[str, Any]:
        """Which version each shard serves and whether it is in the vote (``GET /info``)."""
        self.refresh()
        with self.lock:
            return {
                m: {"version": v, "in_vote": model is not None, "serve_block": self._serve_block.get(m, "final")}
                for m, (v, model) in self._loaded.items()
            }

    def training_data(self) -> dict[str, Any]:
        """What ``GET /info`` says of the run's training data now.

        * ``train_indices``: the dataset ids of the run's training set (a sharded run: the union of its
          shards') less the ids the served versions forgot. It is the set an audit keeps out of its pool,
          not exactly what the served model saw: a version rolled back to M_s (``served``: ``serve_block``
          s) was trained on blocks 1..s of it only, a paused shard (``serve_block`` null) on none, and the
          ids of a request it holds back stay listed until the retrain that forgets them lands.
        * ``forgotten_indices``: the erased rows of the run's dataset, read now: the ids the served versions
          forgot (applied deletion requests), and every id of every deletion request of the dataset the
          ledger holds done or accepted (:class:`storage.serving.DatasetErasures`), whether or not this run
          trained on it (a row held out of it, or deleted from another run of the dataset). These are not
          images "outside the training set": an auditor leaves them out of its pool and test set too
          (``obliviate steal`` does, and its report says how many). An id of a request not yet applied to
          this run is in ``train_indices`` as well.
        * ``forgotten_ids``: how many ids the served versions forgot (those of ``forgotten_indices`` this
          run's versions applied).
        """
        self.refresh()
        with self.lock:
            deleted = frozenset().union(*self._deleted.values())
        trained = {int(i) for m in self.members for i in self.registry.spec(m).train_ids} - deleted
        return {
            "train_indices": sorted(trained),
            "forgotten_ids": len(deleted),
            "forgotten_indices": sorted(int(i) for i in deleted | self.erasures.ids()),
        }

    def predict(self, images: np.ndarray, *, output: OutputMode) -> np.ndarray:
        """Labels (argmax of the float64 mean probability, ties to the lowest class) or mean probabilities."""
        self.refresh()
        with self.lock:
            models = [model for _, model in self._loaded.values() if model is not None]
        if not models:
            raise ConfigError(
                f"run {self.run_id!r} is paused: a rollback left no checkpoint to serve until its retrain lands."
            )
        x = images_to_tensor(np.asarray(images), levels=self.levels)
        probabilities = [
            torch.cat([shard_probabilities(m, x=x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)])
            for m in models
        ]
        if OutputMode(output) is OutputMode.LABELS:
            return combine(probabilities, rule=MEAN).numpy().astype(np.int64)
        return torch.stack(probabilities).mean(dim=0).numpy().astype(np.float32)


MAX_BODY_BYTES = 64 * 2**20  # a batch of 10,000 28x28 images is about 10 MB of base64: generous, yet bounded
REQUEST_FORM = '{"shape": [n, H, W], "dtype": "uint8", "data": "<base64 of the n*H*W gray levels>", "output": "labels"}'


class PredictHandler(BaseHTTPRequestHandler):
    """Request handler; ``self.server.target_server`` is the owning :class:`TargetServer`.

    Every request gets an answer: a malformed one HTTP 4xx naming the rule, an unexpected failure HTTP 500
    with the error (and its traceback on the server's stderr), never a dropped connection.
    """

    protocol_version = "HTTP/1.1"
    _answered = False

    def log_message(self, format: str, *args: object) -> None:
        return  # quiet: the Target's own query log is the audit trail

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _answer(self, handle: Callable[[], None]) -> None:
        self._answered = False
        try:
            handle()
        except ConnectionError as err:  # the client reset or closed mid-request: nobody is left to answer
            self.close_connection = True
            client_gone(self.client_address, err)
        except Exception as err:  # noqa: BLE001 -- a bug in the server or model: the client still gets an answer
            print(f"target server: {self.command} {self.path} failed:", file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
            if self._answered:  # the reply had started: a second one would corrupt it
                self.close_connection = True
                return
            self.send_json(
                500,
                {
                    "error": f"the server failed on this request ({err.__class__.__name__}: {str(err)[:300]}); "
                    "that is a fault of the server or its model, not of the request: see the server's log."
                },
            )

    def _get(self) -> None:
        owner: TargetServer = self.server.target_server  # type: ignore[attr-defined]
        if self.path == "/info":
            if isinstance(owner.backend, RunBackend):  # what is served now: versions, and ids forgotten since
                live = {"served": owner.backend.served(), **owner.backend.training_data()}
                self.send_json(200, {**owner.info, **live})
            else:
                self.send_json(200, owner.info)
        elif self.path == "/health":
            self.send_json(200, {"ok": True})
        else:
            self.send_json(404, {"error": f"no route {self.path}; use POST /predict, GET /info"})

    def _post(self) -> None:
        owner: TargetServer = self.server.target_server  # type: ignore[attr-defined]
        if self.path != "/predict":
            self.send_json(404, {"error": f"no route {self.path}; use POST /predict"})
            return
        body = self._body(owner)
        if body is None:
            return
        try:
            payload = json.loads(body)
        except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
            self.send_json(
                400, {"error": f"the request body must be JSON like {REQUEST_FORM}; could not parse it ({err})."}
            )
            return
        try:
            images, output = _read_request(payload, image_size=owner.image_size)
        except ConfigError as err:
            self.send_json(400, {"error": str(err)})
            return
        if output is OutputMode.PROBABILITIES and not owner.allow_probabilities:
            self.send_json(403, {"error": "this target answers labels only"})
            return
        if not len(images):  # nothing to predict (a client's probe of the path): no model call, no request counted
            self.send_json(200, {output.value: []})
            return
        try:
            with owner.lock:
                answer = owner.backend.predict(np.array(images), output=output)
        except (ConfigError, StorageError) as err:  # nothing to serve now (paused run, store outage): retry later
            self.send_json(503, {"error": str(err)})
            return
        owner.requests += 1
        self.send_json(200, {output.value: answer.tolist()})

    def setup(self) -> None:
        # A socket timeout bounds every read: a body shorter than its Content-Length (or a client gone silent)
        # would otherwise hold this thread until the client itself gave up.
        super().setup()
        self.connection.settimeout(self.server.target_server.read_timeout_s)  # type: ignore[attr-defined]

    def _body(self, owner: TargetServer) -> bytes | None:
        """The request body, or ``None`` once a 4xx has answered a missing, malformed or oversized one."""
        announced = self.headers.get("Content-Length")
        if announced is None:
            self.refuse_unread(
                411,
                "a POST /predict needs a Content-Length header (the body's size in bytes); send the JSON body whole.",
            )
            return None
        try:
            length = int(announced)
        except ValueError:
            length = -1
        if length < 0:
            self.refuse_unread(
                400, f"Content-Length must be a whole number of bytes >= 0; got {announced!r}. Send the body's size."
            )
            return None
        if length > owner.max_body_bytes:
            self.refuse_unread(
                413,
                f"the request body may hold at most {owner.max_body_bytes} bytes ({owner.max_body_bytes / 2**20:g} MiB)"
                f"; got Content-Length {length}. Send the images in smaller batches.",
            )
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            body = b""
        if len(body) < length:
            self.refuse_unread(
                408,
                f"the request announced {length} bytes but sent fewer before the connection went quiet for "
                f"{owner.read_timeout_s:g} s (or closed); send a body as long as its Content-Length.",
            )
            return None
        return body

    def refuse_unread(self, code: int, error: str) -> None:
        """Answer ``code`` and close: the body (or its rest) was not read, so the connection cannot carry another request."""
        self.close_connection = True
        self.send_json(code, {"error": error}, close=True)

    def send_json(self, code: int, body: dict, *, close: bool = False) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self._answered = True
        try:
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client gave up (its timeout); nothing left to tell it


def _read_request(payload: object, *, image_size: int | None) -> tuple[np.ndarray, OutputMode]:
    """The images and output mode a ``POST /predict`` body asks for.

    Raises:
        ConfigError: the body is not the protocol's object, or its images are not ``image_size`` square.
    """
    if not isinstance(payload, dict):
        raise ConfigError(f"the request body must be JSON like {REQUEST_FORM}; got a JSON {type(payload).__name__}.")
    images = decode_images(payload)
    output = payload.get("output", "labels")
    if output not in {m.value for m in OutputMode}:
        valid = " or ".join(repr(m.value) for m in OutputMode)
        raise ConfigError(f"'output' must be {valid}; got {output!r}.")
    height, width = images.shape[1:]
    # The model would fail deep in a convolution (or, worse, answer for a resized view) on any other size.
    # An empty batch holds no image of any size: a batching client's empty batch (even [0, 0, 0]) gets no answers.
    if image_size is not None and len(images) and (height, width) != (image_size, image_size):
        raise ConfigError(
            f"the target takes {image_size}x{image_size} images; got {height}x{width} (shape {list(images.shape)}). "
            "Send shape (n, H, W): the number of images first, then rows and columns of one gray level each."
        )
    return images, OutputMode(output)


def client_gone(client_address: Any, err: BaseException) -> None:
    """One short line for a client that went away mid-request (no traceback: not a fault of the server)."""
    where = ":".join(str(part) for part in tuple(client_address)[:2]) if client_address else "a client"
    print(
        f"target server: {where} disconnected mid-request ({type(err).__name__}); nothing answered.",
        file=sys.stderr,
        flush=True,
    )


class QuietHTTPServer(ThreadingHTTPServer):
    """A :class:`ThreadingHTTPServer` that says a client's reset in one line instead of a traceback.

    ``socketserver`` printed "Exception occurred during processing of request from ..." and a
    ``ConnectionResetError`` traceback for a client that reset its connection while the request
    line or headers were read; any other error keeps the standard report.
    """

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, ConnectionError | TimeoutError):
            client_gone(client_address, err)
            return
        super().handle_error(request, client_address)


def ignore_stop_signals() -> None:
    """Ignore further Ctrl-C and SIGTERM once a server is stopping (main thread only; elsewhere nothing).

    GNU ``timeout`` (and a terminal's Ctrl-C on the process group) can deliver a second SIGINT while
    the process exits: it interrupted an exit handler (torch's ``atexit`` callback) and printed
    "Exception ignored in atexit callback ... KeyboardInterrupt" after the stop sentence. The stop
    is under way; another signal has nothing left to stop. The command line leaves an ignored
    signal ignored on its way out (``flows.cli``'s ``_sigterm_raises``); the :mod:`atexit`
    registration (run before the handlers registered earlier) is a backstop for callers that
    restore their own handlers after the server returns.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    _ignore_signals_now()
    atexit.unregister(_ignore_signals_now)
    atexit.register(_ignore_signals_now)


def _ignore_signals_now() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


class TargetServer:
    """Serve a torch classifier on ``host:port`` in a background thread.

    Args:
        model: the classifier (inputs ``(n, 1, H, W)`` in ``[0, 1]``); or give ``backend``.
        backend: what answers instead of ``model`` (e.g. a :class:`RunBackend`).
        host: interface to bind (127.0.0.1 by default: never all interfaces unless asked).
        port: TCP port; 0 picks a free one.
        levels: gray levels of the inputs.
        info: metadata served at ``GET /info``.
        allow_probabilities: answer probability requests (off: a label-only deployment).
        handler: request handler class (subclass :class:`PredictHandler` to change behaviour).
        max_body_bytes: the largest request body read (default 64 MiB, about 60,000 28x28 images in base64);
            a larger Content-Length gets HTTP 413 without being read.
        read_timeout_s: how long a request may send nothing before the server gives up on it (HTTP 408 for a
            body shorter than its Content-Length).
        image_size: side of the square images the model takes; other sizes get HTTP 400. Default: ``info``'s
            ``image_size``, else the backend's ``image_size`` attribute, else unchecked.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        backend: Backend | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        levels: int = 256,
        info: dict | None = None,
        allow_probabilities: bool = True,
        handler: type[PredictHandler] = PredictHandler,
        image_size: int | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        read_timeout_s: float = 30.0,
    ) -> None:
        if (model is None) == (backend is None):
            raise ConfigError("TargetServer serves either a model or a backend; give exactly one.")
        self.backend: Backend = LocalTorchBackend(model, levels=levels) if model is not None else cast(Backend, backend)
        self.info = dict(info or {})
        side = (
            image_size if image_size is not None else self.info.get("image_size", getattr(backend, "image_size", None))
        )
        self.image_size = None if side is None else int(side)
        self.allow_probabilities = allow_probabilities
        self.max_body_bytes, self.read_timeout_s = int(max_body_bytes), float(read_timeout_s)
        self.lock = threading.Lock()
        self.requests = 0
        try:
            self.httpd = QuietHTTPServer((host, port), handler)
        except OSError as err:
            # Not this machine's address, or no such name: the host is wrong, and another port cannot help.
            if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    f"cannot listen on host {host!r}: it is not an address of this machine ({err.strerror or err}); "
                    "give --host 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of its own addresses."
                ) from err
            raise  # e.g. the port is taken: the caller says which port
        self.httpd.daemon_threads = True
        self.httpd.target_server = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/predict"

    def start(self) -> TargetServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="target-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (for the command line)."""
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
