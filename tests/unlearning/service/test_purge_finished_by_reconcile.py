"""A purge cut off between its deletes and the ledger is told to the ledger by the next purge (SPEC 5).

A purge interrupted between deleting the superseded objects and telling the ledger (or one done
before the ledger heard of purges) left the requests' entries saying ``kept`` or ``pending`` with
``purged_at`` null for good: the next purge found nothing to delete, so it told nobody. Now the next
purge tells them (with the time the purge recorded), and reads their requests once. Real stores, a
tiny run; no mocks of obliviate's components.
"""

from __future__ import annotations

from actors.chains import ChainWorker
from flows.settle import run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.check import check_store, purge_superseded, save_keep_superseded
from storage.ledger import DeletionLedger
from storage.registry import RunRegistry, pruned_key


def _trained(url: str, tiny_run) -> int:
    """Train run r1 (3 blocks); a dataset id its block 2 trained on."""
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    ChainWorker(url).train(spec)
    registry = RunRegistry(ObjectStore(url))
    chain, _ = registry.load_chain(registry.current("r1"))
    return int(spec["train_ids"][int(chain.plan.blocks[1][0])])


def _settle(url: str, victim: int) -> dict:
    """File req-1 for ``victim`` and apply it in one pass; its ledger details."""
    worker = ChainWorker(url)
    submit_deletion(url, [victim], dataset="digits", request_id="req-1", emit=False)
    result = run_pass(url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})
    assert result["settled"] == {"req-1": "done"}
    return DeletionLedger(ObjectStore(url)).get("req-1").details


def _v1_alone(store: ObjectStore) -> list[str]:
    """v1's checkpoints that the current version does not use (trained on the deleted id), while stored."""
    registry = RunRegistry(store)
    used = {m.key for m in registry.manifest(registry.current("r1")).members.values()}
    v1 = store.get_json(str(store.read_pointer_version("runs/r1/current", 1).target["manifest"]))
    return [m["key"] for m in v1["members"].values() if m["key"] not in used and store.exists(m["key"])]


def _cut_off_before_the_ledger(store: ObjectStore) -> float:
    """Leave what a purge interrupted between its deletes and the ledger leaves; when it recorded v1 pruned.

    The purge runs whole (v1's objects deleted), then its ledger write is undone: the request's
    status version it wrote is removed (the entry says ``kept`` again) and ``pruned.json`` keeps only
    what a purge writes before it deletes (``pruned_at``, ``superseded``).
    """
    ledger = DeletionLedger(store)
    before = len(ledger.history("req-1"))
    purged = purge_superseded(store, apply=True)
    assert purged["runs"]["r1"]["versions"] == [1] and purged["objects"] > 0, purged
    for version in range(before + 1, len(ledger.history("req-1")) + 1):
        store.delete(f"ledger/status/req-1/v{version:09d}.json")
    assert ledger.get("req-1").details["runs"]["r1"]["superseded_versions"]["status"] == "kept"
    record = store.get_json(pruned_key("r1"))
    versions = {v: {"pruned_at": info["pruned_at"], "superseded": True} for v, info in record["versions"].items()}
    store.put_json(pruned_key("r1"), {"run_id": "r1", "versions": versions})
    assert _v1_alone(store) == []
    return float(versions["1"]["pruned_at"])


def test_store_check_repair_tells_the_ledger_of_a_purge_cut_off_before_it(store_url, tiny_run):
    from flows.repair import check_and_repair

    store = ObjectStore(store_url)
    victim = _trained(store_url, tiny_run)
    save_keep_superseded(store, keep=True)
    _settle(store_url, victim)
    save_keep_superseded(store, keep=False)
    pruned_at = _cut_off_before_the_ledger(store)
    assert check_store(store, min_age_s=0).healthy  # nothing left to delete: only the ledger is behind

    repaired = check_and_repair(store_url, repair=True, min_orphan_age_s=0)

    details = DeletionLedger(store).get("req-1").details
    assert details["runs"]["r1"]["superseded_versions"]["status"] == "purged", details["runs"]["r1"]
    assert details["purged_at"] == pruned_at
    assert repaired.healthy and repaired.purged["runs"]["r1"]["requests"] == ["req-1"], repaired.as_dict()


class CountingStore(ObjectStore):
    """A real file store that records the ledger keys it reads."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.ledger_reads: list[str] = []

    def get_json(self, key):  # type: ignore[no-untyped-def]
        if key.startswith("ledger/"):
            self.ledger_reads.append(key)
        return super().get_json(key)

    def read_pointer(self, key):  # type: ignore[no-untyped-def]
        if key.startswith("ledger/"):
            self.ledger_reads.append(key)
        return super().read_pointer(key)


def test_once_told_a_purge_pass_reads_no_request_again(store_url, tiny_run):
    from storage.check import runs_with_purge_left

    store = ObjectStore(store_url)
    victim = _trained(store_url, tiny_run)
    save_keep_superseded(store, keep=True)
    _settle(store_url, victim)
    save_keep_superseded(store, keep=False)
    _cut_off_before_the_ledger(store)
    assert runs_with_purge_left(store) == ["r1"]
    assert purge_superseded(store, apply=True)["runs"]["r1"]["requests"] == ["req-1"]

    counting = CountingStore(store_url)
    assert runs_with_purge_left(counting) == []  # what a reconcile pass asks first: no run has work left
    again = purge_superseded(counting, apply=True)  # and a purge of every run (store check --repair, a deletion's)
    assert again["runs"]["r1"] == {
        "versions": [],
        "objects": 0,
        "bytes": 0,
        "held": 0,
        "purged_at": again["runs"]["r1"]["purged_at"],
    }
    assert counting.ledger_reads == [], counting.ledger_reads
