"""`steal --target` given a block checkpoint of an `obliviate train` run told a command-line user to "Save targets with
obliviate.extraction.target.save_checkpoint" (a Python API): it now names the documented path, `obliviate target
serve --run R --store ...` and `steal --target http://127.0.0.1:8000/predict`, with the run, store and pool filled in."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def test_steal_of_a_runs_block_checkpoint_points_to_target_serve_run(tmp_path, capsys) -> None:
    from actors.chains import ChainWorker
    from flows.cli import main
    from flows.train import run_spec
    from storage import ObjectStore

    store = tmp_path / "store"
    url = f"file://{store}"
    ObjectStore(url).ensure_container()
    options = {"data": "digits", "model": "lenet5", "blocks": 2, "epochs": 1, "batch_size": 32}
    options |= {"learning_rate": 0.01, "schedule": "constant", "train_size": 200, "heldout_size": 100}
    ChainWorker(url).train(run_spec(run_id="digits-a", seed=0, split_seed=0, **options))
    checkpoint = next(store.glob("runs/digits-a/chains/*/ckpt-0002.pt"))
    out = tmp_path / "report"
    assert main(["steal", "--target", str(checkpoint), "--pool", "digits", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"obliviate steal: error: {str(checkpoint)!r} is not a target checkpoint: it is a block "), (
        err
    )
    assert f"`obliviate target serve --run digits-a --store file://{store.resolve()}`" in err, err
    assert "`obliviate steal --target http://127.0.0.1:8000/predict --pool digits`" in err, err
    assert "(M_2)" in err and "save_checkpoint" not in err and "Traceback" not in err, err
    assert not out.exists()


def test_another_dict_without_arch_keeps_the_api_hint_and_gains_target_train(tmp_path) -> None:
    from obliviate.errors import ConfigError
    from obliviate.extraction.target import load_checkpoint

    path = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ConfigError) as refused:
        load_checkpoint(path)
    said = str(refused.value)
    assert "is not a target checkpoint: expected a dict with 'arch' and 'state_dict'" in said
    assert "`obliviate target train`" in said and "obliviate.extraction.target.save_checkpoint" in said
