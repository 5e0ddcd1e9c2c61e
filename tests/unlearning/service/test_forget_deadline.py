"""`forget --deadline DURATION` gives one request its own deadline (issue 11: receipt + a deadline).

Only the Python API (submit_deletion(..., deadline_s=...)) could; the command line always recorded
receipt + the store's policy (serve --deadline). A shorter deadline is recorded; a longer one than
the store's promise is refused, as are bad durations, with nothing written.
"""

from __future__ import annotations

import pytest

from flows.batching import FLUSH_PREFIX, save_policy
from flows.cli import main
from obliviate.unlearning.batching import DAY_S, BatchPolicy
from storage import ObjectStore
from storage.ledger import DeletionLedger


@pytest.fixture
def url(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the event path finds no API: recorded, announced later
    url = f"file://{tmp_path}/runs"
    ObjectStore(url).ensure_container()  # forget files requests only in a store that exists
    return url


def _forget(url: str, request_id: str, *extra: str) -> int:
    return main(["forget", "--store", url, "--ids", "3,17", "--data", "digits", "--request-id", request_id, *extra])


@pytest.mark.parametrize("event", [False, True], ids=["no-event", "event"])
def test_forget_deadline_is_recorded_as_receipt_plus_the_duration(url, capsys, event):
    assert _forget(url, "short", "--deadline", "7d", *([] if event else ["--no-event"])) == 0
    record = DeletionLedger(ObjectStore(url)).get("short").request
    assert record["deadline"] == record["requested_at"] + 7 * DAY_S
    capsys.readouterr()
    assert main(["forget", "--store", url, "--status", "short"]) == 0
    assert "deadline" in capsys.readouterr().err


def test_without_forget_deadline_the_store_policy_decides(url):
    assert _forget(url, "default", "--no-event") == 0
    store = ObjectStore(url)
    record = DeletionLedger(store).get("default").request
    assert record["deadline"] == record["requested_at"] + 30 * DAY_S
    save_policy(store, BatchPolicy(deadline_s=90 * DAY_S))  # serve --deadline 90d
    assert _forget(url, "longer-policy", "--no-event") == 0
    assert _forget(url, "within-policy", "--no-event", "--deadline", "40d") == 0  # longer than 30d, within 90d
    ledger = DeletionLedger(store)
    for request_id, days in (("longer-policy", 90), ("within-policy", 40)):
        record = ledger.get(request_id).request
        assert record["deadline"] == record["requested_at"] + days * DAY_S


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("0", "must be > 0; got '0'"),
        ("0d", "must be > 0; got '0d'"),
        ("-1d", "a duration is a number with an optional unit"),
        ("1x", "a duration is a number with an optional unit"),
        ("31d", "may shorten the store's deadline, not lengthen it: this store promises every request within 30d"),
    ],
)
def test_a_bad_forget_deadline_is_refused_with_nothing_written(url, capsys, given, said):
    assert main(["forget", "--store", url, "--ids", "3", "--data", "digits", "--now", "--deadline", given]) == 2
    err = capsys.readouterr().err
    assert said in err and "--deadline" in err and "Nothing written" in err
    store = ObjectStore(url)
    if store.container_exists():
        assert DeletionLedger(store).request_ids() == [] and store.list(FLUSH_PREFIX) == []


def test_forget_deadline_needs_ids(url, capsys):
    assert _forget(url, "r", "--no-event") == 0
    capsys.readouterr()
    assert main(["forget", "--store", url, "--retry", "r", "--deadline", "1d"]) == 2
    assert "--deadline dates a new request, so it needs --ids" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        # the first left an empty folder behind: the store was created before the deadline was judged
        (["--ids", "1", "--deadline", "999d"], "may shorten the store's deadline, not lengthen it"),
        (["--ids", "1", "--deadline", "999d", "--now"], "may shorten the store's deadline, not lengthen it"),
        # it created the store and filed the request there, where no run and no serve would ever apply it
        (["--ids", "1"], "does not exist (no bucket or folder there): no run is registered there"),
        (["--ids", "1", "--now", "--no-event"], "does not exist (no bucket or folder there): no run is registered"),
        (["--cancel", "nosuch"], "no request 'nosuch' in the ledger of"),
        (["--retry", "nosuch"], "no request 'nosuch' in the ledger of"),
        (["--status", "nosuch"], "does not exist"),
        (["--ids", "abc"], "ids are comma-separated integers"),
        (["--ids", "-1"], "ids are comma-separated integers"),
        (["--deadline", "7d"], "forget needs --ids"),
        (["--ids", "1", "--deadline", "soon"], "a duration is a number with an optional unit"),
        (["--ids", "1", "--deadline", "0s"], "must be > 0"),
    ],
)
def test_a_refused_forget_leaves_no_store_behind(tmp_path, capsys, argv, said):
    store = tmp_path / "nonexistent"
    assert main(["forget", "--store", f"file://{store}", "--data", "digits", *argv]) == 2
    assert said in capsys.readouterr().err
    assert not store.exists()


def test_forget_now_on_a_store_that_does_not_exist_creates_none(tmp_path, capsys):
    store = tmp_path / "nonexistent"
    assert main(["forget", "--store", f"file://{store}", "--now"]) == 0
    assert "nothing to flush" in capsys.readouterr().err
    assert not store.exists()


def test_a_deadline_past_a_stored_policy_is_refused(url, capsys):
    store = ObjectStore(url)
    store.ensure_container()
    save_policy(store, BatchPolicy(deadline_s=90 * DAY_S))  # serve --deadline 90d
    assert _forget(url, "too-long", "--no-event", "--deadline", "91d") == 2
    assert "this store promises every request within 90d (serve --deadline); got --deadline '91d'" in (
        capsys.readouterr().err
    )
    assert DeletionLedger(store).request_ids() == []
