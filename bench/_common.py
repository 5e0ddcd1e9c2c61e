"""Shared helpers for benchmark scripts: machine description and the result file format."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
    }


def headline(metric: str, value: float, *, target: float | None, better: str, unit: str, peer: str) -> dict:
    return {"metric": metric, "value": value, "target": target, "better": better, "unit": unit, "peer": peer}


def write_result(name: str, *, headlines: list[dict], data: dict[str, Any], started: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = dict(started)
    started["load_average_at_end"] = list(os.getloadavg())
    payload = {
        "headline": headlines,
        "machine": started,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
