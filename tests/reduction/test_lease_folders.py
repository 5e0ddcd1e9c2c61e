"""On a file store, dropping a settled request's leases left its empty ``ledger/leases/<request>/``
folder behind, one per request forever; the folder goes with its last lease now."""

from __future__ import annotations

from storage import lease


def test_dropping_leases_removes_their_empty_folder_on_a_file_store(file_store, tmp_path):
    for version in (1, 2):
        lease.renew(file_store, "req-1", claim_version=version, holder="h", lease_s=30.0)
    lease.renew(file_store, "req-2", claim_version=1, holder="h", lease_s=30.0)
    folder = tmp_path / "store" / "ledger" / "leases"
    assert (folder / "req-1").is_dir()

    lease.drop(file_store, "req-1")

    assert not (folder / "req-1").exists()
    assert file_store.list("ledger/leases") == ["ledger/leases/req-2/c000000001.json"]
    lease.drop(file_store, "req-1")  # again: nothing to do
    lease.drop(file_store, "never-claimed")


def test_a_lease_folder_that_still_holds_something_stays(file_store, tmp_path):
    lease.renew(file_store, "req-1", claim_version=1, holder="h", lease_s=30.0)
    stray = tmp_path / "store" / "ledger" / "leases" / "req-1" / "stray"
    stray.write_bytes(b"not a lease")

    lease.drop(file_store, "req-1")

    assert stray.exists() and file_store.list("ledger/leases/req-1") == []


def test_dropping_leases_on_s3(s3_store):
    lease.renew(s3_store, "req-1", claim_version=1, holder="h", lease_s=30.0)
    lease.drop(s3_store, "req-1")
    assert s3_store.list("ledger/leases") == []
    assert lease.read(s3_store, "req-1", claim_version=1) is None
