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
