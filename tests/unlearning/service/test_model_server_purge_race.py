"""A prediction racing a deletion's purge of the version it was loading is answered from the new version.

``RunBackend.refresh`` read the run's pointer, then loaded the version it named; a deletion published
meanwhile purges the superseded version's objects right after its publish (SPEC 5), so the load met
ObjectNotFound and the prediction got HTTP 503 once. Now the pointer is read again and, as it moved,
the new version is loaded; a pointer that did not move still raises. Real store, tiny run, real
publish and purge.
"""

from __future__ import annotations

from typing import Any

import pytest

import storage.serving
from actors.chains import ChainWorker
from flows.model_server import RunBackend
from flows.train import run_spec
from storage import ObjectStore
from storage.check import purge_superseded, save_keep_superseded
from storage.errors import ObjectNotFound
from storage.registry import RunRegistry


def _trained(url: str, tiny_run) -> int:
    """Train run r1 (3 blocks); a dataset id its block 2 trained on."""
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    ChainWorker(url).train(spec)
    registry = RunRegistry(ObjectStore(url))
    chain, _ = registry.load_chain(registry.current("r1"))
    return int(spec["train_ids"][int(chain.plan.blocks[1][0])])


def test_a_purge_between_the_pointer_read_and_the_load_serves_the_new_version(store_url, tiny_run, monkeypatch):
    """The wrapper injects the interleaving, it does not replace our code.

    Its first call, made by ``served_model`` after it read the pointer (version 1), publishes the deletion
    (version 2, its superseded versions kept as under ``serve --keep-superseded-versions``) and then purges
    version 1 as a serve without the option does; then it calls the real ``served_checkpoint`` with version 1.
    """
    victim = _trained(store_url, tiny_run)
    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    backend = RunBackend(store_url, "r1", refresh_s=0.0)
    real = storage.serving.served_checkpoint
    calls: list[int] = []

    def racing(registry_: RunRegistry, current: Any) -> Any:
        calls.append(current.version)
        if len(calls) == 1:
            save_keep_superseded(store, keep=True)
            assert ChainWorker(store_url).unlearn("r1", {"req-1": [victim]})["to_version"] == 2
            save_keep_superseded(store, keep=False)
            assert purge_superseded(store, apply=True)["runs"]["r1"]["versions"] == [1]
        return real(registry_, current)

    monkeypatch.setattr(storage.serving, "served_checkpoint", racing)
    backend.refresh(force=True)  # raised ObjectNotFound (HTTP 503) before
    assert calls == [1, 2]
    assert backend.served() == {"r1": {"version": 2, "in_vote": True, "serve_block": "final"}}
    assert victim in backend._deleted["r1"] and registry.current("r1").version == 2


def test_a_missing_checkpoint_of_an_unmoved_pointer_still_raises(store_url, tiny_run, monkeypatch):
    _trained(store_url, tiny_run)
    store = ObjectStore(store_url)
    backend = RunBackend(store_url, "r1", refresh_s=0.0)
    real = storage.serving.served_checkpoint

    def vanished(registry_: RunRegistry, current: Any) -> Any:
        for key in [k for k in store.list("runs/r1/chains/") if k.endswith(".pt")]:
            store.delete(key)
        return real(registry_, current)

    monkeypatch.setattr(storage.serving, "served_checkpoint", vanished)
    with pytest.raises(ObjectNotFound):
        backend.refresh(force=True)
