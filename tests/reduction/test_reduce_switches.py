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


def test_the_ray_path_gets_both_switches(monkeypatch, colour_pool, tmp_path, capsys):
    """The CLI hands --gray and --aggregate to the reduce flow (stopped at its load, before Ray)."""
    import flows.reduce as flow_module

    seen = {}

    class Stop(Exception):
        pass

    def fake_flow(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(flow_module, "reduce_flow", fake_flow)
    monkeypatch.setattr("flows.runtime.ensure_ray", lambda **_: None)
    monkeypatch.setattr("flows.runtime.apply_prefect_defaults", lambda: None)

    from contextlib import contextmanager

    @contextmanager
    def no_server():
        yield "http://test"

    monkeypatch.setattr("flows.runtime.prefect_api", no_server)
    options = ["--k", "4", "--workers", "1", "--gray", "mean", "--aggregate", "max", "--out", str(tmp_path / "o")]
    with pytest.raises(Stop):
        from flows.cli import parse_args
        from flows.cli.reduce import run_reduce_flow

        run_reduce_flow(parse_args(["reduce", "--data", colour_pool, *options]))
    assert seen["gray"] == "mean" and seen["aggregate"] == "max"


def test_the_flow_loads_the_data_with_its_gray_mode(monkeypatch, colour_pool):
    import flows.reduce as flow_module

    seen = {}

    class Stop(Exception):
        pass

    def fake_load(data, *, gray):
        seen["gray"] = gray
        raise Stop

    monkeypatch.setattr(flow_module, "load_dataset", fake_load)
    monkeypatch.setattr(flow_module, "get_run_logger", lambda: None)
    with pytest.raises(Stop):
        flow_module.reduce_flow.fn(data=colour_pool, k=4, gray="mean", aggregate="max")
    assert seen["gray"] == "mean"


def test_result_keys_keep_sum_names_and_mark_max():
    from flows.reduce import result_key

    plain = result_key(fingerprint="ab", bins=256, normalize=False, k=5, starts=None, seed=0)
    assert plain == "reduce-ab-b256-k5"
    assert result_key(fingerprint="ab", bins=256, normalize=False, k=5, starts=None, seed=0, aggregate="sum") == plain
    assert result_key(fingerprint="ab", bins=256, normalize=False, k=5, starts=None, seed=0, aggregate="max") == (
        "reduce-ab-b256-k5-gmax"
    )
