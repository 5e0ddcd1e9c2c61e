"""``obliviate reduce`` on the command line: option rules, notices and progress (digits, in-process)."""

from __future__ import annotations

from flows.cli import main


def test_an_infinite_restart_memory_is_refused_with_the_flag_and_the_fix(tmp_path, capsys):
    """``--restart-memory-mb inf`` ended in ``OverflowError: cannot convert float infinity to integer``."""
    out = tmp_path / "out"
    code = main(
        ["reduce", "--data", "digits", "--k", "10", "--starts", "5", "--restart-memory-mb", "inf", "--out", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--restart-memory-mb" in err and "inf" in err and "leave it unset" in err.lower()
    assert not out.exists()
