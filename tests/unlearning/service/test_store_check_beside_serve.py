"""`store check` of a store that a running `serve` writes meanwhile: what serve deletes between the check's listing and
its read is gone, not damaged.

CI's chaos test (test_chaos.py, serve killed and restarted, then `check_store` with the new serve still running)
failed with "no object at .../service/pass-claim-leases/c000000003.json": serve's cron and watcher take and release
the store's pass claim, and each release drops the claim's old pointer versions and leases (storage.lease.tidy_claim),
so a lease listed by the check was deleted before the check verified it, and the check raised instead of reporting.
Here a thread takes and releases the pass claim as serve does, on a real store, while the check runs again and again.
"""

from __future__ import annotations

import threading

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
