"""`forget --status` says what settling a request did to trainings interrupted before they published.

Since b0ba073 the pass that settles a request deletes the checkpoints of unpublished trainings that hold its ids,
and records it in ``details.interrupted_trainings`` (purged / left_to_training / unreadable). `forget --status` and
`forget --wait` printed only the registered runs' lines, so a user asking whether the ids were gone from storage
read nothing of those checkpoints (probe 107, small items).
"""

from __future__ import annotations

import json

import pytest

from flows.cli import main
from storage.ledger import DONE, DeletionLedger
from storage.objects import ObjectStore

#: What flows.settle records (storage.erasure.InterruptedTrainings.erase's result): one purged chain, one run left to
#: a live training, one whose stored plan could not be read.
ERASED = {
    "purged": {
        "r-y": {
            "train-x6ffce3a1ee88": {
                "chain": "train-x6ffce3a1ee88",
                "first_block": 1,
                "blocks": [1, 2],
                "ids_count": 1,
                "exclusions_known": True,
                "bytes": 2_400_000,
            }
        },
        # deleted by a reconcile sweep after the request settled (storage.erasure.sweep_dead_trainings)
        "r-z": {
            "train": {
                "chain": "train",
                "first_block": 2,
                "blocks": [2],
                "ids_count": 1,
                "exclusions_known": True,
                "bytes": 1_200_000,
                "swept_at": 1_764_700_000.0,
            }
        },
    },
    "left_to_training": {
        "r-live": {
            "holder": {"command": "obliviate train", "pid": 4242, "host": "node-1"},
            "note": "a training of this run was live; it leaves the ids out before it publishes",
        }
    },
    "unreadable": {"r-bad": "CorruptObject: runs/r-bad/plan.json is not JSON"},
}


@pytest.fixture
def settled(tmp_path, monkeypatch) -> str:
    """A store whose request ``del-1`` is done, with every kind of interrupted-training outcome recorded."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    url = f"file://{tmp_path}/store"
    store = ObjectStore(url)
    store.ensure_container()
    ledger = DeletionLedger(store)
    ledger.append(request_id="del-1", ids=[1418], dataset="digits", reason="ticket")
    claim = ledger.claim("del-1", holder="a pass", lease_s=60.0, max_attempts=3)
    assert claim is not None
    details = {"runs": {"r1": {"status": "published", "from_version": 1, "to_version": 2}}}
    ledger.settle(
        "del-1", claim_version=claim.version, status=DONE, details={**details, "interrupted_trainings": ERASED}
    )
    return url


def _lines(err: str) -> list[str]:
    return [line.strip() for line in err.splitlines() if line.strip().startswith("run ")]


@pytest.mark.parametrize("wait", [None, "1"], ids=["status", "status-wait"])
def test_status_says_what_was_deleted_of_interrupted_trainings(settled, capsys, wait) -> None:
    argv = ["forget", "--store", settled, "--status", "del-1"] + (["--wait", wait] if wait else [])
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = _lines(err)
    assert any(line.startswith("run r1: published") for line in lines), err  # the registered run, as before
    [purged] = [line for line in lines if line.startswith("run r-y")]
    assert "chain train-x6ffce3a1ee88" in purged and "deleted 2 checkpoint(s) (blocks 1-2, 2.4 MB)" in purged, purged
    assert "trained on 1 of its ids;" in purged and "before block 1 never saw them" in purged, purged
    assert "reconcile sweep" not in purged, purged  # deleted as the request settled
    [swept] = [line for line in lines if line.startswith("run r-z")]
    when = "2025-12-02 18:26:40 UTC"  # as every time forget --status says (deadlines, batches)
    assert f"trained on 1 of its ids (deleted by the reconcile sweep at {when}, after its training died);" in swept
    [live] = [line for line in lines if line.startswith("run r-live")]
    assert "was being trained when the request settled (obliviate train, pid 4242 on node-1)" in live, live
    assert "leaves its ids out" in live, live
    [unknown] = [line for line in lines if line.startswith("run r-bad")]
    assert "is unknown (CorruptObject: runs/r-bad/plan.json is not JSON)" in unknown, unknown
    assert "`obliviate store check` reports the damage" in unknown, unknown
    assert err.strip().splitlines()[-1].startswith("request del-1: done"), err
    # and in the JSON on stdout, as recorded
    shown = json.loads(out[out.index("{") :])
    assert shown["details"]["interrupted_trainings"] == ERASED


def test_a_request_with_no_interrupted_training_gets_no_such_line() -> None:
    from flows.cli.forget import _interrupted_training_lines

    assert _interrupted_training_lines({"runs": {"r1": {"status": "published"}}}) == []
    assert _interrupted_training_lines({"interrupted_trainings": {}}) == []
