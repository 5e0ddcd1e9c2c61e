"""The HTTP target adapter against a real model server on 127.0.0.1 (started by each test)."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest

from flows.model_server import PredictHandler, TargetServer
from obliviate.extraction.target import (
    BudgetExceeded,
    HttpBackend,
    LocalTorchBackend,
    OutputMode,
    Target,
    TargetRequestError,
    TargetUnavailable,
    encode_images,
)


class FailingFirst(PredictHandler):
    """Answers HTTP 503 to the first ``failures`` predictions, then serves normally."""

    failures = 2
    seen = 0
    lock = threading.Lock()

    def do_POST(self):
        with FailingFirst.lock:
            FailingFirst.seen += 1
            fail = FailingFirst.seen <= FailingFirst.failures
        if fail:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_json(503, {"error": "warming up"})
            return
        super().do_POST()


class Slow(PredictHandler):
    """Sleeps past the client's timeout before answering."""

    delay_s = 1.5

    def do_POST(self):
        time.sleep(Slow.delay_s)
        super().do_POST()


def test_http_target_answers_like_the_local_model(target_model, pool_images):
    with TargetServer(target_model, info={"arch": "lenet5", "train_indices": [3, 4]}) as server:
        assert server.url.startswith("http://127.0.0.1:")
        backend = HttpBackend(server.url, timeout_s=10, retries=0)
        remote = Target(backend, budget=30)
        local = Target(LocalTorchBackend(target_model), budget=30)
        np.testing.assert_array_equal(remote.query(pool_images[:25]), local.query(pool_images[:25]))
        assert remote.used == 25
        with pytest.raises(BudgetExceeded):
            remote.query(pool_images[:6])
        assert server.requests == 1  # the refused batch never reached the server
        assert backend.info()["train_indices"] == [3, 4]


def test_label_only_answers_carry_no_probabilities_on_the_wire(target_model, pool_images):
    with TargetServer(target_model, allow_probabilities=False) as server:
        body = json.dumps(encode_images(pool_images[:4]) | {"output": "labels"}).encode()
        request = urllib.request.Request(server.url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            reply = json.loads(resp.read())
        assert set(reply) == {"labels"}
        assert all(isinstance(v, int) for v in reply["labels"])
        # Asking a label-only server for probabilities is a client error (403): raised, never retried.
        backend = HttpBackend(server.url, timeout_s=10, retries=3, backoff_s=0.01)
        with pytest.raises(TargetRequestError, match="HTTP 403"):
            Target(backend, budget=10, output="probabilities").query(pool_images[:2])
        assert backend.attempts == 1


def test_malformed_requests_are_4xx_and_not_retried(target_model, pool_images):
    with TargetServer(target_model) as server:
        backend = HttpBackend(server.url.replace("/predict", "/nowhere"), timeout_s=10, retries=3, backoff_s=0.01)
        with pytest.raises(TargetRequestError, match="HTTP 404"):
            Target(backend, budget=10).query(pool_images[:2])
        assert backend.attempts == 1
        bad = urllib.request.Request(server.url, data=b'{"shape": [1, 2, 2], "data": "!!"}')
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad, timeout=10)
        assert info.value.code == 400


def test_server_errors_are_retried_then_succeed(target_model, pool_images):
    FailingFirst.seen, FailingFirst.failures = 0, 2
    with TargetServer(target_model, handler=FailingFirst) as server:
        backend = HttpBackend(server.url, timeout_s=10, retries=3, backoff_s=0.01)
        target = Target(backend, budget=10)
        labels = target.query(pool_images[:5])
        assert backend.attempts == 3
        np.testing.assert_array_equal(
            labels, Target(LocalTorchBackend(target_model), budget=None).query(pool_images[:5])
        )
        assert target.used == 5


