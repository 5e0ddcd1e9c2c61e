"""serve's watcher re-read every open request every tick (5 s): with 1,000 requests waiting in a 1 h batch
an idle serve spent ~1 s CPU per 40 s on file://, 3-4 calls per request per tick on S3. While the batch
is known to wait, a tick now reads the batch record and lists, whatever the number of requests."""

from __future__ import annotations

from collections import Counter

from flows.batching import batch_gate, save_policy
from flows.deployments import ServiceOptions, ServiceWatcher
from obliviate.unlearning.batching import BatchPolicy
from storage import ObjectStore
from storage.ledger import DeletionLedger


class CountingStore(ObjectStore):
    """A real file store that counts its calls by kind and key."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls: Counter[str] = Counter()

    def get_json(self, key):  # type: ignore[no-untyped-def]
        self.calls[f"get {key}"] += 1
        return super().get_json(key)

    def exists(self, key):  # type: ignore[no-untyped-def]
        self.calls[f"exists {key}"] += 1
        return super().exists(key)

    def list(self, prefix=""):  # type: ignore[no-untyped-def]
        self.calls[f"list {prefix}"] += 1
        return super().list(prefix)

    def read_pointer(self, key):  # type: ignore[no-untyped-def]
        self.calls[f"pointer {key}"] += 1
        return super().read_pointer(key)


def test_a_tick_while_the_batch_waits_reads_no_request(tmp_path):
    store = CountingStore(f"file://{tmp_path / 'store'}")
    store.ensure_container()
    save_policy(store, BatchPolicy(window_s=3600.0))
    ledger = DeletionLedger(store)
    for i in range(40):
        ledger.append(request_id=f"r-{i:02d}", ids=[i], dataset="digits", reason=None)
    assert not batch_gate(store, ledger.due_entries(lease_s=20.0))["flush"]  # all 40 batched for an hour
    watcher = ServiceWatcher(ServiceOptions(store=store.url), announcement={"pid": 0}, api_url="http://127.0.0.1:9")
    watcher.grace_s = 0.0
    watcher.store = store

    store.calls.clear()
    assert not watcher.needs_pass()
    per_request = [call for call in store.calls if "ledger/requests/" in call or "ledger/status/" in call]
    assert per_request == [], per_request[:5]
    assert sum(store.calls.values()) <= 8, store.calls

    ledger.append(request_id="new", ids=[99], dataset="digits", reason=None)  # not in the batch: a pass must gate it
    assert watcher.needs_pass()
