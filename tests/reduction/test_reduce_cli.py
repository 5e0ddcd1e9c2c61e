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


@pytest.mark.parametrize(
    ("option", "value", "said"),
    [
        (
            "--tile-size",
            "0",
            ["--tile-size must be at least 32", "got 0", "default 512"],
        ),  # 'tile_size must be positive'
        ("--tile-size", "1", ["--tile-size must be at least 32", "got 1"]),  # accepted: 1.6 M tiles for 1,797 images
        ("--starts", "0", ["--starts must be in 1..1797", "got 0", "leave --starts unset"]),  # 'num_starts must be'
        ("--starts", "5000", ["--starts must be in 1..1797", "got 5000"]),
        ("--restart-memory-mb", "0", ["--restart-memory-mb is the MiB", "got 0.0"]),  # 'restart_memory_mb is'
    ],
)
def test_a_bad_option_is_refused_by_its_flag_name_with_the_fix(tmp_path, capsys, option, value, said):
    out = tmp_path / "out"
    assert main(["reduce", "--data", "digits", "--k", "10", option, value, "--workers", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in said), err
    assert "tile_size" not in err and "num_starts" not in err and "restart_memory_mb" not in err
    assert not out.exists()


def test_plan_refuses_a_tile_size_of_one(capsys):
    """`--plan 1797 --tile-size 1` planned 1.6 M tiles (3.2 M store objects) without a word."""
    assert main(["reduce", "--plan", "1797", "--k", "10", "--tile-size", "1"]) == 2
    assert "--tile-size must be at least 32" in capsys.readouterr().err


def test_a_run_of_too_many_tiles_names_the_smallest_tile_size_that_fits():
    from flows.reduce import MAX_RUN_TILES, check_tile_size
    from obliviate.errors import ConfigError
    from obliviate.reduction.tiling import TilePlan

    with pytest.raises(ConfigError, match=r"--tile-size 32 cuts 60,000 images into 1,758,750 tiles") as refused:
        check_tile_size(32, n=60_000)
    smallest = int(re.search(r"--tile-size to at least (\d+)", str(refused.value)).group(1))
    assert TilePlan(n=60_000, tile_size=smallest).num_tiles <= MAX_RUN_TILES
    assert TilePlan(n=60_000, tile_size=smallest - 1).num_tiles > MAX_RUN_TILES
    check_tile_size(2048, n=60_000)  # the README's plan


def test_in_process_run_reports_restart_progress(tmp_path, capsys):
    """--workers 0 showed the 'MI tiles' bar, then nothing during every restart."""
    from flows.progress import progress_to

    seen: list[tuple[str, int, int]] = []
    with progress_to(lambda stage, done, total: seen.append((stage, done, total))):
        code = main(["reduce", "--data", "digits", "--k", "10", "--workers", "0", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    restarts = [event for event in seen if event[0] == "restarts"]
    assert restarts[-1] == ("restarts", 1797, 1797) and len(restarts) > 1
    assert any(stage == "MI tiles" and done == total for stage, done, total in seen)


@pytest.mark.parametrize("bins", ["17", "32"])
def test_bins_at_or_above_the_datas_levels_are_the_exact_default(tmp_path, capsys, bins):
    """digits has 17 gray levels: --bins 32 warned of '+5.1 % worse' and stored a second copy under -b32-."""
    options = ["reduce", "--data", "digits", "--k", "10", "--starts", "5", "--workers", "0", "--out", str(tmp_path)]
    assert main(options) == 0
    default = capsys.readouterr()
    assert main([*options, "--bins", bins]) == 0
    asked = capsys.readouterr()
    assert "ranks pairs differently" not in asked.err
    assert f"--bins {bins} is at least the 17 gray levels" in asked.err and "default" in asked.err
    assert asked.out.splitlines()[0] == default.out.splitlines()[0]  # the same H line
    results = [path.name for path in tmp_path.iterdir() if path.name.startswith("reduce-")]
    assert len(results) == 1 and "-b256-k10-" in results[0]  # one folder, the default's


def test_bins_below_the_datas_levels_are_compared_with_its_levels(tmp_path, capsys):
    options = ["reduce", "--data", "digits", "--k", "10", "--starts", "5", "--workers", "0", "--bins", "8"]
    assert main([*options, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "MI at 8 bins ranks pairs differently from exact counting of this data's 17 gray levels" in err
    assert "256 levels" not in err
    assert any("-b8-k10-" in path.name for path in tmp_path.iterdir())


@pytest.mark.parametrize("stage", ["MI tiles", "restarts"])
def test_ctrl_c_in_process_says_nothing_was_stored(tmp_path, capsys, stage):
    """--workers 0 stores nothing before the end, but a Ctrl-C said a rerun 'resumes from whatever it had stored'."""
    from flows.cli import EXIT_INTERRUPTED
    from flows.progress import progress_to

    def interrupt(reported: str, done: int, total: int) -> None:
        if reported == stage:  # a Ctrl-C arrives as KeyboardInterrupt wherever the main thread is
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with progress_to(interrupt):
        code = main(["reduce", "--data", "digits", "--k", "10", "--workers", "0", "--out", str(out)])
    assert code == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted" in err and "stores nothing until" in err and "starts over" in err
    assert "resumes from whatever it had stored" not in err
    assert not [path for path in out.iterdir() if path.name.startswith("reduce-")]


def test_the_readme_names_result_folders_as_they_are_written(tmp_path, capsys):
    """The README said `reduce-<fingerprint>-b<bins>-k<k>/`; folders carry `n` and `-s<starts>-seed<seed>` too."""
    from pathlib import Path

    from flows.reduce import result_key

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    pattern = re.search(r"`<store>/(reduce-[^`]+)/`", readme).group(1)
    regex = re.escape(pattern).replace(re.escape("<fingerprint>"), "[0-9a-f]+")
    for field in ("bins", "k", "starts", "seed"):
        regex = regex.replace(re.escape(f"<{field}>"), r"\d+")
    regex = regex.replace(re.escape("[n]"), "n?").replace(r"\[", "(?:").replace(r"\]", ")?")
    for normalize in (False, True):
        for starts in (None, 100):
            key = result_key(fingerprint="ec49a20e6fc73398", bins=256, normalize=normalize, k=50, starts=starts, seed=0)
            assert re.fullmatch(regex, key), (pattern, key)
    example = re.search(r"`(reduce-[0-9a-f]+-[^`]+)/` for digits with `--k 50 --starts 100`", readme).group(1)
    options = ["--data", "digits", "--k", "50", "--starts", "100", "--workers", "0", "--out", str(tmp_path)]
    assert main(["reduce", *options]) == 0
    assert (tmp_path / example / "summary.json").exists()


def test_an_out_that_is_a_file_is_named_as_out(tmp_path, capsys):
    """`reduce --out /etc/passwd` said "Check --store / $OBLIVIATE_STORE", options the user had not given."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["reduce", "--data", "digits", "--k", "5", "--workers", "0", "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert f"store file://{afile} is a file; a store is a folder (or an S3 bucket and prefix). Check --out." in err
