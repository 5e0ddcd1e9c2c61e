"""``train``'s progress poll met an outage without retrying: past the known-outage limit its stall
notice said the call fails "in 4-10 s" while the workers went on retrying for up to 300 s. The poll
is retried as the workers retry now, so the notice names the run's real deadline; a worker's result
that is ready meanwhile is still taken at once.

The outage is real: a TCP proxy in front of the moto server refuses every connection."""

from __future__ import annotations

import logging
import re
import time
import uuid

import pytest

from flows.train import WORKER_RETRY_POLICY, _results_with_progress, run_spec
from storage import ObjectStore, retry

IN_SECONDS = re.compile(r"has not answered for \d+ s; still waiting and retrying until .* \(in (\d+) s\)")
TINY = {
    "data": "digits",
    "model": "lenet5",
    "blocks": 2,
    "epochs": 1,
    "batch_size": 8,
    "learning_rate": 0.003,
    "schedule": "constant",
    "seed": 0,
    "train_size": 800,
    "heldout_size": 200,
    "split_seed": 0,
}


class ResultAfter:
    """A stand-in for Ray's ActorPool whose one worker hands over its result (or error) after ``ready_s``."""

    def __init__(self, ready_s: float, result: object) -> None:
        self.ready_at = time.monotonic() + ready_s
        self.result = result
        self.taken = False

    def has_next(self) -> bool:
        return not self.taken

    def get_next(self, timeout: float) -> object:
        if time.monotonic() < self.ready_at:
            time.sleep(min(timeout, max(0.0, self.ready_at - time.monotonic())))
            if time.monotonic() < self.ready_at:
                raise TimeoutError
        self.taken = True
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


@pytest.fixture
def unreachable_store(moto_endpoint, flaky_s3, monkeypatch):
    bucket = f"stall-{uuid.uuid4().hex[:8]}"
    ObjectStore(f"s3://{bucket}/p").ensure_container()
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky_s3.endpoint)
    store = ObjectStore(f"s3://{bucket}/p")  # reads its endpoint here: the proxy
    store._fs.retries = 1  # each refused call fails at once instead of after s3fs's back-off (the test's pace)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setattr(retry, "STALL_NOTICE_AFTER_S", 1.0)
    seen: list[str] = []
    previous = retry.set_stall_reporter(seen.append)
    flaky_s3.down()
    yield store, seen
    flaky_s3.up()
    retry.set_stall_reporter(previous)


def test_the_stall_notice_of_the_progress_poll_names_the_workers_deadline(unreachable_store):
    store, seen = unreachable_store
    specs = [run_spec(run_id="stall", **TINY)]
    began = time.monotonic()
    results = _results_with_progress(
        ResultAfter(4.0, {"run_id": "stall"}), store, specs, logger=logging.getLogger("stall")
    )
    took = time.monotonic() - began
    assert results == [{"run_id": "stall"}]
    assert took < 20, took  # the result was not held back by the outage
    left = [int(m.group(1)) for m in map(IN_SECONDS.search, seen) if m]
    assert left, seen
    assert min(left) > WORKER_RETRY_POLICY.deadline_s - 30, seen


def test_a_worker_error_during_the_outage_is_raised_as_itself(unreachable_store):
    from obliviate.errors import ConfigError

    store, _ = unreachable_store
    specs = [run_spec(run_id="stall", **TINY)]
    with pytest.raises(ConfigError, match="the worker's own error"):
        _results_with_progress(
            ResultAfter(3.0, ConfigError("the worker's own error")), store, specs, logger=logging.getLogger("stall")
        )
