"""A request whose current status is damaged is said once, not on every pass (a local store, a real Prefect server).

Such a request cannot be recorded ``failed`` (0f006fe), so it stays open and every pass met it again:
each ``reconcile`` run logged it as an error three times (twice before and in its pass, then in the
summary), every cron tick, until it was mended. Now the first pass says it once and notes that on the
request; later passes still return it as ``unreadable`` with the reason, and ``store check`` still
reports the damage with its mend, but their logs stay quiet. Another damage of the same request is news.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flows.reconcile import reconcile_flow
from storage import ObjectStore
from storage.check import check_store
from storage.ledger import FAILED, DeletionLedger

GARBAGE = b"\0garbage{{{"


def _errors_naming(caplog, request_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and request_id in r.getMessage()]


def test_a_request_whose_status_is_damaged_is_said_by_the_first_pass_only(store_url, prefect_api_url, caplog):
    store = ObjectStore(store_url)
    store.ensure_container()
    ledger = DeletionLedger(store)
    for request_id, ids in (("req-1", [1]), ("req-2", [2])):
        ledger.append(request_id=request_id, ids=ids, dataset="digits", reason=None)
    root = Path(store_url.removeprefix("file://"))
    (root / "ledger/requests/req-2.json").write_bytes(GARBAGE)
    (root / "ledger/status/req-2/v000000001.json").write_bytes(GARBAGE)  # its status is damaged too

    with caplog.at_level(logging.INFO):
        first = reconcile_flow(store=store_url)
    said = _errors_naming(caplog, "req-2")
    assert len(said) == 1 and "request req-2 cannot be read and is left as it is" in said[0], said
    assert first["unreadable"]["req-2"]["status"] == "unreadable" and not first["unreadable"]["req-2"]["said_before"]

    for n in range(2):  # later passes (a cron tick, an event's run): named in their result, not in their log
        caplog.clear()
        ledger.append(request_id=f"new-{n}", ids=[10 + n], dataset="digits", reason=None)
        with caplog.at_level(logging.INFO):
            later = reconcile_flow(store=store_url)
        assert _errors_naming(caplog, "req-2") == []
        assert later["settled"] == {f"new-{n}": "rejected"}  # the others go on as before
        assert later["unreadable"]["req-2"]["said_before"]
        assert later["unreadable"]["req-2"]["reason"] == first["unreadable"]["req-2"]["reason"]
    damaged = {c["key"] for c in check_store(store).corrupt}
    assert {"ledger/requests/req-2.json", "ledger/status/req-2/v000000001.json"} <= damaged  # still reported

    # Mended half way (the damaged status version removed, as its mend says): another state, said again
    (root / "ledger/status/req-2/v000000001.json").unlink()
    Path(f"{root}/ledger/status/req-2/v000000001.json.sha256").unlink(missing_ok=True)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        mended = reconcile_flow(store=store_url)
    said = _errors_naming(caplog, "req-2")
    assert said and "request req-2 failed (the other requests go on)" in said[0], said
    assert mended["settled"] == {"req-2": FAILED} and ledger.history("req-2")[-1]["status"] == FAILED
