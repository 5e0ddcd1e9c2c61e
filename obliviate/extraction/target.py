"""A black-box target: the model under audit, reachable only through ``query(batch)``.

SPEC section 3: the target is a trained classifier the attacker can only query. Every image
sent costs one query; the :class:`Target` counts them against a budget, refuses a batch that
would pass the budget (nothing of that batch is answered), and logs every call. By default it
answers labels only; probabilities are a switch, because a label-only oracle is the threat
model of the seed's table.

Two backends answer the queries:

* :class:`LocalTorchBackend`: a ``torch.nn.Module`` in this process.
* :class:`HttpBackend`: a model behind an HTTP endpoint, JSON in and out (stdlib ``urllib``),
  with a per-request timeout and retries on transient failures only (connection errors,
  timeouts, HTTP 5xx); a 4xx answer is the caller's mistake and is raised at once. A target that
  cannot be reached (connection refused or reset, HTTP 502/503/504: a server restarting or being
  redeployed) is retried for a time window (``wait_s``, the CLI's ``--target-wait``), so an ordinary
  restart does not end an audit that has minutes of work done.

Images travel as ``(n, H, W)`` uint8 gray levels, the same arrays :mod:`obliviate.data` loads.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import socket
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from obliviate.errors import ConfigError, ObliviateError
from obliviate.files import write_whole
from obliviate.models import images_to_tensor

#: How far a row of class probabilities may sum from 1: a float32 softmax, or a server rounding each to 4 decimals,
#: stays well inside it; logits and scores do not (the substitutes' check of their targets uses the same figure).
PROBABILITY_SUM_TOLERANCE = 1e-2


class BudgetExceeded(ObliviateError):
    """A query batch would take the target past its query budget."""


class TargetRequestError(ObliviateError):
    """The target's endpoint rejected a request (HTTP 4xx): retrying cannot help."""


class TargetUnavailable(ObliviateError):
    """The target's endpoint kept failing transiently (5xx, timeout, connection) past all retries."""


# How long an unreachable target (connection refused or reset, HTTP 502/503/504) is retried: long enough for a
# model server to restart or be redeployed, short enough that a target gone for good ends the audit.
DEFAULT_TARGET_WAIT_S = 120.0
# The longest pause between two attempts while the target is unreachable: it is noticed back within seconds.
MAX_BACKOFF_S = 4.0
# A request not answered for this long is said (through ``on_wait``), then again every WAIT_NOTICE_EVERY_S.
WAIT_NOTICE_AFTER_S = 10.0
WAIT_NOTICE_EVERY_S = 30.0
# What a restarting server or its proxy answers: the server is not there yet, not failing on the request.
_UNREACHABLE_STATUS = (502, 503, 504)


class _TransientFailures(Exception):
    """Every attempt of an HTTP request failed transiently; ``failures`` says how, one entry per attempt.

    ``connection_only``: every attempt found no server (a refused or reset connection); ``unreachable``: some
    attempt found the target unreachable (that or HTTP 502/503/504); ``timeouts_only``: every attempt was
    accepted but not answered in time; ``seconds``: how long the attempts took in all.
    """

    def __init__(self, failures: list[str], *, connection_only: bool, unreachable: bool, seconds: float) -> None:
        super().__init__("; ".join(failures))
        self.failures, self.connection_only, self.unreachable = failures, connection_only, unreachable
        self.timeouts_only = all(f.startswith("timeout") for f in failures)
        self.seconds = seconds

    def summary(self) -> str:
        """The failures, each kind once with how often it happened (a 2-minute outage fails dozens of times)."""
        kinds = Counter(f if not f.startswith("timeout") else f.split(" (")[0] for f in self.failures)
        return "; ".join(kind if count == 1 else f"{kind} (x{count})" for kind, count in kinds.items())


class _WaitNotices:
    """Says through ``say`` that ``url`` has not answered: after WAIT_NOTICE_AFTER_S, then every
    WAIT_NOTICE_EVERY_S, from a timer thread (a single attempt may block for the whole timeout); once more
    when it answers after a notice. Without ``say`` it does nothing."""

    def __init__(self, say: Callable[[str], None] | None, url: str, *, until: Callable[[], tuple[float, str]]) -> None:
        self.say, self.url, self.until = say, url, until
        self.start = time.monotonic()
        self.said = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="target-wait-notices", daemon=True) if say else None
        if self.thread:
            self.thread.start()

    def _run(self) -> None:
        assert self.say is not None
        pause = WAIT_NOTICE_AFTER_S
        started = time.time() - (time.monotonic() - self.start)
        while not self.done.wait(pause):
            self.said = True
            until_s, limit = self.until()  # asked each time: what failed so far decides which limit applies
            until = time.strftime("%H:%M:%S", time.gmtime(started + until_s))
            self.say(
                f"target {self.url} has not answered for {time.monotonic() - self.start:.0f} s; retrying until "
                f"{until} UTC ({limit})"
            )
            pause = WAIT_NOTICE_EVERY_S

    def end(self, *, answered: bool) -> None:
        if self.thread is None:
            return
        self.done.set()
        self.thread.join()
        if answered and self.said and self.say:
            self.say(f"target {self.url} answers again, after {time.monotonic() - self.start:.0f} s without an answer")


