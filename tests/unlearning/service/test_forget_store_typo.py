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
    # it said "(its runs (digits-a) trained on other data)", where a serve's warning names the data
    assert main([*argv[:-3], "--data", "mnist5k", "--request-id", "other-data"]) == 0
    said = capsys.readouterr().err
    assert (
        f"warning: store {store_url} has no registered run of --data mnist5k (its runs (digits-a) trained on "
        "digits) and no `obliviate serve` ever announced itself there"
    ) in said, said


def test_forget_of_data_no_registered_run_trained_on_warns_that_the_serve_will_reject_it(
    store_url, tiny_run, capsys, monkeypatch
):
    """With a serve on the store, a request of data no run trained on (a forgotten --data: the default is digits)
    said only "pending; recorded in the ledger" and exited 0; the serve rejected it a second later."""
    import time

    from flows.unlearn import ENDPOINT_KEY

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    store = ObjectStore(store_url)
    store.ensure_container()
    announced = {"api_url": None, "pid": 1, "started_at": time.time(), "stopped_at": time.time()}
    store.put_json(ENDPOINT_KEY, announced)
    argv = ["forget", "--store", store_url, "--ids", "5", "--request-id"]
    assert main([*argv, "none-yet", "--data", "digits"]) == 0
    said = capsys.readouterr().err
    assert (
        f"warning: store {store_url} holds no registered run, so its `obliviate serve` rejects this request unless "
        "a run of digits registers first (`obliviate train --data digits`)."
    ) in said, said
    ChainWorker(store_url).train(run_spec(run_id="digits-a", split_seed=0, **tiny_run(blocks=2)))
    assert main([*argv, "other-data", "--data", "mnist5k"]) == 0
    said = capsys.readouterr().err
    assert (
        f"warning: store {store_url} has no registered run of --data mnist5k (its runs trained on digits), so its "
        "`obliviate serve` rejects this request unless a run of mnist5k registers first. If --data was mistyped "
        "(the default is digits), file it again with --data digits."
    ) in said, said
    assert "ever announced itself" not in said
    assert DeletionLedger(store).request_ids() == ["none-yet", "other-data"]  # filed all the same
    assert main([*argv, "known", "--data", "digits"]) == 0  # a run of digits is registered: it will be applied
    assert "warning" not in capsys.readouterr().err
