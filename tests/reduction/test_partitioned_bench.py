"""bench/partitioned.py, which docs/scaling.md names as the check to run with more parts, takes its options."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "partitioned.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_partitioned", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_are_the_recorded_run(bench) -> None:
    args = bench.parse_args([])
    assert (args.data, args.parts, args.seeds, args.k) == ("mnist5k", [2, 4, 8], 3, 600)
    assert args.out == ROOT / "bench" / "results" / "partitioned.json"


def test_options_are_read_and_unknown_ones_refused(bench, capsys) -> None:
    args = bench.parse_args(["--parts", "16", "32", "--data", "digits", "--out", "/tmp/x.json"])
    assert (args.parts, args.data, args.out) == ([16, 32], "digits", Path("/tmp/x.json"))
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--parts", "2", "--bogus"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "0"])


def test_a_tiny_run_writes_where_out_says(bench, tmp_path) -> None:
    out = tmp_path / "partitioned.json"
    bench.main(["--data", "digits", "--parts", "2", "--seeds", "1", "--k", "10", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["data"] == "digits" and result["k"] == 10 and [r["parts"] for r in result["runs"]] == [2]
    assert result["headline"][0]["metric"] == "worst H ratio partitioned/exact (m in 2; 1 seed)"


def test_the_command_docs_scaling_suggests_parses(bench) -> None:
    doc = " ".join((ROOT / "docs" / "scaling.md").read_text().split())
    command = doc.split("`bench/partitioned.py` is the check to run with more parts (`", 1)[1].split("`", 1)[0]
    args = bench.parse_args(command.replace("<pool.npz>", "pool.npz").replace("<file>", "/tmp/p.json").split())
    assert args.parts == [16, 32] and args.data == "pool.npz"
    assert "`obliviate reduce` has no switch for it" in doc
