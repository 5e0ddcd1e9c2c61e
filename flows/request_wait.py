"""Waiting for a deletion request to be settled, by polling the ledger (``forget --wait``).

Only the ledger and its leases: no Prefect, no torch. ``forget --status ID --wait N`` imported
:mod:`flows.unlearn` (Prefect) to reach this loop, 2 to 5 s before the wait even started, so
it ended 4-5 s after the N seconds asked for on a busy machine.
"""

from __future__ import annotations

import time
from typing import Any

from storage import lease
from storage.ledger import CLAIMED, TERMINAL, DeletionLedger
from storage.objects import ObjectStore


def wait_outcome(
    store_url: str, request_id: str, *, timeout_s: float, poll_s: float = 0.5
) -> tuple[dict[str, Any], bool]:
    """Poll the ledger until the request is settled or ``timeout_s`` passes; never raises on a timeout.

    The last pause is cut to what is left of ``timeout_s``, so the wait ends within one ledger read of it.

    Returns:
        ``(its entry, whether it is settled)``: the entry holds the real state, ``attempts``,
        ``last_error`` / ``reason`` and, for a claim, the holder and its lease.
    """
    store = ObjectStore(store_url)
    ledger = DeletionLedger(store)
    deadline = time.monotonic() + timeout_s
    while True:
        entry = ledger.get(request_id)
        if entry.status in TERMINAL:
            return entry.as_dict(), True
        left = deadline - time.monotonic()
        if left <= 0:
            out = entry.as_dict()
            if entry.status == CLAIMED:
                held = lease.read(store, request_id, claim_version=entry.version)
                out["lease"] = held.as_dict() if held else None
            return out, False
        time.sleep(min(poll_s, left))