class OutputMode(str, Enum):
    """What a query returns: class labels only (default) or class probabilities."""

    LABELS = "labels"
    PROBABILITIES = "probabilities"


def output_mode(value: object, *, option: str = "output") -> OutputMode:
    """``value`` as an :class:`OutputMode` (SPEC section 3: label-only by default, a probabilities switch).

    Raises:
        ConfigError: not ``"labels"`` or ``"probabilities"``; the message names ``option`` and the fix.
    """
    try:
        return OutputMode(value)
    except ValueError:
        raise ConfigError(
            f"{option} is what the target answers: 'labels' (the default, SPEC section 3's label-only oracle) or "
            f"'probabilities' (class probabilities, when its API returns them); got {value!r}. Give one of the two."
        ) from None


#: What a target server that answers labels only was asked for, and what to do (:meth:`HttpBackend.predict`).
_PROBABILITIES_REFUSED = (
    "the target at {url} answers labels only: it refused a request for class probabilities (HTTP {code}: {detail}). "
    "Audit it with --target-output labels (the default), or serve it with probabilities allowed (`obliviate target "
    "serve --probabilities`; TargetServer(allow_probabilities=True))."
)


class Backend(Protocol):
    """Something that answers a batch of gray-level images."""

    def predict(self, images: np.ndarray, *, output: OutputMode) -> np.ndarray:
        """Labels ``(n,)`` int64 or probabilities ``(n, C)`` float32 for ``(n, H, W)`` uint8 images."""
        ...


@dataclass(frozen=True)
class QueryRecord:
    """One answered (or refused) call to :meth:`Target.query`.

    Attributes:
        call: 0-based index of the call.
        size: number of images in the batch.
        used_after: queries used after this call (unchanged when refused).
        digest: SHA-256 (first 16 hex chars) of the batch's bytes, to audit what was asked.
        seconds: wall time the backend took (0 when refused).
        refused: True when the budget refused the batch.
        output: what the batch asked for: labels, or class probabilities (it costs the same either way).
    """

    call: int
    size: int
    used_after: int
    digest: str
    seconds: float
    refused: bool = False
    output: OutputMode = OutputMode.LABELS


@dataclass
class Target:
    """A budgeted, logged, black-box view of a classifier (SPEC section 3).

    Attributes:
        backend: what answers the queries.
        budget: the most images that may be queried in total; ``None`` means unlimited (use it
            only for evaluation oracles, never for the attacker's view).
        output: labels only (default) or probabilities.
        used: images queried so far.
        log: one :class:`QueryRecord` per call.
        num_classes: the classes the target has, when known: a label outside ``0..num_classes-1`` is refused
            (it would fail deep inside the substitute's training).
    """

    backend: Backend
    budget: int | None
    output: OutputMode = OutputMode.LABELS
    used: int = 0
    log: list[QueryRecord] = field(default_factory=list)
    num_classes: int | None = None

    def __post_init__(self) -> None:
        self.output = output_mode(self.output)
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, (int, np.integer)) or self.budget < 0
        ):
            raise ConfigError(
                f"budget must be a non-negative whole number of queries, or None for unlimited; got {self.budget!r}. "
                "Pass an int."
            )

    @property
    def remaining(self) -> int | None:
        """Queries left, or ``None`` when unlimited."""
        return None if self.budget is None else self.budget - self.used

    def query(self, images: np.ndarray) -> np.ndarray:
        """Ask the target about a batch; each image costs one query, whether it answers labels or probabilities.

        Args:
            images: ``(n, H, W)`` uint8 gray levels (a single ``(H, W)`` image is not accepted:
                wrap it as a batch of one).

        Returns:
            ``(n,)`` int64 labels in label mode; ``(n, C)`` float32 probabilities otherwise.

        Raises:
            ConfigError: not a ``(n, H, W)`` uint8 batch, or images of another size than the backend's model
                takes (when the backend knows it: ``image_size``); nothing is answered or counted.
            BudgetExceeded: the batch would pass the budget; nothing is answered or counted.
            TargetRequestError: the backend answered something that is not one label (or one row of
                probabilities: finite, >= 0, summing to 1, ``num_classes`` wide when known) per image.
        """
        images = _check_batch(images)
        _check_size(images, getattr(self.backend, "image_size", None))
        n = int(images.shape[0])
        digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
        if self.budget is not None and self.used + n > self.budget:
            self.log.append(QueryRecord(len(self.log), n, self.used, digest, 0.0, refused=True, output=self.output))
            raise BudgetExceeded(
                f"query budget is {self.budget} images and {self.used} are used; a batch of {n} "
                f"would need {self.used + n}. Query at most {self.budget - self.used} more images, "
                "or audit with a larger budget."
            )
        start = time.perf_counter()
        if n or self.output is OutputMode.PROBABILITIES:
            # An empty batch still goes to the backend for probabilities: only it knows the C of the (0, C) answer,
            # and the backends answer it without spending a query.
            answer = self.backend.predict(images, output=self.output)
        else:
            answer = np.zeros(0, np.int64)
        seconds = time.perf_counter() - start
        answer = _check_answer(answer, n=n, output=self.output, num_classes=self.num_classes)
        self.used += n
        self.log.append(QueryRecord(len(self.log), n, self.used, digest, seconds, output=self.output))
        return answer


