"""What reading a pointer costs on S3: one listing of the pointer's own versions, never of its parent.

s3fs's ``ls()`` of a missing path lists the parent prefix to tell a file from nothing; for the
status pointer of a new request that was all of ``ledger/status/`` — pages that grow with the ledger.
The calls are counted on the real s3fs client against the moto server.
"""

from __future__ import annotations

from typing import Any


def _counted(store) -> list[tuple[str, dict[str, Any]]]:
    fs = store._fs
    calls: list[tuple[str, dict[str, Any]]] = []
    real = fs._call_s3

    async def counting(method, *args, **kwargs):
        calls.append((method if isinstance(method, str) else getattr(method, "__name__", str(method)), kwargs))
        return await real(method, *args, **kwargs)

    fs._call_s3 = counting
    return calls


def test_missing_pointer_costs_one_listing_of_its_own_prefix(s3_store):
    for n in range(200):
        s3_store.swap_pointer(f"ledger/status/req-{n:04d}", {"n": n}, expected_version=0)
    calls = _counted(s3_store)

    assert s3_store.read_pointer("ledger/status/new-request") is None

    listings = [kwargs for method, kwargs in calls if method.startswith("list_")]
    assert len(calls) == 1, calls
    assert len(listings) == 1 and listings[0]["Prefix"].endswith("ledger/status/new-request/v"), listings
    assert not any(kw.get("Prefix", "").endswith("ledger/status/") for kw in listings)


def test_existing_pointer_reads_as_before(s3_store):
    s3_store.swap_pointer("ledger/status/a", {"state": "accepted"}, expected_version=0)
    s3_store.swap_pointer("ledger/status/a", {"state": "done"}, expected_version=1)
    s3_store.swap_pointer("ledger/status/ab", {"state": "other"}, expected_version=0)
    s3_store.put_bytes("ledger/status/a/notes.bin", b"x")  # not a version: ignored as before

    assert s3_store.pointer_versions("ledger/status/a") == [1, 2]
    assert s3_store.read_pointer("ledger/status/a").target == {"state": "done"}
    assert s3_store.pointer_versions("ledger/status/ab") == [1]
    assert s3_store.list_pointers("ledger/status") == ["ledger/status/a", "ledger/status/ab"]


def test_missing_pointer_in_a_missing_bucket_is_none(moto_endpoint):
    from storage import ObjectStore

    assert ObjectStore("s3://no-such-bucket-pointer/runs").read_pointer("ledger/status/x") is None