def test_persistent_server_errors_raise_after_the_retries(target_model, pool_images):
    FailingFirst.seen, FailingFirst.failures = 0, 100
    with TargetServer(target_model, handler=FailingFirst) as server:
        backend = HttpBackend(server.url, timeout_s=10, retries=2, backoff_s=0.01, wait_s=0)
        target = Target(backend, budget=10)
        with pytest.raises(TargetUnavailable, match=r"failed 3 times \(HTTP 503 \(x3\)\)"):
            target.query(pool_images[:5])
        assert backend.attempts == 3
        assert target.used == 0  # nothing answered, nothing counted


def test_timeouts_are_retried_then_raised(target_model, pool_images):
    Slow.delay_s = 1.5
    with TargetServer(target_model, handler=Slow) as server:
        backend = HttpBackend(server.url, timeout_s=0.3, retries=1, backoff_s=0.01)
        start = time.perf_counter()
        with pytest.raises(TargetUnavailable, match="timeout"):
            Target(backend, budget=10).query(pool_images[:2])
        assert backend.attempts == 2
        assert time.perf_counter() - start < 5


def test_connection_refused_is_transient(pool_images):
    # Bind a port, then close it: nothing listens there.
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    backend = HttpBackend(f"http://127.0.0.1:{port}/predict", timeout_s=2, retries=2, backoff_s=0.01, wait_s=0)
    with pytest.raises(TargetUnavailable, match="connection error"):
        Target(backend, budget=10).query(pool_images[:1])
    assert backend.attempts == 3


def test_info_of_a_server_that_is_gone_says_so_and_one_without_info_declares_nothing(target_model):
    """A stopped server read as "declares nothing" ({}): the audit then started and failed at its first query."""
    with TargetServer(target_model) as server:
        url = server.url
        assert HttpBackend(url.rsplit("/", 1)[0] + "/elsewhere/predict", timeout_s=5, retries=0).info() == {}  # 404
    with pytest.raises(TargetUnavailable, match=r"no server answers at http://127\.0\.0\.1:\d+/predict \("):
        HttpBackend(url, timeout_s=5, retries=0, wait_s=0).info()


def raw_post(url: str, body: bytes, *, headers: dict | None = None, length: bool = True, timeout: float = 10):
    """POST ``body`` with exactly the headers given (``length``: add a true Content-Length); (status, JSON reply)."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.putrequest("POST", parts.path)
        for key, value in ({"Content-Length": str(len(body))} if length else {}).items() | (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _images(shape: list, data: bytes | None = None, **extra) -> bytes:
    import base64

    raw = bytes(int(np.prod(shape))) if data is None else data
    return json.dumps({"shape": shape, "dtype": "uint8", "data": base64.b64encode(raw).decode(), **extra}).encode()


def test_requests_the_model_cannot_take_get_a_400_in_words_and_an_empty_batch_no_labels(target_model):
    """Wrong image size, axis order or an empty batch dropped the connection (a RuntimeError in the model thread)."""
    with TargetServer(target_model, info={"image_size": 28}) as server:
        code, reply = raw_post(server.url, _images([1, 8, 8]))
        assert code == 400 and "the target takes 28x28 images; got 8x8" in reply["error"]
        code, reply = raw_post(server.url, _images([1, 28, 28]).replace(b"[1, 28, 28]", b"[28, 28, 1]"))
        assert code == 400 and "got 28x1" in reply["error"] and "(n, H, W)" in reply["error"]
        assert raw_post(server.url, _images([0, 28, 28])) == (200, {"labels": []})
        code, reply = raw_post(server.url, b"nope")
        assert code == 400 and "must be JSON like" in reply["error"] and "Expecting value" in reply["error"]
        code, reply = raw_post(server.url, b"[1, 2]")
        assert code == 400 and "must be JSON like" in reply["error"]
        code, reply = raw_post(server.url, _images([1, 28, 28], output="logits"))
        assert code == 400 and "'labels' or 'probabilities'" in reply["error"] and "'logits'" in reply["error"]
        code, reply = raw_post(server.url, _images([1, 28, 28]).replace(b"[1, 28, 28]", b"[1.7, 28, 28]"))
        assert code == 400 and "whole numbers" in reply["error"] and "1.7" in reply["error"]
        code, reply = raw_post(server.url, _images([1, 28, 28]).replace(b"[1, 28, 28]", b"[-1, -28, 28]"))
        assert code == 400 and "whole numbers" in reply["error"]
        assert server.requests == 0  # nothing was predicted
        code, reply = raw_post(server.url, _images([2, 28, 28]))  # and it still serves
        assert code == 200 and len(reply["labels"]) == 2


def test_an_empty_batch_gets_probabilities_of_shape_0_by_classes_like_a_full_one(target_model, pool_images):
    """It answered shape (0,): JSON's [] has no row length, so np.concatenate with a (k, C) batch failed."""
    empty = np.zeros((0, 28, 28), np.uint8)
    with TargetServer(target_model, info={"image_size": 28, "num_classes": 10}) as server:
        backend = HttpBackend(server.url, timeout_s=10, retries=0)  # C learned from GET /info, as open_backend asks
        full = backend.predict(pool_images[:3], output=OutputMode.PROBABILITIES)
        answer = backend.predict(empty, output=OutputMode.PROBABILITIES)
        assert full.shape == (3, 10) and answer.shape == (0, 10) and answer.dtype == full.dtype == np.float32
        assert np.concatenate([full, answer]).shape == (3, 10)
        local = LocalTorchBackend(target_model).predict(empty, output=OutputMode.PROBABILITIES)  # it raised ValueError
        assert local.shape == answer.shape and local.dtype == answer.dtype
        given = HttpBackend(server.url, timeout_s=10, retries=0, num_classes=10)
        assert given.predict(empty, output=OutputMode.PROBABILITIES).shape == (0, 10)
        assert backend.predict(empty, output=OutputMode.LABELS).shape == (0,)  # labels were right already
        assert server.requests == 1  # only the full batch reached the model
    with TargetServer(target_model) as server:  # declares no classes: C is unknown, said in words, not guessed
        anonymous = HttpBackend(server.url, timeout_s=10, retries=0)
        with pytest.raises(TargetRequestError, match=r"declares no num_classes.*HttpBackend\(num_classes=C\)"):
            anonymous.predict(empty, output=OutputMode.PROBABILITIES)