class LocalTorchBackend:
    """Answers queries with a torch classifier in this process (evaluation mode, no gradients).

    Args:
        model: a classifier mapping ``(n, 1, H, W)`` floats in ``[0, 1]`` to logits.
        levels: gray levels of the inputs (256 for 8-bit images).
        batch_size: images per forward pass.

    Attributes:
        image_size: the side of the square images the model takes, read from the model's own
            ``image_size`` (set by :func:`obliviate.models.build_model`); ``None`` when the model does
            not say. Batches of another size are refused before the model sees them.
    """

    def __init__(self, model: nn.Module, *, levels: int = 256, batch_size: int = 512) -> None:
        self.model = model.eval()
        self.levels = levels
        self.batch_size = batch_size
        size = getattr(model, "image_size", None)
        self.image_size: int | None = int(size) if isinstance(size, (int, np.integer)) else None

    def predict(self, images: np.ndarray, *, output: OutputMode) -> np.ndarray:
        """The model's answers for a batch (SPEC section 3: the target's label-only oracle, or probabilities).

        Args:
            images: ``(n, H, W)`` uint8 gray levels, ``H = W = image_size`` when the model declares it.
            output: labels (argmax of the softmax) or the softmax probabilities.

        Returns:
            ``(n,)`` int64 labels, or ``(n, C)`` float32 probabilities.

        Raises:
            ConfigError: not a ``(n, H, W)`` uint8 batch, or images of another size than the model takes.
        """
        _check_size(_check_batch(images), self.image_size)
        probs = []
        with torch.no_grad():
            # An empty batch runs the model once on no image: its (0, C) answer says C (torch.cat of none fails).
            for start in range(0, len(images) or 1, self.batch_size):
                x = images_to_tensor(images[start : start + self.batch_size], levels=self.levels)
                probs.append(torch.softmax(self.model(x), dim=1))
        p = torch.cat(probs).numpy().astype(np.float32)
        if OutputMode(output) is OutputMode.LABELS:
            return p.argmax(axis=1).astype(np.int64)
        return p


