"""What a new user met with `forget` (probe107): empty id elements, --now --wait, the --no-event note."""

from __future__ import annotations

import pytest

from flows.cli import main
from obliviate.unlearning.service import RequestError, parse_ids
from storage import ObjectStore
from storage.ledger import DeletionLedger


@pytest.mark.parametrize(
    ("typed", "fix"), [("3,,4", "--ids 3,4."), ("3,", "--ids 3."), (",3", "--ids 3."), ("3, ,4", "--ids 3,4.")]
)
def test_an_empty_id_element_is_refused_not_dropped(tmp_path, capsys, typed, fix) -> None:
    """`--ids 3,,4` was read as [3, 4] and `--ids 3,` as [3]: an empty element may be an id the user dropped."""
    with pytest.raises(RequestError, match="with an id between every two commas; got an empty element"):
        parse_ids(typed)
    url = f"file://{tmp_path}/runs"
    ObjectStore(url).ensure_container()
    assert main(["forget", "--store", url, "--ids", typed, "--data", "digits", "--no-event"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("obliviate forget: error: rule: ids are comma-separated") and repr(typed) in said
    assert said.rstrip().endswith(f"remove the extra comma: {fix}") and "Traceback" not in said
    assert DeletionLedger(ObjectStore(url)).request_ids() == []  # nothing filed
    # spaces still separate ids, as before
    assert parse_ids(" 5, 6") == (5, 6) and parse_ids("3 17, 42") == (3, 17, 42)


def test_the_no_event_note_says_whether_a_serve_will_reconcile(tmp_path, capsys, monkeypatch) -> None:
    """`forget --no-event` with no serve running said "the reconciliation schedule will process it"; without
    --no-event the same store was said truthfully to have no serve announced."""
    import json
    import os
    import time

    from flows.unlearn import ENDPOINT_KEY

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    url = f"file://{tmp_path}/runs"
    store = ObjectStore(url)
    store.ensure_container()
    assert main(["forget", "--store", url, "--ids", "110", "--data", "digits", "--no-event"]) == 0
    out, err = capsys.readouterr()
    note = json.loads(out.strip().splitlines()[-1])["note"]
    assert "reconciliation schedule will process it" not in err + note
    assert "no `obliviate serve` announced itself for this store" in note and "start `obliviate serve`" in note
    assert note in err
    # a serve that stopped is said to have stopped
    body = {"api_url": "http://127.0.0.1:4999/api", "pid": os.getpid(), "started_at": time.time()}
    store.put_json(ENDPOINT_KEY, {**body, "stopped_at": time.time()})
    assert main(["forget", "--store", url, "--ids", "111", "--data", "digits", "--no-event"]) == 0
    note = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["note"]
    assert "the `obliviate serve` that served this store through http://127.0.0.1:4999/api stopped" in note
    # a live serve's reconciliation takes it
    store.put_json(ENDPOINT_KEY, body)
    assert main(["forget", "--store", url, "--ids", "112", "--data", "digits", "--no-event"]) == 0
    note = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["note"]
    assert "the live `obliviate serve` of this store (through http://127.0.0.1:4999/api) takes it" in note
    # nor does the option's help promise a reconciliation regardless
    with pytest.raises(SystemExit):
        main(["forget", "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    assert "reconciliation will process it" not in helped and "a running `obliviate serve` takes it" in helped


def _file_and_batch(url: str, request_ids: list[str]) -> DeletionLedger:
    """File requests with --no-event and let a gate put them in an open batch (a 1 h window)."""
    from flows.batching import FLUSH_PREFIX, batch_gate, save_policy
    from obliviate.unlearning.batching import BatchPolicy

    for n, request_id in enumerate(request_ids):
        args = ["forget", "--store", url, "--ids", str(5 + n), "--data", "digits", "--no-event"]
        assert main([*args, "--request-id", request_id]) == 0
    store = ObjectStore(url)
    save_policy(store, BatchPolicy(window_s=3600.0))
    for key in store.list(FLUSH_PREFIX):  # an earlier --now's ask, which a pass that flushed would have consumed
        store.delete(key)
    ledger = DeletionLedger(store)
    gate = batch_gate(store, ledger.due_entries(lease_s=60.0))
    assert not gate["flush"] and gate["requests"] == sorted(request_ids)
    return ledger


def test_now_with_wait_waits_for_the_flushed_requests(tmp_path, capsys, monkeypatch) -> None:
    """`forget --now --wait 60` returned at once with exit 0, ignoring --wait: now it waits, as --ids --wait does."""
    import json
    import threading
    import time

    from flows.batching import FLUSH_PREFIX
    from storage.ledger import DONE, FAILED

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    url = f"file://{tmp_path}/runs"
    ObjectStore(url).ensure_container()
    ledger = _file_and_batch(url, ["b-1", "b-2"])
    capsys.readouterr()
    # no serve: both stay pending; the wait lasts its time and says so, exit 5 as for one request
    began = time.monotonic()
    assert main(["forget", "--store", url, "--now", "--wait", "1.5"]) == 5
    assert time.monotonic() - began >= 1.5
    out, err = capsys.readouterr()
    assert "waiting up to 1.5 s for the 2 request(s) the flush takes: b-1, b-2" in err
    assert err.count("still not settled after 2 s") == 2 and "request b-1: pending" in err
    shown = json.loads(out.strip().splitlines()[-1])
    assert [e["request_id"] for e in shown["requests"]] == ["b-1", "b-2"] and shown["settled"] is False
    assert len(ObjectStore(url).list(FLUSH_PREFIX)) == 1  # the flush is asked all the same

    def settle_later(outcomes: dict[str, str]) -> None:
        time.sleep(1.0)
        for request_id, status in outcomes.items():
            claim = ledger.claim(request_id, holder="a pass", lease_s=60.0, max_attempts=3)
            assert claim is not None
            ledger.settle(request_id, claim_version=claim.version, status=status, details={"reason": "its cause"})

    # a pass settles them while the command waits: one failed -> the failed code (4), before the wait's end
    worker = threading.Thread(target=settle_later, args=({"b-1": DONE, "b-2": FAILED},))
    worker.start()
    began = time.monotonic()
    assert main(["forget", "--store", url, "--now", "--wait", "60"]) == 4
    worker.join()
    assert time.monotonic() - began < 30
    out, err = capsys.readouterr()
    assert "request b-1: done" in err and "request b-2: failed; its cause" in err
    assert json.loads(out.strip().splitlines()[-1])["settled"] is True
    # every one done: 0
    ledger = _file_and_batch(url, ["c-1", "c-2"])
    worker = threading.Thread(target=settle_later, args=({"c-1": DONE, "c-2": DONE},))
    worker.start()
    assert main(["forget", "--store", url, "--now", "--wait", "60"]) == 0
    worker.join()
    assert "request c-2: done" in capsys.readouterr().err


def test_now_with_wait_waits_for_open_requests_no_pass_batched(tmp_path, capsys, monkeypatch) -> None:
    """The other --now branch (open requests in no batch yet) waits too."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    url = f"file://{tmp_path}/runs"
    ObjectStore(url).ensure_container()
    args = ["forget", "--store", url, "--ids", "7", "--data", "digits", "--no-event", "--request-id", "u-1"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["forget", "--store", url, "--now", "--wait", "0.5"]) == 5
    err = capsys.readouterr().err
    assert "open but in no batch yet" in err and "waiting up to 0.5 s for the 1 request(s) the flush takes: u-1" in err
    assert "request u-1: pending" in err and "still not settled after" in err