class Broken:
    """A backend with a bug: every prediction raises."""

    def predict(self, images, *, output):
        raise RuntimeError("a bug in the model")


def test_an_unexpected_failure_in_a_handler_is_a_500_with_json_not_a_dropped_connection():
    with TargetServer(backend=Broken()) as server:
        code, reply = raw_post(server.url, _images([1, 28, 28]))
        assert code == 500 and "RuntimeError: a bug in the model" in reply["error"]


class Answers(PredictHandler):
    """Answers every prediction HTTP 200 with ``Answers.body`` (what a broken or hostile endpoint might send)."""

    body = b""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(Answers.body)))
        self.end_headers()
        self.wfile.write(Answers.body)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"<html>hi</html>", r"answered HTTP 200 with a body that is not JSON \(.*\): b?'?<html>hi</html>"),
        (b"[1, 2]", r"answered a JSON list, not an object"),
        (b'{"labels": [1.5, 2.5]}', r"labels must be whole numbers; got \[1\.5, 2\.5\]"),
        (b'{"labels": [-1, 3]}', r"labels must be class numbers 0\.\.9 .*; got -1"),
        (b'{"labels": [10, 3]}', r"labels must be class numbers 0\.\.9 \(its GET /info declares 10 classes\); got 10"),
        (b'{"labels": [3]}', r"answered 1 label for 2 images"),
    ],
)
def test_a_200_answer_with_bad_content_is_a_request_error_naming_what_came_back(target_model, pool_images, body, words):
    """`steal` crashed on such answers (IndexError in training, JSONDecodeError) or cast 1.5 to 1 silently."""
    from obliviate.extraction.target import open_backend

    Answers.body = body
    with TargetServer(target_model, handler=Answers, info={"num_classes": 10}) as server:
        backend, _ = open_backend(server.url, timeout_s=10, retries=2)
        with pytest.raises(TargetRequestError, match=words) as info:
            Target(backend, budget=10).query(pool_images[:2])
        assert "leaking" not in str(info.value)
        assert backend.attempts == 1  # a bad answer is not transient: not retried