class HttpBackend:
    """Answers queries by POSTing JSON to a model endpoint (see ``flows/model_server.py``).

    Request body: ``{"shape": [n, H, W], "dtype": "uint8", "data": <base64 of the bytes>,
    "output": "labels" | "probabilities"}``. Response: ``{"labels": [...]}`` in label mode,
    ``{"probabilities": [[...], ...]}`` otherwise.

    Args:
        url: the prediction endpoint, e.g. ``http://127.0.0.1:8000/predict``.
        timeout_s: seconds to wait for each request.
        retries: extra attempts after a transient failure (connection error, timeout, 5xx).
        backoff_s: wait before the first retry; doubles after each further failure, up to :data:`MAX_BACKOFF_S`.
        wait_s: how long a request keeps being retried while the target is unreachable (connection refused or
            reset, HTTP 502/503/504: a restart, a redeploy), counted from its first attempt; ``retries`` still
            applies when it allows more. ``0``: only ``retries``.
        on_wait: called with a line when a request has not been answered for :data:`WAIT_NOTICE_AFTER_S`, then
            every :data:`WAIT_NOTICE_EVERY_S`, and once when it is answered after such a line (from a timer
            thread); ``None``: nothing is said.
        num_classes: the target's classes, when known; :meth:`info` learns them from the server's
            ``num_classes``. Labels outside ``0..num_classes-1`` (and negative labels always) are refused.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.2,
        wait_s: float = DEFAULT_TARGET_WAIT_S,
        on_wait: Callable[[str], None] | None = None,
        num_classes: int | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"target URL must start with http:// or https://; got {url!r}.")
        _check_url(url)
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or wait_s < 0:
            raise ConfigError(
                f"need timeout_s > 0, retries >= 0, backoff_s >= 0, wait_s >= 0; got {timeout_s}, {retries}, "
                f"{backoff_s}, {wait_s}."
            )
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.wait_s = wait_s
        self.on_wait = on_wait
        self.attempts = 0
        self.num_classes = num_classes

    def predict(self, images: np.ndarray, *, output: OutputMode) -> np.ndarray:
        """POST a batch to the endpoint and return its checked answers (SPEC section 3: the black-box target).

        Transient failures (connection errors, timeouts, 5xx) are retried ``retries`` times with backoff, an
        unreachable target for ``wait_s`` seconds; a batch is sent again only when it was not answered.

        Args:
            images: ``(n, H, W)`` uint8 gray levels.
            output: labels or probabilities.

        Returns:
            ``(n,)`` int64 labels in ``0..num_classes-1`` (when known), or ``(n, C)`` float32 probabilities;
            ``(0, C)`` for an empty batch, ``C`` being :attr:`num_classes` (given, or learned from ``GET /info``).

        Raises:
            ConfigError: not a ``(n, H, W)`` uint8 batch.
            TargetRequestError: a 4xx answer (a label-only server's refusal of probabilities in words), or an answer
                that is not JSON with one whole class number (or one row of numbers) per image; an empty batch's
                probabilities when the classes are not known.
            TargetUnavailable: transient failures past the retries.
        """
        output = OutputMode(output)
        body = json.dumps(encode_images(images) | {"output": output.value}).encode()
        reply = self._post(body, output=output)
        key = output.value
        if key not in reply:
            raise TargetRequestError(f"endpoint {self.url} answered without {key!r}: keys {sorted(reply)}.")
        values = reply[key]
        if output is OutputMode.LABELS:
            # Checked before any cast: np.asarray(..., int64) would turn a label 1.5 into 1 without a word.
            if not isinstance(values, list):
                raise TargetRequestError(
                    f"endpoint {self.url} answered {key!r} as a JSON {type(values).__name__}; it must be a list "
                    "with one class number per image."
                )
            odd = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
            if odd:
                raise TargetRequestError(
                    f"endpoint {self.url} answered labels that are not class numbers: labels must be whole numbers; "
                    f"got {odd[:5]}. Fix the endpoint to answer the argmax class of each image."
                )
            labels = np.asarray([min(max(v, -1), 2**62) for v in values], dtype=np.int64)  # clipped: no overflow
            why = f"its GET /info declares {self.num_classes} classes"
            return _check_labels(
                labels, n=len(images), num_classes=self.num_classes, why=why, who=f"endpoint {self.url}"
            )
        try:
            probabilities = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise TargetRequestError(
                f"endpoint {self.url} answered probabilities that are not an (n, C) array of numbers ({err})."
            ) from err
        if len(images) or probabilities.size:
            return probabilities
        # JSON's [] has no row length: an empty batch's (0, C) takes C from what the server declared.
        return np.zeros((0, self._classes_of_empty_answer()), np.float32)

    def _classes_of_empty_answer(self) -> int:
        """The classes C of an empty batch's ``(0, C)`` probabilities: given, or from ``GET /info`` (no query spent).

        Raises:
            TargetRequestError: neither the caller nor the server's ``GET /info`` says how many classes there are.
        """
        if self.num_classes is None:
            self.info()  # learns the server's num_classes; open_backend has usually asked already
        if self.num_classes is None:
            raise TargetRequestError(
                f"endpoint {self.url} answered an empty batch's probabilities as [], and its GET /info declares no "
                "num_classes, so the (0, C) answer's C is unknown. Give HttpBackend(num_classes=C), or have the "
                'server\'s GET /info declare {"num_classes": C}.'
            )
        return self.num_classes

    def info(self) -> dict:
        """The server's ``GET /info`` metadata (model name, training indices), or ``{}`` when it has none.

        Transient failures (connection errors, timeouts, 5xx) are retried as :meth:`predict`'s are: every audit
        cell reads ``/info``, so one dropped connection must not end the audit.

        Raises:
            TargetUnavailable: still no answer after the retries (nothing listens at the URL's host and
                port, or it keeps failing), so the audit stops before it starts rather than at its first query.
        """
        info_url = urllib.parse.urljoin(self.url, "info")  # the predict endpoint's sibling: /api/predict -> /api/info
        try:
            _, raw = self._send(lambda: urllib.request.Request(info_url), counted=False)
        except urllib.error.HTTPError:
            return {}  # a server without /info (4xx): it answers, it just declares nothing
        except _TransientFailures as err:
            if err.connection_only:
                raise TargetUnavailable(
                    f"no server answers at {self.url} ({err.failures[-1]}; {len(err.failures)} attempts in "
                    f"{err.seconds:.0f} s{self._window()}); start the target's server (e.g. `obliviate target serve "
                    "--checkpoint PATH`) or check the URL's host and port."
                ) from err
            raise self._kept_failing(f"GET {info_url}", err) from err
        try:
            info = json.loads(raw)
        except ValueError:
            return {}  # not JSON: the server declares nothing readable
        self._learn_classes(info)
        return info if isinstance(info, dict) else {}

    def check_endpoint(self, *, image_size: int = 28, output: OutputMode = OutputMode.LABELS) -> None:
        """POST an empty batch to the predict URL, so a wrong path (or a refused output) is refused before any work.

        It asks about no image: no query is spent and :attr:`attempts` does not count it. Only "no such
        route" answers (404, 405) are refused, and, asking for probabilities, a server's refusal of them (403);
        any other answer shows something listens there.

        Args:
            image_size: the side of the empty batch's images.
            output: what the audit will ask for (``obliviate target serve`` refuses probabilities unless started
                with ``--probabilities``, with HTTP 403, empty batch or not).

        Raises:
            TargetRequestError: the URL answers 404 or 405, or refuses probabilities asked for.
            TargetUnavailable: transient failures past the retries.
        """
        output = output_mode(output)
        body = json.dumps(encode_images(np.zeros((0, image_size, image_size), np.uint8)) | {"output": output.value})
        try:
            self._send(self._posting(body.encode()), counted=False)
        except urllib.error.HTTPError as err:
            if err.code == 403 and output is OutputMode.PROBABILITIES:
                raise self._probabilities_refused(err) from err
            if err.code in (404, 405):
                parts = urllib.parse.urlsplit(self.url)
                raise TargetRequestError(
                    f"endpoint {self.url} answered HTTP {err.code} to a POST (an empty batch: no query spent): "
                    f"{err.read()[:200].decode(errors='replace')}. The URL must name the model's predict endpoint, "
                    f"e.g. {parts.scheme}://{parts.netloc}/predict for `obliviate target serve`."
                ) from err
        except _TransientFailures as err:
            raise self._kept_failing(f"endpoint {self.url}", err) from err

    def _learn_classes(self, info: object) -> None:
        declared = info.get("num_classes") if isinstance(info, dict) else None
        if self.num_classes is None and isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
            self.num_classes = declared

    def _posting(self, body: bytes) -> Callable[[], urllib.request.Request]:
        """A fresh JSON POST of ``body`` to the predict URL for each attempt."""
        return lambda: urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )

    def _window(self) -> str:
        """How long an unreachable target was retried, as the error names it (``""`` with no window)."""
        return f", retried for --target-wait {self.wait_s:g} s (wait_s in the API)" if self.wait_s else ""

    def _kept_failing(self, what: str, err: _TransientFailures) -> TargetUnavailable:
        failed = _times(len(err.failures))
        if err.unreachable and self.wait_s:
            return TargetUnavailable(
                f"{what} has not answered for {err.seconds:.0f} s ({err.summary()}; {len(err.failures)} attempts), "
                f"retried for --target-wait {self.wait_s:g} s (wait_s in the API). Check that the target's server is "
                "running, or give --target-wait more seconds to outlast a longer restart."
            )
        if err.timeouts_only:
            # More time or more attempts only make the wait longer: the server is there and does not answer.
            host = urllib.parse.urlsplit(self.url).netloc
            return TargetUnavailable(
                f"{what} failed {failed} ({err.summary()}, {err.seconds:.0f} s in all): the server at {host} accepts "
                "connections but answers none of them; it is up but not answering (stuck or overloaded). Check the "
                "server: its log, its load, and that its model answers."
            )
        retried = "not retried (--retries 0)" if not self.retries else f"retried {_times(self.retries)}"
        return TargetUnavailable(
            f"{what} failed {failed} ({err.summary()}); transient errors are {retried}. Check the server, "
            "or raise --timeout or --retries (timeout_s, retries in the API)."
        )

    def _probabilities_refused(self, err: urllib.error.HTTPError) -> TargetRequestError:
        """A server's 403 to a request for probabilities, as the sentence of :data:`_PROBABILITIES_REFUSED`."""
        raw = err.read()[:300]
        try:
            detail = json.loads(raw).get("error") or raw.decode(errors="replace")
        except (ValueError, AttributeError):
            detail = raw.decode(errors="replace")
        return TargetRequestError(
            _PROBABILITIES_REFUSED.format(url=self.url, code=err.code, detail=str(detail).rstrip("."))
        )

    def _post(self, body: bytes, *, output: OutputMode = OutputMode.LABELS) -> dict:
        try:
            status, raw = self._send(self._posting(body), counted=True)
        except urllib.error.HTTPError as err:
            if err.code == 403 and output is OutputMode.PROBABILITIES:
                raise self._probabilities_refused(err) from err
            detail = err.read()[:200].decode(errors="replace")
            raise TargetRequestError(
                f"endpoint {self.url} rejected the request with HTTP {err.code}: {detail}. "
                "Client errors are not retried; fix the request or the URL."
            ) from err
        except _TransientFailures as err:
            raise self._kept_failing(f"endpoint {self.url}", err) from err
        return self._json_object(status, raw)

    def _send(self, request: Callable[[], urllib.request.Request], *, counted: bool) -> tuple[int, bytes]:
        """Status and body of the first answer that is not a transient failure, retrying with backoff.

        Args:
            request: builds the request (a fresh one per attempt).
            counted: count the attempts in :attr:`attempts` (the predictions' attempts, not ``/info``'s).

        Raises:
            urllib.error.HTTPError: a 4xx answer, at once (the caller's mistake: retrying cannot help).
            _TransientFailures: every attempt failed with a connection error, a timeout or a 5xx.
        """
        failures: list[str] = []
        connection_only, unreachable = True, False
        start = time.monotonic()
        span_s = self._retries_span_s()
        pauses_s = self._retry_pauses_s()

        def until() -> tuple[float, str]:
            # A target not reached fails each attempt at once: its retries take only their pauses, so the window
            # decides unless those pauses outlast it. One that takes requests and answers none: --timeout, --retries.
            if unreachable and self.wait_s:
                return (self.wait_s, "--target-wait") if self.wait_s >= pauses_s else (pauses_s, "--retries")
            return span_s, "--timeout, --retries"

        notices = _WaitNotices(self.on_wait, self.url, until=until)
        answered = False
        try:
            while True:
                if counted:
                    self.attempts += 1
                reached = False  # the server took the request: an unreachable target's window does not apply
                try:
                    with urllib.request.urlopen(request(), timeout=self.timeout_s) as resp:
                        status, body = resp.status, resp.read()
                    answered = True
                    return status, body
                except urllib.error.HTTPError as err:
                    if err.code < 500:
                        answered = True
                        raise
                    connection_only = False
                    reached = err.code not in _UNREACHABLE_STATUS
                    failures.append(f"HTTP {err.code}")
                except TimeoutError as err:
                    connection_only, reached = False, True
                    failures.append(f"timeout after {self.timeout_s}s ({err})")
                except urllib.error.URLError as err:
                    if isinstance(err.reason, (TimeoutError, socket.timeout)):
                        connection_only, reached = False, True
                        failures.append(f"timeout after {self.timeout_s}s")
                    else:
                        failures.append(f"connection error: {err.reason}")
                except (ConnectionError, http.client.HTTPException) as err:
                    failures.append(f"connection error: {err!r}")
                unreachable = unreachable or not reached
                left_s = start + self.wait_s - time.monotonic()
                in_window = not reached and left_s > 0
                if len(failures) > self.retries and not in_window:
                    raise _TransientFailures(
                        failures,
                        connection_only=connection_only,
                        unreachable=unreachable,
                        seconds=time.monotonic() - start,
                    )
                pause = min(self.backoff_s * 2 ** (len(failures) - 1), MAX_BACKOFF_S)
                # Past the retries only the window keeps it going: one last attempt at its end, none after.
                time.sleep(min(pause, left_s) if len(failures) > self.retries else pause)
        finally:
            notices.end(answered=answered)

    def _retries_span_s(self) -> float:
        """The longest the ``retries`` take when every attempt times out (pauses included)."""
        return (self.retries + 1) * self.timeout_s + self._retry_pauses_s()

    def _retry_pauses_s(self) -> float:
        """The pauses between the ``retries``' attempts, in all: how long they take when each fails at once."""
        return sum(min(self.backoff_s * 2**i, MAX_BACKOFF_S) for i in range(self.retries))

    def _json_object(self, status: int, raw: bytes) -> dict:
        """The JSON object of a successful answer; a body that is anything else is the endpoint's fault, not transient."""
        try:
            reply = json.loads(raw)
        except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
            raise TargetRequestError(
                f"endpoint {self.url} answered HTTP {status} with a body that is not JSON ({err}): "
                f'{raw[:200].decode(errors="replace")!r}. It must answer JSON like {{"labels": [3, 7, ...]}}; '
                "check that the URL is the model's predict endpoint."
            ) from err
        if not isinstance(reply, dict):
            raise TargetRequestError(
                f"endpoint {self.url} answered a JSON {type(reply).__name__}, not an object like "
                f'{{"labels": [3, 7, ...]}}: {raw[:200].decode(errors="replace")!r}.'
            )
        return reply


def _check_url(url: str) -> None:
    """Refuse a target URL that cannot name a predict endpoint (``ConfigError``, with the fix)."""
    example = "http://127.0.0.1:8000/predict"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- parsed on access: raises on a port that is not a number in 0..65535
    except ValueError as err:
        raise ConfigError(f"target URL {url!r} is not a valid URL ({err}); write it like {example}.") from err
    if not parts.hostname:
        raise ConfigError(f"target URL {url!r} names no host; write it like {example}.")
    if parts.path in ("", "/"):
        # Without a path the requests would go to "/", and GET /info to the wrong place.
        root = f"{parts.scheme}://{parts.netloc}"
        raise ConfigError(
            f"the target URL must name the predict endpoint, e.g. {root}/predict; got {url!r}. "
            "`obliviate target serve` answers at /predict."
        )


def encode_images(images: np.ndarray) -> dict:
    """``(n, H, W)`` uint8 images as the JSON-ready payload of the HTTP protocol."""
    images = np.ascontiguousarray(_check_batch(images))
    return {"shape": list(images.shape), "dtype": "uint8", "data": base64.b64encode(images.tobytes()).decode()}


def decode_images(payload: dict) -> np.ndarray:
    """Inverse of :func:`encode_images`; raises ``ConfigError`` on a malformed payload."""
    if not isinstance(payload, dict):
        raise ConfigError(f"payload must be a JSON object with 'shape' and 'data'; got a {type(payload).__name__}.")
    shape = payload.get("shape")
    # int() would truncate 1.7 to 1 and read a batch the client never meant; JSON true is an int to Python.
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ConfigError(
            f"payload 'shape' must be a list of whole numbers >= 0, [n, H, W]; got {shape!r}. Send the array's shape."
        )
    try:
        raw = base64.b64decode(payload["data"], validate=True)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"payload needs 'shape' and base64 'data'; could not read it ({err}).") from err
    if payload.get("dtype", "uint8") != "uint8" or len(shape) != 3 or int(np.prod(shape)) != len(raw):
        raise ConfigError(
            f"payload must hold uint8 images of shape (n, H, W) matching its bytes; got dtype "
            f"{payload.get('dtype')!r}, shape {tuple(shape)}, {len(raw)} bytes."
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _check_batch(images: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
        raise ConfigError(
            "a query batch must be a uint8 array of gray levels with shape (n, H, W); got "
            f"{type(images).__name__} dtype {getattr(images, 'dtype', None)} shape "
            f"{getattr(images, 'shape', None)}. Wrap one image as images[None]."
        )
    return images


def rows_not_probabilities(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of ``(n, C)`` numbers are not probabilities (a negative entry, or a sum off 1 by more than
    :data:`PROBABILITY_SUM_TOLERANCE`), and each row's sum in float64; rows holding NaN or inf are not flagged here.

    One rule for a target's answers (:func:`_check_answer`) and a caller's own rows
    (:func:`obliviate.extraction.substitute.check_targets`), each of which says it in its own error.
    """
    sums = rows.astype(np.float64).sum(axis=1)
    return (rows < 0).any(axis=1) | (np.abs(sums - 1) > PROBABILITY_SUM_TOLERANCE), sums


def _check_answer(answer: np.ndarray, *, n: int, output: OutputMode, num_classes: int | None = None) -> np.ndarray:
    answer = np.asarray(answer)
    if output is OutputMode.LABELS:
        if answer.ndim == 2 and answer.shape[0] == n:
            raise TargetRequestError(
                f"a label-only target must answer {n} labels, one per image; it answered an array of shape "
                f"{answer.shape}, one row per image. The backend may be leaking probabilities."
            )
        if answer.size and not np.issubdtype(answer.dtype, np.integer):
            raise TargetRequestError(
                f"a label-only target must answer whole class numbers; it answered dtype {answer.dtype} "
                f"(e.g. {answer.ravel()[:3].tolist()}). Fix the backend to answer the argmax class of each image."
            )
        why = f"the target has {num_classes} classes"
        return _check_labels(answer.astype(np.int64), n=n, num_classes=num_classes, why=why, who="the target")
    if answer.ndim != 2 or answer.shape[0] != n:
        raise TargetRequestError(f"probabilities must have shape ({n}, C); got {answer.shape}.")
    answer = answer.astype(np.float32)
    if not np.isfinite(answer).all():
        bad = answer[~np.isfinite(answer)]
        raise TargetRequestError(
            f"the target answered probabilities that are not finite numbers: got {bad[:5].tolist()}. "
            "Fix the backend to answer a softmax row per image (a model with NaN weights answers NaN)."
        )
    if num_classes is not None and answer.shape[1] != num_classes:
        raise TargetRequestError(
            f"the target has {num_classes} classes, so each row of probabilities must hold {num_classes}; it answered "
            f"rows of {answer.shape[1]}. Check that the endpoint serves this task's model."
        )
    off, sums = rows_not_probabilities(answer)
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise TargetRequestError(
            f"the target answered rows that are not probabilities (each must be >= 0 and sum to 1 within "
            f"{PROBABILITY_SUM_TOLERANCE:g}): {int(off.sum())} of {n}, e.g. {np.round(answer[row][:5], 4).tolist()} "
            f"(sum {sums[row]:.4g}). The backend may be answering logits: fix it to answer the softmax of each image."
        )
    return answer


def _check_size(images: np.ndarray, image_size: int | None) -> None:
    """Refuse a batch whose images are not ``image_size`` square (``None``: the size is unknown, anything goes)."""
    if image_size is not None and images.shape[1:] != (image_size, image_size):
        raise ConfigError(
            f"the target takes {image_size}x{image_size} images; got a batch of {images.shape[1]}x{images.shape[2]}. "
            "Query images of the target's task and size (resize or crop them first)."
        )


def _check_labels(labels: np.ndarray, *, n: int, num_classes: int | None, why: str, who: str) -> np.ndarray:
    """``labels`` when they are ``n`` class numbers in ``0..num_classes-1`` (``0..`` when the classes are unknown).

    Raises:
        TargetRequestError: another count, shape or a label outside the classes; ``who`` answered it.
    """
    if labels.shape != (n,):
        count = labels.shape[0] if labels.ndim == 1 else f"an array of shape {labels.shape} as"
        raise TargetRequestError(
            f"{who} answered {count} label{'' if count == 1 else 's'} for {n} images; it must answer one label "
            "per image, in the order sent."
        )
    outside = labels[(labels < 0) | (labels >= (num_classes if num_classes is not None else np.iinfo(np.int64).max))]
    if outside.size:
        rule = "0 or more" if num_classes is None else f"0..{num_classes - 1} ({why})"
        raise TargetRequestError(
            f"{who} answered labels outside its classes: labels must be class numbers {rule}; got "
            f"{', '.join(str(v) for v in outside[:5])}. Check that the endpoint serves this task's model."
        )
    return labels


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, arch: str, meta: dict) -> None:
    """Save a target as ``{"arch", "state_dict", "meta"}`` with ``torch.save``.

    ``meta`` should hold plain values only (numbers, strings, lists): ``num_classes``,
    ``image_size``, ``levels``, ``dataset``, ``dataset_fingerprint`` and ``train_indices`` (so an
    audit can keep its pool disjoint from the training data).
    """
    checkpoint = {"arch": arch, "state_dict": model.state_dict(), "meta": dict(meta)}

    def write(partial: Path) -> None:
        try:
            torch.save(checkpoint, partial)
        except RuntimeError:
            # torch reports a write the disk refused (full: "unexpected pos ...") as a RuntimeError that has
            # lost the OS's reason. Writing the same checkpoint plainly raises that reason (an OSError, which
            # write_whole puts in words); if the plain write succeeds, the failure was torch's own: re-raise it.
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            partial.write_bytes(buffer.getvalue())
            raise

    # The caller chose the path with target train's --out (an audit's export writes to a temporary folder).
    write_whole(
        path, write=write, option="--out", lost="The model was not saved anywhere else: a rerun computes it again."
    )


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a target saved by :func:`save_checkpoint` (``weights_only=True``: no code is unpickled).

    Returns:
        the model in evaluation mode and its metadata (``meta`` plus ``arch``).
    """
    from obliviate.models import build_model

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ConfigError(
            f"target checkpoint {str(path)!r} does not exist; train one with `obliviate target train`."
        ) from err
    except Exception as err:  # torch.load fails on other files with RuntimeError, KeyError, EOFError, pickle errors
        raise ConfigError(
            f"{str(path)!r} is not a readable torch checkpoint ({err.__class__.__name__}: {_gist(err)}); point "
            "at a file written by `obliviate target train`."
        ) from err
    if not isinstance(blob, dict) or not {"arch", "state_dict"} <= set(blob):
        raise ConfigError(f"{str(path)!r} is not a target checkpoint: {_not_a_target_fix(path, blob)}")
    meta = dict(blob.get("meta", {}))
    model = build_model(
        blob["arch"], num_classes=int(meta.get("num_classes", 10)), image_size=int(meta.get("image_size", 28)), seed=0
    )
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"the weights in {str(path)!r} do not fit its architecture {blob['arch']!r} with "
            f"{meta.get('num_classes', 10)} classes and {meta.get('image_size', 28)}-pixel images "
            f"({_gist(err)}); the checkpoint is damaged or was edited. Train it again."
        ) from err
    return model.eval(), meta | {"arch": blob["arch"]}


#: Where a run's block checkpoint lies in a file store: ``<store>/runs/<run>/chains/<chain>/ckpt-<i>.pt``.
_CHAIN_CHECKPOINT = re.compile(r"^(?P<store>.*)/runs/(?P<run>[^/]+)/chains/[^/]+/ckpt-\d{4}\.pt$")


def _not_a_target_fix(path: str | os.PathLike, blob: object) -> str:
    """What the file is instead of a target, and what to run: a run's block checkpoint (``obliviate train``)
    is audited through ``target serve --run``, the README's path; another file gets the API's hint."""
    from obliviate.unlearning.chain import CHECKPOINT_FORMAT

    if not (isinstance(blob, dict) and blob.get("format") == CHECKPOINT_FORMAT):
        return (
            "expected a dict with 'arch' and 'state_dict'. Point at a file written by `obliviate target train`, "
            "or save targets with obliviate.extraction.target.save_checkpoint."
        )
    found = _CHAIN_CHECKPOINT.match(Path(path).expanduser().resolve().as_posix())
    run, store, pool = "RUN", "file://STORE", "DATASET"
    if found:
        run, store = found["run"], f"file://{found['store']}"
        with contextlib.suppress(OSError, ValueError, AttributeError):  # only to name the pool; the hint stands without
            pool = str(json.loads((Path(found["store"]) / "runs" / run / "spec.json").read_text())["dataset"])
    meta = blob.get("meta")
    block = meta.get("block_index") if isinstance(meta, dict) else None
    which = f" (M_{block})" if isinstance(block, int) else ""
    return (
        f"it is a block checkpoint{which} of an `obliviate train` run, which serves only through its run. To audit "
        f"what the run serves now, serve it over HTTP and point steal at that: `obliviate target serve --run {run} "
        f"--store {store}` (port 8000 by default), then `obliviate steal --target http://127.0.0.1:8000/predict "
        f"--pool {pool}`."
    )


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def _gist(err: BaseException, *, width: int = 160) -> str:
    """An error's first line, shortened at a word (torch's load errors run to paragraphs)."""
    first = (str(err).strip().splitlines() or [""])[0]
    return textwrap.shorten(first, width=width, placeholder=" …") or err.__class__.__name__


def open_backend(
    target: str,
    *,
    timeout_s: float = 30.0,
    retries: int = 3,
    wait_s: float = DEFAULT_TARGET_WAIT_S,
    on_wait: Callable[[str], None] | None = None,
    output: OutputMode = OutputMode.LABELS,
) -> tuple[Backend, dict]:
    """A backend for ``target``: an ``http(s)://`` URL or a checkpoint path.

    An HTTP target is checked up front: ``GET /info`` answers (with retries), and the predict URL takes a POST
    asking for ``output`` (:meth:`HttpBackend.check_endpoint`, an empty batch: no query spent), so a server that
    answers labels only refuses probabilities here, in words, before any work.

    ``timeout_s``, ``retries``, ``wait_s`` and ``on_wait`` are :class:`HttpBackend`'s.

    Returns:
        the backend and the target's metadata (checkpoint ``meta``, or the server's ``GET /info``;
        ``{}`` when the server has none).
    """
    if target.startswith(("http://", "https://")):
        backend = HttpBackend(target, timeout_s=timeout_s, retries=retries, wait_s=wait_s, on_wait=on_wait)
        info = backend.info()
        side = info.get("image_size")
        side = side if isinstance(side, int) and not isinstance(side, bool) else 28
        backend.check_endpoint(image_size=side, output=output_mode(output))
        return backend, info
    model, meta = load_checkpoint(target)
    return LocalTorchBackend(model, levels=int(meta.get("levels", 256))), meta
