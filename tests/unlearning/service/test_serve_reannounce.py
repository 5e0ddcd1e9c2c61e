"""A live ``obliviate serve`` whose store lost its objects claims and announces itself again (probe 113, finding 2).

serve wrote its claim (``service/serve-claim``) and announcement (``service/endpoint.json``) once, at its start, and
renewed only ``service/heartbeat.json``. Once the store lost them (the S3 server restarted empty, the bucket made
again by a later ``train``), ``forget`` said that no serve announced itself while this one still worked, and a second
serve on the same store was accepted; when that one stopped, ``forget`` said the store's serve had stopped. Now the
heartbeat writes the claim and the announcement back, and a serve that finds another live serve holding its store
says so and stops (exit 2), so never two serves work one store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from flows.unlearn import ENDPOINT_KEY, HEARTBEAT_KEY, SERVE_CLAIM_KEY, claim_serving, renew_serving, served_endpoint
from obliviate.errors import ConfigError
from storage import ObjectStore
from tests.unlearning.service.conftest import REPO

REANNOUNCED = "obliviate serve: the store's serve announcement was missing (store reset?); announced again"


def _announce(store: ObjectStore, *, pid: int, host: str = "h") -> dict:
    """What serve writes at its start: its claim, its heartbeat and its announcement."""
    claim_serving(store, pid=pid, host=host)
    announcement = {"api_url": f"http://127.0.0.1:9/api/{pid}", "pid": pid, "started_at": time.time()}
    store.put_json(HEARTBEAT_KEY, {"pid": pid, "heartbeat_at": time.time()})
    store.put_json(ENDPOINT_KEY, announcement)
    return announcement


def _lose_service_objects(store: ObjectStore) -> None:
    """The store's ``service/`` folder gone, as after an S3 server restarted empty (the runs are not needed here)."""
    store._fs.rm(store._path("service"), recursive=True)
    assert not store.exists(ENDPOINT_KEY) and store.read_pointer(SERVE_CLAIM_KEY) is None


def test_a_lost_claim_and_announcement_are_written_back(any_store: str) -> None:
    store = ObjectStore(any_store)
    announcement = _announce(store, pid=101)
    assert renew_serving(store, announcement=announcement, host="h") == ("kept", "")

    _lose_service_objects(store)
    assert served_endpoint(store)[0] is None
    outcome, line = renew_serving(store, announcement=announcement, host="h")
    assert (outcome, line) == ("restored", REANNOUNCED.removeprefix("obliviate serve: "))
    assert served_endpoint(store)[0] == announcement["api_url"]  # forget finds serve again
    claim = store.read_pointer(SERVE_CLAIM_KEY)
    assert claim is not None and (claim.target["pid"], claim.target["host"]) == (101, "h")
    with pytest.raises(ConfigError, match="already served by a live `obliviate serve`"):
        claim_serving(store, pid=102, host="h")  # a second serve is refused again
    assert renew_serving(store, announcement=announcement, host="h") == ("kept", "")


def test_a_serve_whose_store_another_live_serve_claimed_learns_it_lost_the_store(any_store: str) -> None:
    store = ObjectStore(any_store)
    first = _announce(store, pid=201)
    _lose_service_objects(store)
    second = _announce(store, pid=202)  # claimed the emptied store before the first serve's next heartbeat
    outcome, line = renew_serving(store, announcement=first, host="h")
    assert outcome == "lost", line
    assert "held by another `obliviate serve` now (pid 202 on h" in line and "one serve per store" in line, line
    # the first serve wrote nothing over the second's
    assert store.get_json(ENDPOINT_KEY) == second
    assert store.read_pointer(SERVE_CLAIM_KEY).target["pid"] == 202
    assert renew_serving(store, announcement=second, host="h") == ("kept", "")


