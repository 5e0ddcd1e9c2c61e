"""What ``obliviate reduce --plan`` says a streaming restart worker holds is what it holds: an LRU cache of
single rows (storage.tiles.TiledRows) in the budget the flow gives it, not row bands; the docs quote it."""

from __future__ import annotations

from pathlib import Path

from flows.reduce import restart_memory_bytes
from obliviate.reduction.tiling import TilePlan, plan_report

ROOT = Path(__file__).resolve().parents[2]


def test_streaming_restart_worker_is_its_row_cache_plus_a_few_rows() -> None:
    report = plan_report(n=60_000, tile_size=2048, k=600, workers=16)
    cache = restart_memory_bytes(TilePlan(n=60_000, tile_size=2048), k=600, limit_mb=None)
    assert report["row_cache_bytes"] == cache  # the flow's default budget for TiledRows at this size
    assert report["row_cache_rows"] == cache // (60_000 * 4) == 2048
    assert "band_bytes" not in report  # no band is held by a streaming restart worker
    # the cache, the diagonal, the row being assembled and O(n) sums: no second band on top (was 0.984 GB)
    assert cache < report["restart_worker_streaming_bytes"] < cache + 2_000_000


def test_docs_quote_the_row_cache() -> None:
    report = plan_report(n=60_000, tile_size=2048, k=600, workers=16)
    scaling = " ".join((ROOT / "docs" / "scaling.md").read_text().split())
    assert f"{report['restart_worker_streaming_bytes'] / 1e9:.3f} GB" in scaling
    assert f"{report['row_cache_rows']:,} rows of 60,000 floats" in scaling
    assert "band cache" not in scaling
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "streamed row bands" not in readme and "LRU cache of single rows" in readme
