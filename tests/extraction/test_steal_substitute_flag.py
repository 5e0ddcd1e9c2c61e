"""`obliviate steal --substitute` takes only what its help names (probe107: --arch had the same loose check)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("given", ["resnet18", "LeNet5", ""])
def test_a_substitute_the_help_does_not_name_is_refused_before_any_work(tmp_path, capsys, given):
    from flows.cli import main

    out = tmp_path / "steal"
    with pytest.raises(SystemExit) as stopped:
        main(["steal", "--target", str(tmp_path / "t.pt"), "--substitute", given, "--budgets", "20", "--out", str(out)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert (
        f"Invalid value for '--substitute': a substitute is lenet5 or c3f2, the audit's digit classifiers; got "
        f"{given!r}. Give --substitute c3f2, or leave --substitute out for lenet5." in err
    )
    assert "Traceback" not in err and not out.exists()
