"""serve --rollback: a damaged checkpoint the release of a cancelled request's hold needs no longer stalls every pass.

The batch gate releases the holds of rejected or cancelled requests (``release_refused``) before it
claims anything; a damaged checkpoint the release had to judge raised its CorruptObject out of every
pass. Now that run's release is skipped (it keeps serving the version rolled back for the holds, which
saw no open request's ids), the cancelled request records the error and its mend (``release_failed``,
``release_mend`` in ``forget --status``), other requests go on, and the next pass after
``store check --repair`` releases the hold and clears the note.
"""

from __future__ import annotations

from pathlib import Path

from flows.batching import batch_gate
from flows.rollback import save_rollback
from storage.ledger import CANCELLED, DeletionLedger
from storage.registry import RunRegistry


def test_a_damaged_checkpoint_the_release_needs_does_not_stall_the_pass(tmp_path: Path, train_rb) -> None:
    _url, store, ids_in = train_rb()
    save_rollback(store, enabled=True, floor_points=100.0)  # any checkpoint meets this floor
    registry, ledger = RunRegistry(store), DeletionLedger(store)

    def served_now() -> tuple[int | None, dict]:
        target = store.read_pointer(registry.pointer_key("rb")).target
        return registry.manifest(registry.current("rb")).metadata.get("serve_block"), dict(target.get("holds") or {})

    ledger.append(request_id="late", ids=ids_in(4), dataset="digits", reason=None)
    ledger.append(request_id="early", ids=ids_in(2), dataset="digits", reason=None)
    batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert served_now() == (1, {"late": 4, "early": 2})
    ledger.cancel("early", applied_to=[])  # the release now serves M_3 ("late" alone), judged first

    ckpt = tmp_path / "store" / "runs" / "rb" / "chains" / "train" / "ckpt-0003.pt"  # M_3
    good = ckpt.read_bytes()
    data = bytearray(good)
    data[len(data) // 2 : len(data) // 2 + 10] = b"XXXXXXXXXX"
    ckpt.write_bytes(bytes(data))

    ledger.append(request_id="other", ids=ids_in(4, 2), dataset="digits", reason=None)
    gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))  # raised CorruptObject before
    assert sorted(gate["requests"]) == ["late", "other"]  # the pass goes on with the open requests
    # the release is skipped: the run still serves M_1, which saw neither open request's ids
    assert served_now() == (1, {"late": 4, "early": 2, "other": 4})
    noted = ledger.get("early")
    assert noted.status == CANCELLED and noted.details["release_failed"]["rb"].startswith("CorruptObject")
    assert "store check --repair" in noted.details["release_mend"]
    versions = len(ledger.history("early"))
    batch_gate(store, ledger.open_entries(stale_after_s=600.0))  # a later pass: noted once only
    assert len(ledger.history("early")) == versions

    ckpt.write_bytes(good)  # what `store check --repair` restores
    batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert served_now() == (3, {"late": 4, "other": 4})  # M_3 saw neither open request's ids (block 4)
    mended = ledger.get("early")
    assert mended.status == CANCELLED
    assert "release_failed" not in mended.details and "release_mend" not in mended.details
