"""docs/unlearning.md's headline table quotes bench/results/deletion_stream.json at the table's rounding."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_local_epochs_row_quotes_deletion_stream_json() -> None:
    doc = (ROOT / "docs" / "unlearning.md").read_text()
    headlines = json.loads((ROOT / "bench" / "results" / "deletion_stream.json").read_text())["headline"]
    value = next(h["value"] for h in headlines if "E = 10 local epochs" in h["metric"])
    row = next(line for line in doc.splitlines() if line.startswith("| same, E = 10 local epochs"))
    assert f"| {value:.2f} |" in row, (value, row)
