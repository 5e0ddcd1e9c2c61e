"""``obliviate reduce`` on the command line: option rules, notices and progress (digits, in-process)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from flows.cli import main
from obliviate.data import load_dataset


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


@pytest.fixture
def small_pool(tmp_path):
    """60 real digits images as an .npz: a pool too small for the default k of 600."""
    data = load_dataset("digits")
    path = tmp_path / "pool.npz"
    np.savez(path, images=data.images[:60], labels=data.labels[:60])
    return str(path)


def test_the_default_k_too_large_for_the_pool_is_named_as_the_default(small_pool, tmp_path, capsys):
    """A 60-image pool without --k said 'got k=600' as if the user had asked for 600."""
    out = tmp_path / "out"
    assert main(["reduce", "--data", small_pool, "--workers", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--k was not given" in err and "default 600" in err and "n=60" in err and "pass --k" in err.lower()
    assert not out.exists()


def test_plan_without_k_sizes_a_small_pool_instead_of_refusing_the_default(capsys):
    """`--plan 100` without --k was refused with 'got k=600': k is only a memory estimate there."""
    assert main(["reduce", "--plan", "100", "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^\s+tiles: 1$", captured.out, flags=re.MULTILINE), captured.out
    assert re.search(r"^\s+k: 99$", captured.out, flags=re.MULTILINE), captured.out
    assert "--k not given" in captured.err and "default 600" in captured.err


def test_plan_with_an_explicit_k_too_large_is_still_refused(capsys):
    assert main(["reduce", "--plan", "100", "--k", "600"]) == 2
    assert "got k=600" in capsys.readouterr().err
