"""`forget --now` with requests pending but no batch open yet (no pass has gated them) said
"no request waits in a batch; nothing to flush" while 3,001 requests waited."""

from __future__ import annotations

from flows.batching import FLUSH_PREFIX, batch_gate, save_policy
from flows.cli import main
from obliviate.unlearning.batching import BatchPolicy
from storage import ObjectStore
from storage.ledger import DeletionLedger


def test_forget_now_names_the_pending_requests_no_batch_holds_yet_and_flushes_them(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    url = f"file://{tmp_path}/runs"
    ObjectStore(url).ensure_container()  # forget files requests only in a store that exists
    for i in range(3):
        assert (
            main(
                ["forget", "--store", url, "--ids", str(i), "--data", "digits", "--no-event", "--request-id", f"p-{i}"]
            )
            == 0
        )
    store = ObjectStore(url)
    save_policy(store, BatchPolicy(window_s=3600.0))  # serve --batch-window 1h, but no pass ran its gate yet
    capsys.readouterr()

    assert main(["forget", "--store", url, "--now"]) == 0
    said = capsys.readouterr().err
    assert "nothing to flush" not in said
    assert "3 request(s) are open but in no batch yet" in said and "p-0, p-1, p-2" in said
    assert len(store.list(FLUSH_PREFIX)) == 1
    gate = batch_gate(store, DeletionLedger(store).due_entries(lease_s=60.0))
    assert gate["flush"] and gate["requests"] == ["p-0", "p-1", "p-2"]  # not batched for the hour


def test_forget_now_names_only_the_batched_requests_still_pending(tmp_path, capsys, monkeypatch):
    """A request cancelled after it joined the open batch was still listed as waiting to flush."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    url = f"file://{tmp_path}/runs"
    store = ObjectStore(url)
    store.ensure_container()
    for request_id in ("again", "c1"):
        argv = ["forget", "--store", url, "--ids", "4", "--data", "digits", "--no-event", "--request-id", request_id]
        assert main(argv) == 0
    save_policy(store, BatchPolicy(window_s=3600.0))
    gate = batch_gate(store, DeletionLedger(store).due_entries(lease_s=60.0))
    assert not gate["flush"] and gate["requests"] == ["again", "c1"]  # both wait in the open batch
    assert main(["forget", "--store", url, "--cancel", "c1"]) == 0
    capsys.readouterr()

    assert main(["forget", "--store", url, "--now"]) == 0
    said = capsys.readouterr().err
    assert "1 request(s) waiting in the open batch will flush on the next pass" in said, said
    assert said.rstrip().endswith(": again"), said

    assert main(["forget", "--store", url, "--cancel", "again"]) == 0
    capsys.readouterr()
    assert main(["forget", "--store", url, "--now"]) == 0  # every batched request withdrawn: none waits
    said = capsys.readouterr().err
    assert "no request waits in a batch; nothing to flush" in said, said
