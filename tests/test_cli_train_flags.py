"""``obliviate train``'s errors about its settings name the flag to change (README: every error names the rule,
the value and the fix), not only the config field it became (``num_blocks``)."""

from __future__ import annotations

import pytest

from flows.cli import main


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ["--blocks", "0"],
            "--blocks (num_blocks) must be a positive integer; got 0. Pass another --blocks (default 6).",
        ),
        (["--epochs", "0"], "--epochs (local_epochs) must be a positive integer; got 0."),
        (["--batch-size", "0"], "--batch-size must be a positive integer; got 0."),
        (["--lr", "-1"], "--lr (learning_rate) must be > 0; got -1.0."),
        (["--min-lr-fraction", "2"], "--min-lr-fraction must be in [0, 1]; got 2.0."),
        (["--shards", "0"], "--shards is the number of chains trained side by side and must be >= 1; got 0."),
    ],
)
def test_a_bad_setting_is_reported_by_its_flag(tmp_path, capsys, args: list[str], said: str) -> None:
    store = f"file://{tmp_path}/store"
    code = main(["train", "--data", "digits", "--run-id", "flags", "--store", store, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert said in err, err
    assert not (tmp_path / "store").exists()  # refused before the store is touched


def test_a_message_that_already_names_its_flag_is_kept(tmp_path, capsys) -> None:
    code = main(
        ["train", "--data", "digits", "--run-id", "flags", "--store", f"file://{tmp_path}/s", "--train-size", "0"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "train_size (--train-size)" in err and "Pass another" not in err


@pytest.mark.parametrize("shards", ["300", "2000"])
def test_too_many_shards_names_the_most_the_data_allows(tmp_path, capsys, shards: str) -> None:
    """2,000 shards of digits' 1,497 training samples got the planner's bare "num_shards must be in 1..1497"."""
    store = f"file://{tmp_path}/store"
    code = main(["train", "--data", "digits", "--run-id", "flags", "--store", store, "--shards", shards])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        f"each shard needs at least one training sample per block: 1497 samples in {shards} shards leave "
        f"{1497 // int(shards)} per shard, fewer than --blocks 6. Lower --shards to at most 249, or lower --blocks."
    ) in err, err
    assert "num_shards" not in err
    assert not (tmp_path / "store").exists()
