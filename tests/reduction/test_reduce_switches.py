"""``obliviate reduce --gray`` and ``--aggregate``: SPEC sections 1-2's switches, typed, and recorded in the run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.cli import main
from obliviate.data import load_dataset
from obliviate.defaults import DEFAULT_AGGREGATE, DEFAULT_GRAY
from obliviate.reduction.drmi import drmi_reduce
from obliviate.reduction.mi import mi_matrix


@pytest.fixture
def colour_pool(tmp_path):
    """16 colour 8x8 images whose channels differ, so luma and mean give different gray images."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "colour.npz"
    np.savez(path, images=images, labels=np.arange(16) % 4)
    return str(path)


def _summary(out) -> dict:
    [folder] = [p for p in out.iterdir() if p.name.startswith("reduce-")]
    return json.loads((folder / "summary.json").read_text()) | {"folder": folder.name}


def test_the_defaults_are_the_libraries_defaults():
    from obliviate.data import GrayMode
    from obliviate.reduction.drmi import Aggregate

    assert GrayMode(DEFAULT_GRAY) is GrayMode.LUMA and Aggregate(DEFAULT_AGGREGATE) is Aggregate.SUM


def test_help_names_both_switches_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["reduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--gray {luma,mean}" in text and f"(default {DEFAULT_GRAY})" in text
    assert "--aggregate {sum,max}" in text and f"(default {DEFAULT_AGGREGATE})" in text


@pytest.mark.parametrize("mode", ["luma", "mean"])
def test_gray_mode_is_used_and_recorded(colour_pool, tmp_path, capsys, mode):
    out = tmp_path / mode
    assert main(["reduce", "--data", colour_pool, "--k", "4", "--workers", "0", "--gray", mode, "--out", str(out)]) == 0
    summary = _summary(out)
    data = load_dataset(colour_pool, gray=mode)
    assert summary["gray"] == mode and summary["aggregate"] == "sum"
    assert summary["fingerprint"] == data.fingerprint
    assert summary["h"] == drmi_reduce(mi_matrix(data.images, levels=data.levels), k=4).h


def test_without_the_switches_the_run_records_the_defaults(colour_pool, tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["reduce", "--data", colour_pool, "--k", "4", "--workers", "0", "--out", str(out)]) == 0
    summary = _summary(out)
    assert (summary["gray"], summary["aggregate"]) == (DEFAULT_GRAY, DEFAULT_AGGREGATE)
    assert summary["fingerprint"] == load_dataset(colour_pool).fingerprint
    assert not summary["folder"].endswith("-gmax")


def test_aggregate_max_is_used_recorded_and_kept_apart_from_sum(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["reduce", "--data", "digits", "--k", "6", "--starts", "8", "--workers", "0", "--out", str(out)]
    assert main([*base, "--aggregate", "max"]) == 0
    assert main(base) == 0
    folders = {p.name: p for p in out.iterdir() if p.name.startswith("reduce-")}
    [maxed] = [name for name in folders if name.endswith("-gmax")]
    assert len(folders) == 2
    summary = json.loads((folders[maxed] / "summary.json").read_text())
    assert summary["aggregate"] == "max"
    data = load_dataset("digits")
    expected = drmi_reduce(
        mi_matrix(data.images, levels=data.levels), k=6, num_starts=8, rng=np.random.default_rng(0), aggregate="max"
    )
    assert summary["h"] == expected.h
    assert np.array_equal(np.load(folders[maxed] / "subset.npy"), expected.subset)


@pytest.mark.parametrize(("flag", "value"), [("--gray", "average"), ("--aggregate", "min")])
def test_an_unknown_value_is_refused_naming_the_choices(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        main(["reduce", "--data", "digits", "--k", "4", "--workers", "0", flag, value, "--out", str(out)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err
    assert not out.exists()


@pytest.fixture
def shared_prefect_api(prefect_harness, monkeypatch):
    """The harness's server as a user's ``PREFECT_API_URL``: the command uses it instead of starting its own."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    return PREFECT_API_URL.value()


@pytest.mark.slow
def test_the_ray_path_uses_and_records_both_switches(ray_runtime, shared_prefect_api, colour_pool, tmp_path, capsys):
    """``reduce --workers 1 --gray mean --aggregate max``: the flow on Ray loads, greedily folds and records as asked."""
    out = tmp_path / "o"
    options = ["--k", "4", "--workers", "1", "--gray", "mean", "--aggregate", "max", "--out", str(out)]
    assert main(["reduce", "--data", colour_pool, *options]) == 0
    assert f"Prefect API: {shared_prefect_api}" in capsys.readouterr().err  # the Ray flow ran, not the in-process path
    summary = _summary(out)
    folder = out / summary["folder"]

    mean = load_dataset(colour_pool, gray="mean")
    luma = load_dataset(colour_pool, gray=DEFAULT_GRAY)
    asked = drmi_reduce(mi_matrix(mean.images, levels=mean.levels), k=4, aggregate="max")
    mean_summed = drmi_reduce(mi_matrix(mean.images, levels=mean.levels), k=4, aggregate=DEFAULT_AGGREGATE)
    defaults = drmi_reduce(mi_matrix(luma.images, levels=luma.levels), k=4, aggregate=DEFAULT_AGGREGATE)
    # This pool tells the switches apart: luma and mean choose other subsets; max and sum start restarts elsewhere.
    assert defaults.h != asked.h and not np.array_equal(np.sort(defaults.subset), np.sort(asked.subset))
    assert [r.h_greedy for r in mean_summed.restarts] != [r.h_greedy for r in asked.restarts]

    assert (summary["gray"], summary["aggregate"]) == ("mean", "max") and summary["workers"] == 1
    assert summary["fingerprint"] == mean.fingerprint != luma.fingerprint
    assert summary["folder"].endswith("-gmax")
    assert summary["h"] == asked.h
    assert np.array_equal(np.load(folder / "subset.npy"), asked.subset)
    restarts = json.loads((folder / "restarts.json").read_text())
    assert [r["h_greedy"] for r in restarts] == [r.h_greedy for r in asked.restarts]


def test_result_keys_keep_sum_names_and_mark_max():
    from flows.reduce import result_key

    plain = result_key(fingerprint="ab", bins=256, normalize=False, k=5, starts=None, seed=0)
    assert plain == "reduce-ab-b256-k5"
    assert result_key(fingerprint="ab", bins=256, normalize=False, k=5, starts=None, seed=0, aggregate="sum") == plain
    assert result_key(fingerprint="ab", bins=256, normalize=False, k=5, starts=None, seed=0, aggregate="max") == (
        "reduce-ab-b256-k5-gmax"
    )
