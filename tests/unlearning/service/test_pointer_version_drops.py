"""A pointer may drop its old versions, never its newest, and its compare-and-swap stays one.

:meth:`ObjectStore.drop_pointer_versions` deletes a pointer's oldest versions (for a pointer each version
of which holds its whole state, such as a run's pruned record). That opens one way to lose a swap: a
writer stalled between listing the versions and writing its own re-creates a number dropped meanwhile,
below versions written since. It is staged here in the network (tests/conftest.py's FlakyProxy holds the
writer's PUT on the moto S3 server while others swap and drop): the stalled writer loses its swap.
"""

from __future__ import annotations

import threading

import pytest

from obliviate.errors import ConfigError
from storage import ObjectStore, PointerConflict


def test_the_newest_version_is_never_dropped(store_url):
    store = ObjectStore(store_url)
    for version in range(4):
        store.swap_pointer("p", {"n": version}, expected_version=version)
    for refused in (0, -1, 1.5, True, None):
        with pytest.raises(ConfigError, match="newest"):
            store.drop_pointer_versions("p", keep_last=refused)
    assert store.pointer_versions("p") == [1, 2, 3, 4]
    assert store.drop_pointer_versions("p", keep_last=1) == [1, 2, 3]
    assert store.drop_pointer_versions("p", keep_last=1) == [] and store.pointer_versions("p") == [4]
    assert store.read_pointer("p").target == {"n": 3}
    with pytest.raises(PointerConflict):  # a writer that read a dropped version still loses
        store.swap_pointer("p", {"n": "stale"}, expected_version=2)
    assert store.swap_pointer("p", {"n": 4}, expected_version=4).version == 5


def test_a_swap_stalled_while_others_swap_and_drop_does_not_win_in_the_gap(s3_url, flaky_s3):
    store = ObjectStore(s3_url)
    store.swap_pointer("p", {"n": 1}, expected_version=0)
    held = flaky_s3.hold("PUT", f"/{s3_url.removeprefix('s3://')}/p/v000000002.json")
    outcome: dict = {}

    def stalled() -> None:
        with flaky_s3.routed():
            slow = ObjectStore(s3_url)
        try:
            outcome["pointer"] = slow.swap_pointer("p", {"n": "stalled"}, expected_version=1)
        except PointerConflict as err:
            outcome["conflict"] = err

    thread = threading.Thread(target=stalled)
    thread.start()
    try:
        held.wait()  # it listed version 1 as the newest and is writing version 2
        for version in range(1, 4):  # others write versions 2, 3 and 4, and drop all but the newest two
            store.swap_pointer("p", {"n": version + 1}, expected_version=version)
        assert store.drop_pointer_versions("p") == [1, 2]
    finally:
        held.release()
        thread.join(60)
    assert "conflict" in outcome, f"the stalled swap won in the gap: {outcome}"
    assert store.pointer_versions("p") == [3, 4] and store.read_pointer("p").target == {"n": 4}


@pytest.mark.parametrize("followers", [1, 2])
def test_a_swap_that_others_built_on_before_it_looked_again_still_wins(followers, s3_url, flaky_s3):
    """The writer's look after its write is held while others swap on top of its version and drop the old ones.

    One follower: the version above its own records it replaced its own. Two: its own is dropped too.
    """
    store = ObjectStore(s3_url)
    store.swap_pointer("p", {"n": 1}, expected_version=0)
    written = flaky_s3.hold("PUT", f"/{s3_url.removeprefix('s3://')}/p/v000000002.json")
    outcome: dict = {}

    def writer() -> None:
        with flaky_s3.routed():
            slow = ObjectStore(s3_url)
        try:
            outcome["pointer"] = slow.swap_pointer("p", {"n": 2}, expected_version=1)
        except PointerConflict as err:
            outcome["conflict"] = err

    thread = threading.Thread(target=writer)
    thread.start()
    looked = None
    try:
        written.wait()
        looked = flaky_s3.hold("GET", "list-type=2")  # its next request: the listing after its write
        written.release()
        looked.wait()
        assert store.read_pointer("p").target == {"n": 2}
        for version in range(2, 2 + followers):
            store.swap_pointer("p", {"n": version + 1}, expected_version=version)
        assert store.drop_pointer_versions("p") == list(range(1, followers + 1))
    finally:
        written.release()
        if looked is not None:
            looked.release()
        thread.join(60)
    assert outcome.get("pointer") is not None and outcome["pointer"].version == 2, outcome
    newest = 2 + followers
    assert store.pointer_versions("p") == [newest - 1, newest] and store.read_pointer("p").target == {"n": newest}


