"""``verify --run`` of a run the store lacks names the runs it has."""

from __future__ import annotations

from actors.chains import ChainWorker
from flows.cli import main
from flows.train import run_spec
from storage import ObjectStore


def test_verify_of_a_run_the_store_lacks_names_the_runs_it_has(store_url, tiny_run, monkeypatch, capsys):
    """It said "run 'g' has no published version ... train it first" without naming the runs there were."""
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: refused before any flow
    ObjectStore(store_url).ensure_container()
    assert main(["verify", "--store", store_url, "--run", "g"]) == 2
    said = capsys.readouterr().err
    assert "it holds no published run at all: check --store / $OBLIVIATE_STORE" in said, said
    ChainWorker(store_url).train(run_spec(run_id="digits-a", split_seed=0, **tiny_run(blocks=2)))
    assert main(["verify", "--store", store_url, "--run", "g"]) == 2
    said = capsys.readouterr().err
    assert f"run 'g' has no published version in {store_url}; it holds 1 published run(s): digits-a." in said, said
    assert "Check --run, or train it first." in said
