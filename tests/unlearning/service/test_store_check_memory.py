"""`store check` memory (fast; a local store, no training): the check reads the ledger one request at a
time. It held every request with its details (each done request's audit of every run) to learn which
requests are open: 1.34 GB peak RSS on a store of ~5,300 requests."""

from __future__ import annotations

import tracemalloc

from storage import ObjectStore
from storage.check import check_store, prune_versions
from storage.ledger import CLAIMED, DONE, PENDING, DeletionLedger

REQUESTS = 40
AUDIT_CHARS = 250_000  # one done request's details: about 10 MB for the whole ledger


def _ledger_with_big_audits(store_url: str) -> ObjectStore:
    store = ObjectStore(store_url)
    ledger = DeletionLedger(store)
    for i in range(REQUESTS):
        request_id = f"req-{i:03d}"
        ledger.append(request_id=request_id, ids=[i], dataset="digits", reason=None)
        if i == REQUESTS - 1:  # the newest stays open
            ledger.transition(request_id, status=CLAIMED, details={"holder": "h"}, allowed_from=(PENDING,))
            continue
        ledger.transition(request_id, status=DONE, details={"audit": "x" * AUDIT_CHARS}, allowed_from=(PENDING,))
    return store


def _peak_bytes(call) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_store_check_holds_one_request_of_the_ledger_at_a_time(store_url):
    store = _ledger_with_big_audits(store_url)
    held = REQUESTS * AUDIT_CHARS
    report, peak = _peak_bytes(lambda: check_store(store, min_age_s=0))
    assert report.healthy and report.orphans_held_back is None, report.as_dict()
    assert report.pointers_checked == 2 * REQUESTS  # pending, then claimed or done
    # every audit held at once is ~10 MB; one request's read (its bytes, parsed, hashed) is a few times 250 kB
    assert peak < held / 4, f"check_store peaked at {peak / 1e6:.1f} MB of Python allocations"

    pruned, peak = _peak_bytes(lambda: prune_versions(store, keep=1, apply=False))
    assert pruned["runs"] == {}
    assert peak < held / 4, f"prune_versions peaked at {peak / 1e6:.1f} MB of Python allocations"