def test_a_reader_whose_newest_version_is_dropped_before_it_reads_it_reads_the_newest(s3_url, flaky_s3):
    store = ObjectStore(s3_url)
    for version in range(2):
        store.swap_pointer("p", {"n": version + 1}, expected_version=version)
    with flaky_s3.routed():
        slow = ObjectStore(s3_url)
    fetched = flaky_s3.hold("GET", f"/{s3_url.removeprefix('s3://')}/p/v000000002.json")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(pointer=slow.read_pointer("p")))
    thread.start()
    try:
        fetched.wait()  # it listed versions 1 and 2 and is reading version 2
        for version in range(2, 4):
            store.swap_pointer("p", {"n": version + 1}, expected_version=version)
        assert store.drop_pointer_versions("p") == [1, 2]
    finally:
        fetched.release()
        thread.join(60)
    assert outcome["pointer"].version == 4 and outcome["pointer"].target == {"n": 4}


def test_a_stalled_swap_is_not_judged_by_another_stalled_swap_above_it(s3_url, flaky_s3):
    """Two writers re-create dropped numbers 2 and 3, the second on top of the first's: neither wins.

    The version right above the first one's is the second one's, which descends from it; only the
    newest version tells that neither is in the pointer's history.
    """
    store = ObjectStore(s3_url)
    store.swap_pointer("p", {"n": 1}, expected_version=0)
    bucket_key = f"/{s3_url.removeprefix('s3://')}/p"
    with flaky_s3.routed():
        first, second = ObjectStore(s3_url), ObjectStore(s3_url)
    outcome: dict = {}

    def swap(name: str, slow: ObjectStore, expected: int) -> None:
        try:
            outcome[name] = slow.swap_pointer("p", {"n": name}, expected_version=expected)
        except PointerConflict as err:
            outcome[name] = err

    holds = [flaky_s3.hold("PUT", f"{bucket_key}/v000000002.json")]
    threads = [threading.Thread(target=swap, args=("first", first, 1))]
    try:
        threads[0].start()
        holds[0].wait()  # the first listed version 1 as the newest and is writing version 2
        store.swap_pointer("p", {"n": 2}, expected_version=1)
        holds.append(flaky_s3.hold("GET", f"{bucket_key}/v000000002.json"))
        threads.append(threading.Thread(target=swap, args=("second", second, 2)))
        threads[1].start()
        holds[1].wait()  # the second listed version 2 as the newest and is reading it
        for version in range(2, 5):
            store.swap_pointer("p", {"n": version + 1}, expected_version=version)
        assert store.drop_pointer_versions("p") == [1, 2, 3]
        holds.append(flaky_s3.hold("GET", "list-type=2"))
        holds[0].release()  # the first writes version 2 in the gap, and is held looking again
        holds[2].wait()
        holds.append(flaky_s3.hold("GET", "list-type=2"))
        holds[1].release()  # the second reads the first's version 2, writes 3 on it, and is held looking again
        holds[3].wait()
        holds[2].release()  # the first looks while the second's version 3 is there
        threads[0].join(60)
    finally:
        for held in holds:
            held.release()
        for thread in threads:
            thread.join(60)
    assert isinstance(outcome["first"], PointerConflict), outcome
    assert isinstance(outcome["second"], PointerConflict), outcome
    assert store.pointer_versions("p") == [4, 5] and store.read_pointer("p").target == {"n": 5}
