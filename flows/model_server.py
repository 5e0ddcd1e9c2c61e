"""A tiny HTTP model server for a black-box target (stdlib ``http.server``).

Service code, so it lives outside the pure package. It speaks the protocol of
:class:`obliviate.extraction.target.HttpBackend`:

* ``POST /predict`` with ``{"shape", "dtype", "data", "output"}`` answers ``{"labels": [...]}``
  or, only when ``output`` is ``"probabilities"`` and the server allows it,
  ``{"probabilities": [[...]]}``. A malformed request gets HTTP 400.
* ``GET /info`` answers the metadata given at start (model name, training indices) so an
  auditor can keep its pool disjoint from the target's training data.
* ``GET /health`` answers ``{"ok": true}``.

Usage::

    with TargetServer(model, info={"arch": "lenet5"}) as server:
        print(server.url)  # http://127.0.0.1:<port>/predict
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import numpy as np
from torch import nn

from obliviate.errors import ConfigError
from obliviate.extraction.target import LocalTorchBackend, OutputMode, decode_images


class PredictHandler(BaseHTTPRequestHandler):
    """Request handler; ``self.server.target_server`` is the owning :class:`TargetServer`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return  # quiet: the Target's own query log is the audit trail

    def do_GET(self) -> None:
        owner: TargetServer = self.server.target_server  # type: ignore[attr-defined]
        if self.path == "/info":
            self.send_json(200, owner.info)
        elif self.path == "/health":
            self.send_json(200, {"ok": True})
        else:
            self.send_json(404, {"error": f"no route {self.path}; use POST /predict, GET /info"})

    def do_POST(self) -> None:
        owner: TargetServer = self.server.target_server  # type: ignore[attr-defined]
        if self.path != "/predict":
            self.send_json(404, {"error": f"no route {self.path}; use POST /predict"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            payload = json.loads(self.rfile.read(length))
            images = decode_images(payload)
            output = OutputMode(payload.get("output", "labels"))
        except (ValueError, ConfigError, json.JSONDecodeError) as err:
            self.send_json(400, {"error": str(err)})
            return
        if output is OutputMode.PROBABILITIES and not owner.allow_probabilities:
            self.send_json(403, {"error": "this target answers labels only"})
            return
        with owner.lock:
            answer = owner.backend.predict(np.array(images), output=output)
        owner.requests += 1
        self.send_json(200, {output.value: answer.tolist()})

    def send_json(self, code: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        try:
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout); nothing left to tell it


class TargetServer:
    """Serve a torch classifier on ``host:port`` in a background thread.

    Args:
        model: the classifier (inputs ``(n, 1, H, W)`` in ``[0, 1]``).
        host: interface to bind (127.0.0.1 by default: never all interfaces unless asked).
        port: TCP port; 0 picks a free one.
        levels: gray levels of the inputs.
        info: metadata served at ``GET /info``.
        allow_probabilities: answer probability requests (off: a label-only deployment).
        handler: request handler class (subclass :class:`PredictHandler` to change behaviour).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        levels: int = 256,
        info: dict | None = None,
        allow_probabilities: bool = True,
        handler: type[PredictHandler] = PredictHandler,
    ) -> None:
        self.backend = LocalTorchBackend(model, levels=levels)
        self.info = dict(info or {})
        self.allow_probabilities = allow_probabilities
        self.lock = threading.Lock()
        self.requests = 0
        self.httpd = ThreadingHTTPServer((host, port), handler)
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
