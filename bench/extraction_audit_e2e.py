"""The whole default audit of one model, timed end to end through the command line (issue 13).

Runs exactly what a user runs, with every other option at its default:
``obliviate target train --data mnist5k`` then ``obliviate steal --target T --pool mnist5k
--budgets 50,150,200,300,600`` (the default attacker, selector and seeds), in a fresh HOME (its own Prefect database; the steal
command starts its own Prefect server and local Ray, as on a fresh machine). Records the wall
time of each command, the load average around them, and writes
``bench/results/extraction/default_audit_e2e.json``; the "whole default audit ... measured end to
end" entry of ``bench/results/extraction.json``'s headline is replaced by this measurement.

Usage: ``python bench/extraction_audit_e2e.py`` on a quiet machine (it measures wall time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine
from obliviate.extraction.audit import DEFAULT_SEEDS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BUDGETS = "50,150,200,300,600"
METRIC = f"whole default audit of one model (5 budgets x {DEFAULT_SEEDS} seeds on 2 cores), measured end to end"


def timed(command: list[str], *, env: dict[str, str], cwd: Path) -> float:
    began = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> int:
    cli = str(Path(sys.executable).with_name("obliviate"))
    with tempfile.TemporaryDirectory(prefix="audit-e2e-") as scratch:
        work = Path(scratch)
        env = {**os.environ, "HOME": str(work / "home")}
        env.pop("PREFECT_API_URL", None)
        (work / "home").mkdir()
        load_before = os.getloadavg()
        train_s = timed([cli, "target", "train", "--data", "mnist5k", "--out", "target.pt"], env=env, cwd=work)
        steal = [cli, "steal", "--target", "target.pt", "--pool", "mnist5k", "--budgets", BUDGETS]
        steal_s = timed([*steal, "--out", "steal"], env=env, cwd=work)
        load_after = os.getloadavg()
        lead = (work / "steal" / "steal.md").read_text().splitlines()[:6]
    result = {
        "commands": [
            "obliviate target train --data mnist5k --out target.pt",
            "obliviate " + " ".join(steal[1:]) + " --out steal",
        ],
        "target_train_seconds": round(train_s, 1),
        "steal_seconds": round(steal_s, 1),
        "total_minutes": round((train_s + steal_s) / 60, 2),
        "load_before": load_before,
        "load_after": load_after,
        "steal_md_lead": lead,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
    }
    (RESULTS / "extraction" / "default_audit_e2e.json").write_text(json.dumps(result, indent=2) + "\n")
    summary_path = RESULTS / "extraction.json"
    summary = json.loads(summary_path.read_text())
    entry = {
        "metric": METRIC,
        "value": round(steal_s / 60, 2),
        "target": 15,
        "better": "lower",
        "unit": "minutes",
        "peer": (
            f"target training before it {train_s:.0f} s; loads {load_before[0]:.1f} -> {load_after[0]:.1f}; "
            "command: bench/extraction_audit_e2e.py"
        ),
    }
    summary["headline"] = [h for h in summary["headline"] if not h["metric"].startswith(METRIC)] + [entry]
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
