"""`store check` memory (fast; a local store, no training): the check reads the ledger one request at a
time (it held every request with its details, each done request's audit of every run, to learn which
requests are open) and hashes each object in pieces (it read every object whole). A store of ~5,300
requests peaked at 1.34 GB RSS under `store check`."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from storage import ObjectStore
from storage.check import check_store, prune_versions
from storage.errors import CorruptObject, ObjectNotFound
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


def test_store_check_hashes_a_big_object_in_pieces(store_url):
    """The check read every object whole to verify it (one reduce tile or result can be hundreds of MB)."""
    store = ObjectStore(store_url)
    size = 16 * 2**20
    # under a folder our layout owns (an MI tile's): store check verifies only what obliviate writes
    store.put_bytes("mi-tiles/t/big.bin", bytes(size))
    store.put_json("mi-tiles/t/small.json", {"a": 1})
    report, peak = _peak_bytes(lambda: check_store(store, min_age_s=0))
    assert report.healthy and report.objects_checked == 2, report.as_dict()
    assert peak < size / 4, f"check_store peaked at {peak / 1e6:.1f} MB of Python allocations for a 16 MiB object"


def test_verify_finds_what_get_bytes_finds(store_url, monkeypatch):
    """verify() checks an object as get_bytes() does: the same errors with the same words."""
    monkeypatch.setattr("storage.objects._REREAD_WAITS_S", (0.0,))
    store = ObjectStore(store_url)
    root = store_url.removeprefix("file://")
    for key, data in {"a.bin": bytes(range(256)) * 9000, "b.bin": b"", "c.bin": b"x" * 2**20}.items():
        store.put_bytes(key, data)
        assert store.verify(key) is None and store.get_bytes(key) == data
    with open(f"{root}/a.bin", "r+b") as handle:  # one byte flipped in the second MiB
        handle.seek(2**20 + 5)
        handle.write(b"\xff")
    with open(f"{root}/c.bin", "ab") as handle:  # one byte more than committed
        handle.write(b"x")
    os.remove(f"{root}/b.bin")  # committed, its bytes gone
    for key, error in {
        "a.bin": CorruptObject,
        "c.bin": CorruptObject,
        "b.bin": ObjectNotFound,
        "d.bin": ObjectNotFound,
    }.items():
        with pytest.raises(error) as by_get:
            store.get_bytes(key)
        with pytest.raises(error) as by_verify:
            store.verify(key)
        assert str(by_verify.value) == str(by_get.value), key


def test_verify_on_s3_reads_as_get_bytes(s3_url, monkeypatch):
    """On S3 an object is read in one watched call either way; verify() reports damage in get_bytes()'s words."""
    monkeypatch.setattr("storage.objects._REREAD_WAITS_S", (0.0,))
    store = ObjectStore(s3_url)
    store.put_bytes("a.bin", b"abc" * 1000)
    assert store.verify("a.bin") is None
    store._fs.pipe_file(store._path("a.bin"), b"xyz")  # the bytes replaced behind their commit record
    for key, error in {"a.bin": CorruptObject, "gone.bin": ObjectNotFound}.items():
        with pytest.raises(error) as by_get:
            store.get_bytes(key)
        with pytest.raises(error) as by_verify:
            store.verify(key)
        assert str(by_verify.value) == str(by_get.value), key
