"""Stored tiles reassemble the in-process MI matrix exactly; restart workers match drmi_reduce."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from actors.reduction import ReductionWorker
from obliviate.data import load_dataset
from obliviate.errors import ConfigError
from obliviate.reduction.drmi import drmi_reduce
from obliviate.reduction.mi import mi_matrix, prepare_images
from obliviate.reduction.tiling import TilePlan, plan_report
from storage.tiles import DIAGONAL, PLAN, TiledMatrix, TiledRows, matrix_prefix, stored_tiles, tile_key


@pytest.fixture(scope="module")
def digits_pool():
    data = load_dataset("digits")
    return data.subset(np.arange(0, 1797, 9)[:190])  # 190 real 8x8 digits


def _write_tiles(store, data, *, tile_size, normalize=False):
    plan = TilePlan(n=len(data), tile_size=tile_size)
    prefix = matrix_prefix(fingerprint=data.fingerprint, bins=256, normalize=normalize, tile_size=tile_size)
    worker = ReductionWorker()
    worker.use_images("pool", prepare_images(data.images, levels=data.levels, bins=256))
    store.put_array(f"{prefix}/{DIAGONAL}", worker.diagonal(normalize=normalize))
    store.put_json(f"{prefix}/{PLAN}", {"n": plan.n, "tile_size": plan.tile_size})
    for tile in plan.tiles():
        out = worker.compute(tile, key="pool", store=store, prefix=prefix, normalize=normalize, return_values=False)
        assert out["values"] is None and out["bytes"] > 0
    return plan, prefix


def test_plan_covers_upper_triangle_once():
    plan = TilePlan(n=1000, tile_size=300)
    covered = np.zeros((1000, 1000), dtype=np.int64)
    for tile in plan.tiles():
        covered[tile.row_start : tile.row_stop, tile.col_start : tile.col_stop] += 1
    assert plan.num_tiles == len(plan.tiles()) == 10
    assert np.array_equal(np.triu(covered), np.triu(np.ones_like(covered)))
    assert np.tril(covered, k=-1)[np.tril_indices(1000, k=-1)].max() <= 1  # only diagonal tiles reach below
    assert sum(t.pairs for t in plan.tiles()) == plan.pairs == 1000 * 999 // 2


def test_n60000_is_plannable_without_computing():
    report = plan_report(n=60_000, tile_size=2048, k=600, workers=16)
    assert report["pairs"] == 1_799_970_000
    assert report["dense_matrix_bytes"] == 14_400_000_000
    assert report["tiles"] == 30 * 31 // 2
    assert report["stored_bytes"] < 1.1 * report["dense_matrix_bytes"] / 2 + 30 * 2048 * 2048 * 4
    # A streaming restart worker holds an O(n k) cache of single rows: about 0.49 GB, 3% of the matrix.
    assert report["restart_worker_streaming_bytes"] < report["dense_matrix_bytes"] / 10
    assert report["tile_worker_bytes"] < 200e6
    with pytest.raises(ConfigError):
        TilePlan(n=1, tile_size=10)


@pytest.mark.parametrize(("n", "tile_size"), [(2, 1), (513, 512), (1000, 7), (5000, 512), (4096, 2048)])
def test_stored_bytes_in_closed_form_is_the_sum_over_tiles(n, tile_size):
    plan = TilePlan(n=n, tile_size=tile_size)
    assert plan.stored_bytes == sum(t.shape[0] * t.shape[1] for t in plan.tiles()) * 4


def test_a_plan_for_a_pool_too_large_to_list_its_tiles(capsys):
    """`reduce --plan 100000000` ran for minutes listing 19 billion tiles to sum their sizes."""
    from flows.cli import main

    assert main(["reduce", "--plan", "100000000"]) == 0
    out = capsys.readouterr().out
    assert "tiles: 19,073,681,641" in out and "dense_matrix_bytes: 40,000,000.000 GB" in out


@pytest.mark.parametrize("normalize", [False, True])
def test_stored_tiles_reassemble_mi_matrix_exactly(store, digits_pool, normalize):
    plan, prefix = _write_tiles(store, digits_pool, tile_size=64, normalize=normalize)
    expected = mi_matrix(digits_pool.images, levels=digits_pool.levels, bins=256, normalize=normalize)
    assert stored_tiles(store, prefix, plan) == set(plan.tiles())
    # One band of cache: rows come from evicted and reloaded bands, still bit-identical.
    rows = TiledMatrix(store, prefix, cache_bytes=plan.band_bytes)
    for i in [0, 63, 64, 100, 189, 5]:
        assert np.array_equal(rows.row(i), expected[i])
    assert rows.bands_loaded >= 4
    assert np.array_equal(rows.diagonal(), np.diagonal(expected))
    assert np.array_equal(TiledMatrix(store, prefix, cache_bytes=0).dense(), expected)
    # Single rows (memory-mapped slices on file://, whole tiles on S3), 3 rows of cache.
    single = TiledRows(store, prefix, cache_bytes=3 * plan.n * 4 + (0 if store.is_local else 64 * 64 * 4))
    for i in [0, 63, 64, 100, 189, 5, 0, 64]:
        assert np.array_equal(single.row(i), expected[i])
    assert single.rows_loaded == 8  # 3 rows held: the repeats were evicted and loaded again
    assert np.array_equal(single.diagonal(), np.diagonal(expected))


def test_restart_worker_dense_and_streaming_equal_in_process(file_store, digits_pool):
    plan, prefix = _write_tiles(file_store, digits_pool, tile_size=48)
    matrix = mi_matrix(digits_pool.images, levels=digits_pool.levels)
    expected = drmi_reduce(matrix, k=25, starts=range(0, 190, 7))
    starts = list(range(0, 190, 7))
    worker = ReductionWorker()
    shared = TiledMatrix(file_store, prefix, cache_bytes=0).dense()
    shared.flags.writeable = False  # as a zero-copy read from Ray's object store arrives
    held = worker.use_matrix("m1", shared, store=file_store, prefix=prefix, memory_bytes=plan.dense_bytes)
    dense = worker.run(starts, key="m1", k=25)
    worker.release()
    held_rows = worker.use_matrix("m2", None, store=file_store, prefix=prefix, memory_bytes=2 * plan.band_bytes)
    streaming = worker.run(starts, key="m2", k=25)
    assert held["mode"] == dense["mode"] == "dense"
    assert held_rows["mode"] == streaming["mode"] == "streaming" and streaming["tiles_read"] > 0
    for outcome in (dense, streaming):
        assert outcome["best_h"] == expected.h
        assert np.array_equal(outcome["best_subset"], expected.subset)
        assert [r["h"] for r in outcome["restarts"]] == [r.h for r in expected.restarts]
    with pytest.raises(RuntimeError, match="use_matrix first"):
        worker.run(starts, key="m1", k=25)


def test_damaged_tile_is_refused(file_store, digits_pool):
    from storage import CorruptObject

    plan, prefix = _write_tiles(file_store, digits_pool, tile_size=96)
    path = file_store._path(tile_key(prefix, plan.tiles()[1]))
    with open(path, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x7f")  # a +inf where an MI value was
    with pytest.raises(CorruptObject):
        TiledMatrix(file_store, prefix, cache_bytes=plan.dense_bytes).dense()


def test_cli_plan_for_60000_computes_nothing(capsys):
    from flows.cli import main

    assert main(["reduce", "--plan", "60000", "--tile-size", "2048", "--workers", "16"]) == 0
    out = capsys.readouterr().out
    assert "tiles: 465" in out and "dense_matrix_bytes: 14.400 GB" in out


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        (["--plan", "100", "--k", "600"], "k must satisfy 2 <= k < n=100; got k=600"),  # it printed a plan
        (["--plan", "100", "--k", "6", "--workers", "-3"], "--workers must be 0 (in-process)"),  # 'workers: -3'
        (["--plan", "1000", "--k", "6", "--tile-size", "0"], "--tile-size must be at least 32; got 0"),
        (["--data", "digits", "--k", "5", "--workers", "0", "--tiles-only"], "--tiles-only stops after storing"),
    ],
)
def test_cli_plan_and_tiles_only_follow_the_run_rules(capsys, tmp_path, options, rule):
    from flows.cli import main

    assert main(["reduce", *options, "--out", str(tmp_path / "out")]) == 2
    assert rule in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # --workers 0 --tiles-only ran every restart and stored no tile


def test_cli_plan_without_workers_sizes_for_this_machines_cpus(capsys):
    from flows.cli import main

    assert main(["reduce", "--plan", "5000", "--k", "600"]) == 0  # it planned for 1 worker
    captured = capsys.readouterr()
    cpus = os.cpu_count() or 1
    assert re.search(rf"^\s+workers: {cpus}$", captured.out, flags=re.MULTILINE), captured.out
    assert f"this machine's {cpus} CPUs" in captured.err


def test_a_pool_too_small_for_any_k_says_so():
    from obliviate.reduction.drmi import check_subset_size

    with pytest.raises(ConfigError, match="a pool of n=1 image is too small to reduce"):  # it said "choose a smaller k"
        check_subset_size(2, n=1)
