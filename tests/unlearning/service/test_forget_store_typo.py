"""A mistyped ``forget --store`` lost a deletion request: the store was created and the request filed where no run
and no serve would ever apply it, with exit 0."""

from __future__ import annotations

from actors.chains import ChainWorker
from flows.cli import main
from flows.train import run_spec
from storage import ObjectStore
from storage.ledger import DeletionLedger


def test_forget_refuses_a_store_that_does_not_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    typo = tmp_path / "typo" / "x"
    assert main(["forget", "--store", f"file://{typo}", "--ids", "5", "--data", "digits"]) == 2
    said = capsys.readouterr().err
    assert f"store file://{typo} does not exist (no bucket or folder there)" in said, said
    assert (
        "Nothing written. Check --store / $OBLIVIATE_STORE" in said and "`obliviate train` or `obliviate serve`" in said
    )
    assert not (tmp_path / "typo").exists()


def test_forget_on_a_store_no_run_of_its_data_and_no_serve_know_files_it_with_a_warning(
    store_url, tiny_run, capsys, monkeypatch
):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    ObjectStore(store_url).ensure_container()
    argv = ["forget", "--store", store_url, "--ids", "5", "--data", "digits", "--request-id"]
    assert main([*argv, "empty"]) == 0
    said = capsys.readouterr().err
    assert said.startswith("request empty: pending; recorded in the ledger")
    assert f"warning: store {store_url} has no registered run of --data digits (it holds no registered run)" in said
    assert "Check the URL (--store / $OBLIVIATE_STORE) and --data" in said
    assert DeletionLedger(ObjectStore(store_url)).request_ids() == ["empty"]  # filed all the same
    ChainWorker(store_url).train(run_spec(run_id="digits-a", split_seed=0, **tiny_run(blocks=2)))
    assert main([*argv, "known"]) == 0  # a run of digits is registered: it will be applied
    assert "warning" not in capsys.readouterr().err
