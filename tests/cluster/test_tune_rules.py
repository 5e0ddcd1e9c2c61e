"""`obliviate tune`'s option rules: a value no sweep could use is refused before Ray, a Prefect server or the store."""

from __future__ import annotations

import pytest

from flows.cli import main


def refused(tmp_path, capsys, *argv: str) -> str:
    """Run ``obliviate tune ARGV`` in-process; it must exit 2 with nothing written. Returns stderr."""
    assert main(["tune", *argv, "--store", f"file://{tmp_path}/store"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("obliviate tune: error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())  # no store, no Tune state beside it
    return err


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "", "sweep one", "/abs", ".tmp-x"])
def test_a_sweep_name_that_is_not_one_plain_folder_is_refused(tmp_path, capsys, name) -> None:
    """'../../escape' made Ray write its state outside the store before the store's key check refused it."""
    err = refused(tmp_path, capsys, "reduction", "--data", "digits", "--name", name)
    assert "a sweep name (--name) is letters, digits, '-', '_' and '.', not '.' or '..'" in err
    assert f"got {name!r}" in err


def test_a_plain_sweep_name_passes_the_name_rule(tmp_path, capsys) -> None:
    err = refused(tmp_path, capsys, "reduction", "--data", "digits", "--name", "k-sweep_2.b", "--bins", "1")
    assert "bins must be in 2..256; got 1" in err  # the name passed; the next rule refused
