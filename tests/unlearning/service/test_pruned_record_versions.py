"""A run's pruned record keeps its newest versions only, and changing it loses no mark.

``runs/<run>/pruned`` kept every version, each holding the whole record (about two per deletion), so a
long-lived run's folder grew with the square of its deletions. Now each change drops the versions but
the newest two (:meth:`ObjectStore.drop_pointer_versions`), and ``store check`` takes the missing older
ones for what they are. A change stalled in the network while others change the record and drop its
versions (tests/conftest.py's FlakyProxy holds its PUT on the moto S3 server) loses its swap, reads
again and keeps what the others wrote.
"""

from __future__ import annotations

import threading

import pytest

from storage import ObjectStore
from storage.check import check_store
from storage.registry import RunRegistry, pruned_key


def _mark(name: str):
    """A change as update_pruned's callers make them: decided from the record read (applied again, it adds nothing)."""

    def change(record: dict) -> dict:
        marks = record.setdefault("marks", [])
        if name not in marks:
            marks.append(name)
        return record

    return change


@pytest.mark.parametrize("where", ["file", "s3"])
def test_the_pruned_record_keeps_its_newest_versions_and_reads_whole_after_many_changes(where, store_url, request):
    store = ObjectStore(store_url if where == "file" else request.getfixturevalue("s3_url"))
    registry = RunRegistry(store)
    for n in range(12):
        registry.update_pruned("r1", _mark(f"m{n}"))
    assert store.pointer_versions(pruned_key("r1")) == [11, 12]  # storage.registry.PRUNED_VERSIONS_KEPT
    assert registry.pruned_record("r1") == (12, {"marks": [f"m{n}" for n in range(12)], "versions": {}})
    assert store.read_pointer_version(pruned_key("r1"), 11).target["marks"] == [f"m{n}" for n in range(11)]


def test_racing_changes_of_the_pruned_record_lose_no_mark(store_url):
    """Sixteen writers of ten changes each: losers that swapped again at once lost all 20 attempts (in CI with four)."""
    url, writers, changes = store_url, 16, 10
    errors: list[BaseException] = []
    start = threading.Barrier(writers)

    def write(writer: int) -> None:
        registry = RunRegistry(ObjectStore(url))
        try:
            start.wait(30)
            for n in range(changes):
                registry.update_pruned("r1", _mark(f"w{writer}-{n}"))
        except BaseException as err:  # noqa: BLE001 -- reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(writer,)) for writer in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    store = ObjectStore(url)
    version, record = RunRegistry(store).pruned_record("r1")
    assert sorted(record["marks"]) == sorted(f"w{w}-{n}" for w in range(writers) for n in range(changes))
    # a swap that cannot tell whether it won (a burst of swaps since its write) loses, so one change may land twice
    assert version >= writers * changes and store.pointer_versions(pruned_key("r1")) == [version - 1, version]


def test_a_pruned_record_change_stalled_while_others_change_it_keeps_every_mark(s3_url, flaky_s3):
    """The change of a writer that read the record (none yet) before three others changed it is kept with theirs."""
    store = ObjectStore(s3_url)
    held = flaky_s3.hold("PUT", f"/{s3_url.removeprefix('s3://')}/{pruned_key('r1')}/v000000001.json")
    outcome: dict = {}

    def stalled() -> None:
        with flaky_s3.routed():
            slow = RunRegistry(ObjectStore(s3_url))
        try:
            outcome["record"] = slow.update_pruned("r1", _mark("stalled"))
        except BaseException as err:  # noqa: BLE001 -- reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=stalled)
    thread.start()
    try:
        held.wait()
        for name in ("a", "b", "c"):
            RunRegistry(store).update_pruned("r1", _mark(name))
        assert store.pointer_versions(pruned_key("r1")) == [2, 3]
    finally:
        held.release()
        thread.join(60)
    assert "error" not in outcome, outcome
    version, record = RunRegistry(store).pruned_record("r1")
    assert record["marks"] == ["a", "b", "c", "stalled"] and version == 4
    assert store.pointer_versions(pruned_key("r1")) == [3, 4]


def test_store_check_finds_no_damage_in_the_versions_the_record_dropped(store_url):
    store = ObjectStore(store_url)
    for n in range(5):
        RunRegistry(store).update_pruned("r1", _mark(f"m{n}"))
    assert store.pointer_versions(pruned_key("r1")) == [4, 5]
    report = check_store(store, min_age_s=0)
    assert report.corrupt == [] and report.pointers_checked == 2, report.corrupt