def test_malformed_target_urls_are_refused_with_the_rule_and_a_url_without_path_is_told_to_name_predict(
    target_model, capsys
):
    """`http://[bad/predict` was a ValueError traceback; `http://host:port` (no path) claimed no server answers."""
    from flows.cli import main
    from obliviate.errors import ConfigError

    for url, words in [
        ("http://[bad/predict", r"'http://\[bad/predict' is not a valid URL \(Invalid IPv6 URL\)"),
        ("http://127.0.0.1:99999/predict", r"is not a valid URL \(Port out of range"),
        ("http:///predict", r"names no host"),
    ]:
        with pytest.raises(ConfigError, match=words):
            HttpBackend(url)
    with TargetServer(target_model) as server:
        root = server.url.removesuffix("/predict")
        for url in (root, root + "/"):
            with pytest.raises(ConfigError, match=rf"must name the predict endpoint, e\.g\. {root}/predict; got"):
                HttpBackend(url)
        assert main(["steal", "--target", root, "--pool", "digits"]) == 2
        err = capsys.readouterr().err
        assert f"must name the predict endpoint, e.g. {root}/predict" in err and "no server answers" not in err
    assert main(["steal", "--target", "http://[bad/predict", "--pool", "digits"]) == 2
    err = capsys.readouterr().err
    assert "is not a valid URL" in err and "Traceback" not in err


def test_a_briefly_restarting_server_does_not_fail_the_info_request_or_an_audit_worker(target_model, pool_images):
    """GET /info had no retry: every Ray cell's AuditWorker reads it, so a server restarting killed the whole audit."""
    from actors.extraction import AuditWorker
    from obliviate.extraction.selectors import Pool

    first = TargetServer(target_model, info={"num_classes": 10, "train_indices": [1]}).start()
    url, port = first.url, first.httpd.server_address[1]
    first.stop()
    restarted: list[TargetServer] = []

    def restart() -> None:
        time.sleep(0.3)
        restarted.append(TargetServer(target_model, port=port, info={"num_classes": 10, "train_indices": [1]}).start())

    try:
        thread = threading.Thread(target=restart)
        thread.start()
        backend = HttpBackend(url, timeout_s=5, retries=4, backoff_s=0.1)  # waits 0.1, 0.2, 0.4, 0.8 s
        assert backend.info()["train_indices"] == [1]
        thread.join()
        restarted.pop().stop()
        thread = threading.Thread(target=restart)
        thread.start()
        worker = AuditWorker(
            target=url,
            pool=Pool(pool_images[:10]),
            test_images=pool_images[10:12],
            test_labels=np.zeros(2, np.int64),
            oracle_test_labels=np.zeros(2, np.int64),
            timeout_s=5,
            retries=4,
        )
        assert worker.meta["num_classes"] == 10
        thread.join()
    finally:
        for server in restarted:
            server.stop()
    # Retries end: a server that stays down is still reported as such, after them.
    backend = HttpBackend(url, timeout_s=5, retries=1, backoff_s=0.01, wait_s=0)
    with pytest.raises(TargetUnavailable, match=r"no server answers at http://127\.0\.0\.1:\d+/predict \(.*2 attempts"):
        backend.info()