def test_a_claim_left_from_before_the_serve_started_is_taken_back(any_store: str) -> None:
    # serve_deployments run from Python (no claim_serving), on a store an earlier serve claimed and left
    store = ObjectStore(any_store)
    claim_serving(store, pid=301, host="h")
    time.sleep(0.01)
    announcement = {"api_url": "http://127.0.0.1:9/api", "pid": 302, "started_at": time.time()}
    store.put_json(ENDPOINT_KEY, announcement)
    assert renew_serving(store, announcement=announcement, host="h") == ("kept", "")
    assert store.read_pointer(SERVE_CLAIM_KEY).target["pid"] == 302


def _empty_and_recreate_bucket(url: str) -> None:
    """What the probe saw: the S3 server restarted empty, and a later ``train`` made the bucket again."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    fs.rm(bucket, recursive=True)
    assert not fs.exists(bucket)
    ObjectStore(url).ensure_container()


def _wait_for(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return bool(condition())


@pytest.mark.slow
def test_a_live_serve_comes_back_after_its_store_was_emptied_and_a_second_is_refused(s3_url, serve, prefect_api_url):
    store = ObjectStore(s3_url)
    first = serve(s3_url, "--reconcile-cron", "0 0 1 1 *", "--workers", "1")
    api_url = store.get_json(ENDPOINT_KEY)["api_url"]

    _empty_and_recreate_bucket(s3_url)
    assert served_endpoint(store)[0] is None
    # serve renews every 5 s: within a heartbeat or two (and slack for a loaded machine) it is found again
    found = _wait_for(lambda: served_endpoint(store)[0] == api_url, timeout=40)
    log = first.log_path.read_text()
    assert found, (served_endpoint(store), log[-3000:])
    assert REANNOUNCED in log, log[-3000:]
    assert store.get_json(ENDPOINT_KEY)["pid"] == first.pid

    # forget sends its request to the live serve, which settles it
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url}
    forget = [sys.executable, "-m", "flows.cli", "forget", "--store", s3_url, "--data", "digits", "--ids", "3"]
    done = subprocess.run(
        [*forget, "--request-id", "after-reset", "--wait", "120"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    said = done.stdout + done.stderr
    assert "announced itself" not in said and "stopped" not in said, said
    assert f"announced to {api_url}" in said, said
    # settled by serve at once (rejected: the emptied store has no run of the dataset), not left for "the next serve"
    assert done.returncode == 3 and "request after-reset: rejected" in said, said + first.log_path.read_text()[-3000:]

    # one serve per store: a second one is refused again
    second = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve", "--store", s3_url, "--audit-cron", "off"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert second.returncode == 2, second.stdout + second.stderr
    assert "already served by a live `obliviate serve`" in second.stderr, second.stderr


@pytest.mark.slow
def test_a_serve_that_finds_another_live_serve_on_its_store_stops(s3_url, serve):
    store = ObjectStore(s3_url)
    first = serve(s3_url, "--reconcile-cron", "0 0 1 1 *", "--workers", "1")
    # The store emptied while the first serve could not renew anything (stopped by SIGSTOP), and a second serve
    # claimed it meanwhile: when the first goes on, it finds the second holding the store.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        _empty_and_recreate_bucket(s3_url)
        second = serve(s3_url, "--reconcile-cron", "0 0 1 1 *", "--workers", "1", timeout=180)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    try:
        first.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the first serve still runs beside the second:\n{first.log_path.read_text()[-3000:]}")
    log = first.log_path.read_text()
    assert first.returncode == 2, log[-3000:]
    assert f"held by another `obliviate serve` now (pid {second.pid} on {socket.gethostname()}" in log, log[-3000:]
    assert "is served by another `obliviate serve` now, not by this one" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    # the second serve still serves the store, and the first's stop withdrew nothing of it
    assert second.poll() is None, second.log_path.read_text()[-3000:]
    assert store.get_json(ENDPOINT_KEY)["pid"] == second.pid
    assert served_endpoint(store)[0] is not None
    assert store.read_pointer(SERVE_CLAIM_KEY).target["pid"] == second.pid
