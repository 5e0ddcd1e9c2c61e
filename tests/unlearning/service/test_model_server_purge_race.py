"""A prediction racing a deletion's purge of the version it was loading is answered from the new version.

``RunBackend.refresh`` read the run's pointer, then loaded the version it named; a deletion published
meanwhile purges the superseded version's objects right after its publish (SPEC 5), so the load met
ObjectNotFound and the prediction got HTTP 503 once. Now the pointer is read again and, as it moved,
the new version is loaded; a pointer that did not move still raises. Real store (moto S3), tiny run,
real publish and purge; the race is staged in the network, not in our code.
"""

from __future__ import annotations

import threading

import pytest

from actors.chains import ChainWorker
from flows.model_server import RunBackend
from storage import ObjectStore
from storage.check import purge_superseded, save_keep_superseded
from storage.errors import ObjectNotFound
from storage.registry import RunRegistry
from storage.serving import served_block


def test_a_purge_between_the_pointer_read_and_the_load_serves_the_new_version(s3_url, flaky_s3, train_r1):
    """The server reaches S3 through a proxy that holds its first request for version 1's served checkpoint.

    By then it has read the pointer (version 1) and that version's manifest. While that request is in
    flight the deletion is published (version 2, superseded versions kept as under ``serve
    --keep-superseded-versions``) and version 1 purged as a serve without the option does, straight
    against the store; then the held request goes on and finds version 1's checkpoint gone.
    """
    victim = train_r1(s3_url)[1]
    store = ObjectStore(s3_url)
    registry = RunRegistry(store)
    v1_manifest = registry.manifest(registry.current("r1"))
    v1_served = v1_manifest.members[str(served_block(v1_manifest))].key
    with flaky_s3.routed():
        backend = RunBackend(s3_url, "r1", refresh_s=0.0)
    held = flaky_s3.hold(v1_served)
    outcome: dict = {}

    def refresh() -> None:
        try:
            backend.refresh(force=True)
            outcome["served"] = backend.served()
        except Exception as err:  # noqa: BLE001 -- the assertion below says what was raised
            outcome["error"] = err

    server = threading.Thread(target=refresh)
    server.start()
    try:
        assert v1_served in held.wait()  # the server read the pointer and is loading version 1
        save_keep_superseded(store, keep=True)
        assert ChainWorker(s3_url).unlearn("r1", {"req-1": [victim]})["to_version"] == 2
        save_keep_superseded(store, keep=False)
        assert purge_superseded(store, apply=True)["runs"]["r1"]["versions"] == [1]
        assert not store.exists(v1_served)
    finally:
        held.release()
        server.join(60)
    assert "error" not in outcome, f"the load of the purged version 1 raised {outcome.get('error')!r}"  # HTTP 503
    assert outcome["served"] == {"r1": {"version": 2, "in_vote": True, "serve_block": "final"}}
    assert victim in backend._deleted["r1"] and registry.current("r1").version == 2


def test_a_missing_checkpoint_of_an_unmoved_pointer_still_raises(store_url, train_r1):
    train_r1(store_url)
    store = ObjectStore(store_url)
    backend = RunBackend(store_url, "r1", refresh_s=0.0)  # reads the pointer, loads nothing yet
    checkpoints = [k for k in store.list("runs/r1/chains/") if k.endswith(".pt")]
    assert checkpoints
    for key in checkpoints:
        store.delete(key)
    with pytest.raises(ObjectNotFound):
        backend.refresh(force=True)
    assert RunRegistry(store).current("r1").version == 1
