"""`store check` of a store that a running `serve` writes meanwhile: what serve deletes between the check's listing and
its read is gone, not damaged.

CI's chaos test (test_chaos.py, serve killed and restarted, then `check_store` with the new serve still running)
failed with "no object at .../service/pass-claim-leases/c000000003.json": serve's cron and watcher take and release
the store's pass claim, and each release drops the claim's old pointer versions and leases (storage.lease.tidy_claim),
so a lease listed by the check was deleted before the check verified it, and the check raised instead of reporting.
Here a thread takes and releases the pass claim as serve does, on a real store, while the check runs again and again.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from flows.settle import PASS_CLAIM_KEY
from storage import ObjectStore
from storage.check import check_store
from storage.lease import release_claim, take_claim

CHECKS = 60


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_check_while_the_pass_claim_is_taken_and_released_reports_a_healthy_store(
    backend: str, tmp_path, request
) -> None:
    url = f"file://{tmp_path}/store" if backend == "file" else request.getfixturevalue("s3_url")
    store = ObjectStore(url)
    store.ensure_container()
    stop, churned, errors = threading.Event(), [0], []

    def serve_like_passes() -> None:
        try:
            while not stop.is_set():
                claim = take_claim(store, PASS_CLAIM_KEY, holder={"host": "here", "pid": 1, "holder": "a pass"})
                release_claim(store, claim)
                churned[0] += 1
        except BaseException as err:  # noqa: BLE001 -- said by the test below
            errors.append(err)

    churner = threading.Thread(target=serve_like_passes, daemon=True)
    churner.start()
    try:
        reports = []
        for _ in range(CHECKS):
            reports.append(check_store(store, min_age_s=3600))
    finally:
        stop.set()
        churner.join(timeout=60)
    assert not errors, errors
    assert churned[0] >= 10, churned  # the claim moved under the checks, many times
    unhealthy = [r.as_dict() for r in reports if not r.healthy]
    assert not unhealthy, unhealthy[:2]
    assert sum(r.pointers_checked for r in reports) > 0  # the claim's pointer was among what was checked


def _announce_live_serve(store: ObjectStore) -> None:
    """What a running serve keeps in the store (flows.unlearn): its announcement, renewed within ENDPOINT_STALE_S."""
    from flows.unlearn import ENDPOINT_KEY

    store.put_json(
        ENDPOINT_KEY, {"pid": 4242, "host": "h", "api_url": "http://127.0.0.1:4200/api", "started_at": time.time()}
    )


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_repair_with_a_young_orphan_age_beside_a_live_serve_is_refused_and_collects_nothing(
    backend: str, tmp_path, request, capsys
) -> None:
    # `--orphan-age 0` beside a running serve deleted the temporary files of its claim writes before they were linked,
    # and the writes failed ("could not write ... does not exist (any more)"): seen on file:// with repairs at age 0
    # looping beside a thread that takes and releases the pass claim as the test above does.
    from flows.cli import main
    from flows.repair import MIN_ORPHAN_AGE_BESIDE_SERVE_S, check_and_repair
    from obliviate.errors import ConfigError

    url = f"file://{tmp_path}/store" if backend == "file" else request.getfixturevalue("s3_url")
    store = ObjectStore(url)
    store.ensure_container()
    claim = take_claim(store, PASS_CLAIM_KEY, holder={"host": "here", "pid": 1, "holder": "a pass"})
    release_claim(store, claim)
    leftover = "runs/r1/.tmp-0123456789abcdef0123456789abcdef-spec.json"  # a crashed write's temporary
    if store.is_local:
        os.makedirs(os.path.dirname(store._path(leftover)), exist_ok=True)
    store._fs.pipe_file(store._path(leftover), b"{}")
    _announce_live_serve(store)

    with pytest.raises(ConfigError) as raised:
        check_and_repair(url, repair=True, min_orphan_age_s=0)
    said = str(raised.value)
    assert said.startswith(
        f"--orphan-age 0 would collect writes in flight of the live `obliviate serve` of {store.url}"
    )
    assert f"Pass --orphan-age {MIN_ORPHAN_AGE_BESIDE_SERVE_S:g} or more, or stop serve first." in said, said
    assert main(["store", "check", "--repair", "--orphan-age", "5", "--store", url]) == 2
    assert "--orphan-age 5 would collect writes in flight" in capsys.readouterr().err
    assert store._fs.exists(store._path(leftover))  # nothing collected
    # At the floor the repair runs; the young temporary is kept as an in-flight write.
    assert check_and_repair(url, repair=True, min_orphan_age_s=MIN_ORPHAN_AGE_BESIDE_SERVE_S).collected == []
    assert store._fs.exists(store._path(leftover))
    # Once serve said it stopped, age 0 is the user's to choose again: the temporary is collected.
    from flows.unlearn import ENDPOINT_KEY

    store.put_json(ENDPOINT_KEY, {**store.get_json(ENDPOINT_KEY), "stopped_at": time.time()})
    assert leftover in check_and_repair(url, repair=True, min_orphan_age_s=0).collected
    assert not store._fs.exists(store._path(leftover))
