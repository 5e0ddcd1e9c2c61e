"""One `obliviate serve` per store, also when several start at the same moment (file and S3 stores)."""

from __future__ import annotations

import threading
import time

import pytest

from flows.unlearn import ENDPOINT_KEY, SERVE_CLAIM_KEY, SERVE_START_ALLOWANCE_S, claim_serving
from obliviate.errors import ConfigError
from storage import ObjectStore


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "file":
        url = f"file://{tmp_path}/store"
    else:
        request.getfixturevalue("moto_endpoint")
        url = f"s3://claim-{int(time.time_ns())}/store"
    store = ObjectStore(url)
    store.ensure_container()
    return store


def test_of_serves_starting_together_exactly_one_wins(store: ObjectStore) -> None:
    # Check-then-announce let two serves started together both run, each overwriting the other's announcement.
    start, outcomes = threading.Barrier(6), []

    def serve(pid: int) -> None:
        start.wait()
        try:
            claim_serving(store, pid=pid, host="h")
            outcomes.append("won")
        except ConfigError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=serve, args=(pid,)) for pid in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes.count("won") == 1, outcomes
    assert all("one serve per store" in outcome for outcome in outcomes if outcome != "won")


def test_a_claim_is_taken_over_once_its_serve_is_gone(store: ObjectStore) -> None:
    claim_serving(store, pid=11, host="h")
    with pytest.raises(ConfigError, match="being claimed by another `obliviate serve` that is starting"):
        claim_serving(store, pid=12, host="h")  # 11 has not announced itself yet: it is starting
    # 11 announced itself, then stopped: its claim is free.
    store.put_json(ENDPOINT_KEY, {"pid": 11, "api_url": None, "started_at": time.time(), "stopped_at": time.time()})
    claim_serving(store, pid=12, host="h")
    # 12 died while starting, long ago: it never announced itself, so after the allowance its claim is free too.
    current = store.read_pointer(SERVE_CLAIM_KEY)
    assert current is not None and current.target["pid"] == 12
    old = {"pid": 12, "host": "h", "claimed_at": time.time() - SERVE_START_ALLOWANCE_S - 1}
    store.swap_pointer(SERVE_CLAIM_KEY, old, expected_version=current.version)
    claim_serving(store, pid=13, host="h")
    assert store.read_pointer(SERVE_CLAIM_KEY).target["pid"] == 13
