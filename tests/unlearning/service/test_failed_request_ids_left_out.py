"""A training leaves out the ids of a ``failed`` deletion request, as the audit does (one rule in the ledger).

Which rows are erased was written twice: the audit (``storage.serving.DatasetErasures``) counted pending, claimed,
done and failed requests, a training (``ChainWorker._accepted_requests``) only pending, claimed and done. A request
whose unlearning failed (``forget --retry`` puts it back) had its ids learnt by any training started meanwhile,
though the audit treated them as erased. Both now read :func:`storage.ledger.erased_ids`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import storage.ledger as ledger_module
from actors.chains import ChainWorker, exclusions_key
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.ledger import CANCELLED, CLAIMED, DONE, FAILED, PENDING, REJECTED, DeletionLedger, RequestStatus
from storage.registry import RunRegistry
from storage.serving import DatasetErasures


@pytest.mark.parametrize(
    ("status", "erased"),
    [(PENDING, True), (CLAIMED, True), (DONE, True), (FAILED, True), (REJECTED, False), (CANCELLED, False)],
)
def test_which_requests_erase_their_ids(status: str, erased: bool) -> None:
    entry = RequestStatus(
        request={"request_id": "del-1", "dataset": "digits", "ids": [4, 9]},
        status=status,
        details={},
        version=1,
        updated_at=0.0,
    )
    # read through the module: on code without the one rule only this test fails, not the training one below
    assert (status in ledger_module.STANDING) is erased
    assert ledger_module.erased_ids(entry, "digits") == ([4, 9] if erased else [])
    assert ledger_module.erased_ids(entry, "mnist") == []  # another dataset's rows


def test_a_training_leaves_out_a_failed_requests_ids(tmp_path: Path, tiny_run) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    worker = ChainWorker(url)
    first = run_spec(run_id="before", **tiny_run(split_seed=0, blocks=2, train_size=200, heldout_size=100))
    worker.train(first)
    ids = [int(first["train_ids"][i]) for i in (10, 150)]
    request_id = submit_deletion(url, ids, dataset="digits", emit=False)["request_id"]
    ledger = DeletionLedger(store)
    claim = ledger.claim(request_id, holder="a pass", lease_s=60.0, max_attempts=1)
    assert claim is not None
    ledger.settle(request_id, claim_version=claim.version, status=FAILED, details={"reason": "worker died"})
    assert ledger.get(request_id).status == FAILED
    assert set(ids) <= DatasetErasures(store, "digits").ids()  # the audit leaves them out

    later = worker.train(
        run_spec(run_id="after", **tiny_run(split_seed=0, seed=1, blocks=2, train_size=200, heldout_size=100))
    )

    assert later["left_out_for_requests"] == [request_id] and later["left_out_ids"] == 2, later
    exclusions = store.get_json(exclusions_key("after"))
    assert exclusions["requests"] == [request_id] and exclusions["positions"] == [10, 150], exclusions
    current = RunRegistry(store).current("after")
    assert current is not None and sorted(current.deleted_ids) == sorted(ids)


def test_a_workers_erasures_read_a_final_request_once_and_an_open_one_each_time(tmp_path: Path) -> None:
    # Each training read every request of the ledger in full, twice (before it trained and before it published);
    # a worker now keeps one DatasetErasures per dataset, which reads a request in a final state once.
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    ledger = DeletionLedger(store)
    for request_id, ids in (("done-1", [4, 9]), ("refused-1", [5]), ("open-1", [11])):
        submit_deletion(url, ids, dataset="digits", request_id=request_id, emit=False)
    for request_id, status in (("done-1", DONE), ("refused-1", REJECTED)):
        claim = ledger.claim(request_id, holder="a pass", lease_s=60.0, max_attempts=1)
        ledger.settle(request_id, claim_version=claim.version, status=status, details={})
    erasures = DatasetErasures(store, "digits")
    assert erasures.requests() == {"done-1": [4, 9], "open-1": [11]}

    # damaged afterwards: the final request's ids are known already, the open one's are read again and lost
    for request_id in ("done-1", "open-1"):
        store.put_bytes(f"ledger/requests/{request_id}.json", b"{damaged")
    assert erasures.requests() == {"done-1": [4, 9]}
    assert erasures.ids() == frozenset({4, 9})
    assert DatasetErasures(store, "digits").requests() == {}  # a fresh reader reads both, and loses both