def test_a_body_without_a_sane_length_or_over_the_cap_is_refused_at_once(target_model):
    """Content-Length -1 or past the body hung a server thread until the client gave up; 10 GB was accepted."""
    body = _images([1, 28, 28])
    with TargetServer(target_model, read_timeout_s=0.5) as server:
        start = time.perf_counter()
        code, reply = raw_post(server.url, body, headers={"Content-Length": "-1"}, length=False, timeout=5)
        assert code == 400 and "Content-Length must be a whole number of bytes >= 0; got '-1'" in reply["error"]
        code, reply = raw_post(server.url, body, headers={"Content-Length": "lots"}, length=False, timeout=5)
        assert code == 400 and "got 'lots'" in reply["error"]
        code, reply = raw_post(server.url, body, length=False, timeout=5)
        assert code == 411 and "needs a Content-Length header" in reply["error"]
        code, reply = raw_post(server.url, body, headers={"Content-Length": str(10**10)}, length=False, timeout=5)
        assert code == 413 and "at most 67108864 bytes (64 MiB)" in reply["error"] and "10000000000" in reply["error"]
        assert time.perf_counter() - start < 3
        # Announced more than it sends: answered when the body stops arriving, not when the client gives up.
        code, reply = raw_post(server.url, body, headers={"Content-Length": str(len(body) + 100)}, length=False)
        assert code == 408 and f"announced {len(body) + 100} bytes" in reply["error"]
        assert time.perf_counter() - start < 6
        code, reply = raw_post(server.url, body)  # and it still serves
        assert code == 200 and len(reply["labels"]) == 1
    with TargetServer(target_model, max_body_bytes=1000) as server:
        code, reply = raw_post(server.url, body, timeout=5)
        assert code == 413 and "at most 1000 bytes" in reply["error"]


def test_a_wrong_predict_path_is_refused_up_front_by_a_probe_that_costs_no_query(target_model, pool_images, capsys):
    """A 404 on the predict path surfaced only inside the flow, 15-20 s after Prefect and Ray had started."""
    from flows.cli import main
    from obliviate.extraction.target import open_backend

    with TargetServer(target_model, info={"image_size": 28, "num_classes": 10}) as server:
        wrong = server.url.replace("/predict", "/nope")
        with pytest.raises(
            TargetRequestError, match=r"endpoint .*/nope answered HTTP 404 .*e\.g\. http://127.*/predict"
        ):
            open_backend(wrong, timeout_s=5, retries=0)
        start = time.perf_counter()
        assert main(["steal", "--target", wrong, "--pool", "digits"]) == 2
        err = capsys.readouterr().err
        assert "answered HTTP 404" in err and "Prefect API" not in err and time.perf_counter() - start < 15
        backend, _ = open_backend(server.url, timeout_s=5, retries=0)
        assert backend.attempts == 0 and server.requests == 0  # the probe is no prediction and no query
        target = Target(backend, budget=2)
        assert len(target.query(pool_images[:2])) == 2 and target.used == 2


def test_the_retry_message_names_the_command_line_options(target_model, pool_images):
    """It said 'raise timeout_s/retries', names the command line does not have (it has --timeout and --retries)."""
    FailingFirst.seen, FailingFirst.failures = 0, 100
    with TargetServer(target_model, handler=FailingFirst) as server:
        backend = HttpBackend(server.url, timeout_s=10, retries=0, wait_s=0)
        with pytest.raises(TargetUnavailable, match=r"raise --timeout or --retries \(timeout_s, retries in the API\)"):
            Target(backend, budget=10).query(pool_images[:1])


def _free_port() -> int:
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def test_a_target_down_past_the_retries_but_back_within_the_wait_answers_the_batch_once(
    target_model, pool_images, monkeypatch
):
    """A target restarting for more than ~1.4 s (retries 0.2+0.4+0.8 s) ended the audit and lost its finished cells."""
    import obliviate.extraction.target as target_module

    monkeypatch.setattr(target_module, "WAIT_NOTICE_AFTER_S", 0.5)
    first = TargetServer(target_model, info={"num_classes": 10}).start()
    url, port = first.url, first.httpd.server_address[1]
    first.stop()  # the target goes down
    restarted: list[TargetServer] = []

    def restart() -> None:
        time.sleep(2.0)  # longer than the retries' 1.4 s
        restarted.append(TargetServer(target_model, port=port, info={"num_classes": 10}).start())

    lines: list[str] = []
    backend = HttpBackend(url, timeout_s=5, retries=3, backoff_s=0.2, wait_s=30, on_wait=lines.append)
    target = Target(backend, budget=10)
    thread = threading.Thread(target=restart)
    thread.start()
    try:
        labels = target.query(pool_images[:5])
        thread.join()
        np.testing.assert_array_equal(
            labels, Target(LocalTorchBackend(target_model), budget=None).query(pool_images[:5])
        )
        assert target.used == 5 and len(target.log) == 1  # the batch sent again is one query batch, counted once
        assert restarted[0].requests == 1 and backend.attempts > 4
        assert re.fullmatch(
            rf"target {re.escape(url)} has not answered for \d+ s; retrying until \d\d:\d\d:\d\d UTC \(--target-wait\)",
            lines[0],
        ), lines
        assert re.fullmatch(rf"target {re.escape(url)} answers again, after \d+ s without an answer", lines[-1]), lines
        assert len(lines) == 2  # said once while waiting (the next would come 30 s on), once when back
    finally:
        thread.join()
        for server in restarted:
            server.stop()


def test_a_target_down_past_the_wait_fails_naming_the_wait_and_the_endpoint(pool_images):
    url = f"http://127.0.0.1:{_free_port()}/predict"
    backend = HttpBackend(url, timeout_s=2, retries=1, backoff_s=0.1, wait_s=1.5)
    target = Target(backend, budget=10)
    start = time.perf_counter()
    with pytest.raises(TargetUnavailable) as failed:
        target.query(pool_images[:2])
    took = time.perf_counter() - start
    assert 1.5 <= took < 4, took
    said = str(failed.value)
    assert re.match(
        rf"endpoint {re.escape(url)} has not answered for \d s \(connection error: .*\(x\d+\); \d+ attempts\)", said
    )
    assert "retried for --target-wait 1.5 s (wait_s in the API). Check that the target's server is running" in said
    assert "give --target-wait more seconds" in said
    assert backend.attempts > 2 and target.used == 0
    with pytest.raises(
        TargetUnavailable, match=rf"no server answers at {re.escape(url)} \(.*retried for --target-wait"
    ):
        HttpBackend(url, timeout_s=2, retries=0, backoff_s=0.1, wait_s=0.5).info()


def test_a_target_that_accepts_but_never_answers_is_said_while_waited_for_and_the_server_is_to_be_checked(
    pool_images, monkeypatch
):
    """Silent for 127 s, then 'failed 4 times (timeout ...) ... raise --timeout or --retries': both only made it longer."""
    import socket

    import obliviate.extraction.target as target_module

    monkeypatch.setattr(target_module, "WAIT_NOTICE_AFTER_S", 0.4)
    monkeypatch.setattr(target_module, "WAIT_NOTICE_EVERY_S", 0.5)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_read_but_never_answer() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(0.1)
            with contextlib.suppress(OSError):
                conn.recv(65536)
            held.append(conn)

    thread = threading.Thread(target=accept_and_read_but_never_answer, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/predict"
    lines: list[str] = []
    try:
        backend = HttpBackend(url, timeout_s=0.5, retries=2, backoff_s=0.05, wait_s=60, on_wait=lines.append)
        start = time.perf_counter()
        with pytest.raises(TargetUnavailable) as failed:
            backend.info()
        took = time.perf_counter() - start
        with pytest.raises(TargetUnavailable) as failed_predict:
            Target(backend, budget=10).query(pool_images[:2])
    finally:
        stop.set()
        thread.join()
        listener.close()
        for conn in held:
            conn.close()
    assert took < 5, took  # timeouts are retried --retries times: the window is for a target that cannot be reached
    for said in (str(failed.value), str(failed_predict.value)):
        assert "failed 3 times (timeout after 0.5s (x3)" in said, said
        assert f"the server at 127.0.0.1:{port} accepts connections but answers none of them" in said, said
        assert "up but not answering" in said and "Check the server" in said, said
        assert "--timeout" not in said and "--retries" not in said, said
    assert lines and re.fullmatch(
        rf"target {re.escape(url)} has not answered for \d+ s; retrying until \d\d:\d\d:\d\d UTC "
        r"\(--timeout, --retries\)",
        lines[0],
    ), lines
    assert not any("answers again" in line for line in lines), lines
