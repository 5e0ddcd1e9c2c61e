"""The Prefect dashboard every flow log links to works (issue 15).

A real browser (headless Chromium from Debian's ``chromium`` package, installed by ``make test``)
loads the UI of a Prefect server started the way the commands start it, and of ``obliviate ui``
after the command exited; the rendered DOM must show the flow run and the artifact's table rows.
A screenshot of the artifact page is left in the test's temporary folder for a person to look at.
The artifact builders are checked on real ledger records without a server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.artifacts import as_url, describe, ledger_markdown, pass_rows, publish_table, unlearning_rows
from storage.ledger import CLAIMED, DONE, DeletionLedger
from storage.objects import ObjectStore

REPO = Path(__file__).resolve().parents[1]
RUN_NAME = "dashboard-check-run"
ROWS = [
    {"selector": "drmi-row-alpha", "budget": 50, "accuracy %": "82.27"},
    {"selector": "random-row-beta", "budget": 150, "accuracy %": "91.50"},
]


def render_showing(url: str, tmp_path: Path, expected: list[str], *, name: str, attempts: int = 3) -> str:
    """The DOM of ``url`` once it shows every ``expected`` text (saved as ``name``.html for a person).

    The UI fetches its data after the page loaded; on a loaded machine one virtual-time budget can
    end before the data arrived, so the page is rendered again (a fresh browser) up to ``attempts`` times.
    """
    for attempt in range(1, attempts + 1):
        dom = render(url, tmp_path)
        (tmp_path / f"{name}-{attempt}.html").write_text(dom)
        if all(text in dom for text in expected):
            return dom
    return dom


def render(url: str, tmp_path: Path, *, screenshot: Path | None = None) -> str:
    """The DOM of ``url`` after Chromium ran its scripts (or, with ``screenshot``, a PNG of it)."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's `chromium` is missing: `make test` installs it (apt-get install -y chromium)."
    command = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",  # narrower, and the runs list hides its rows
        "--virtual-time-budget=30000",
        f"--screenshot={screenshot}" if screenshot else "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def read_line(path: Path, prefix: str, process: subprocess.Popen, *, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        assert process.poll() is None, f"obliviate ui exited with {process.returncode}"
        time.sleep(0.5)
    raise AssertionError(f"no {prefix!r} line after {timeout} s")


@pytest.mark.slow
def test_dashboard_shows_flow_runs_and_artifacts_in_a_real_browser(tmp_path, monkeypatch):
    from prefect import flow

    from flows.runtime import is_healthy, prefect_api, ui_url_of

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # ~/.obliviate/prefect, the database the commands share
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    report = tmp_path / "report.json"
    report.write_text("{}")

    @flow(name="dashboard-check")
    def make_artifact() -> str:
        return str(
            publish_table(
                key="dashboard-check",
                title="Dashboard check title",
                rows=ROWS,
                lines=["Rates are percent."],
                links={"report": str(report)},
            )
        )

    # 1. A command's embedded server: its UI calls its own API, so the flow run shows.
    with prefect_api(startup_timeout=180) as api_url:  # 15 s on an idle machine
        ui = ui_url_of(api_url)
        artifact_id = make_artifact.with_options(flow_run_name=RUN_NAME)()
        runs = render_showing(f"{ui}/runs", tmp_path, [RUN_NAME], name="runs")
        assert RUN_NAME in runs and "Something went wrong" not in runs, f"see {tmp_path}/runs-*.html"
        assert get_json(f"{ui}/ui-settings")["api_url"] == api_url
    assert not is_healthy(api_url)

    # 2. After the command exited: `obliviate ui` on the same database shows the run and the artifact.
    out, err = tmp_path / "ui.out", tmp_path / "ui.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "ui", "--port", "0"],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=stdout,
            stderr=stderr,
        )
    try:
        ui = read_line(out, "Prefect dashboard:", process, timeout=240)
        with prefect_api() as reused:  # a command run meanwhile uses this server: its links stay live
            assert reused == f"{ui}/api"
        assert is_healthy(f"{ui}/api")
        page = f"{ui}/artifacts/artifact/{artifact_id}"
        expected = ["Dashboard check title", "drmi-row-alpha", "random-row-beta", "accuracy %", RUN_NAME]
        dom = render_showing(page, tmp_path, expected, name="artifact")
        for text in expected:
            assert text in dom, f"{text!r} not in the rendered artifact page; see {tmp_path}/artifact-*.html"
        assert as_url(str(report)) in dom
        screenshot = tmp_path / "artifact-page.png"
        render(page, tmp_path, screenshot=screenshot)
        assert screenshot.stat().st_size > 10_000
        print(f"screenshot of {page}: {screenshot}")
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    assert code == 0, err.read_text()[-3000:]
    assert "Traceback" not in err.read_text() and "stopped" in err.read_text()
    assert not (home / ".obliviate" / "prefect" / "ui-server.json").exists()


def test_unlearning_record_and_ledger_entry_read_well(tmp_path):
    store = ObjectStore(f"file://{tmp_path}/store")
    ledger = DeletionLedger(store)
    ledger.append(request_id="req-1", ids=[3, 5], dataset="digits", reason="user asked")
    ledger.transition("req-1", status=CLAIMED, details={"holder": "test"}, allowed_from=("pending",))
    audit = {
        "status": "published",
        "policy": "exact",
        "from_version": 1,
        "to_version": 2,
        "deleted_ids": [3, 5],
        "blocks_retrained": [2, 3],
        "retrain_seconds": 1.5,
        "wall_seconds": 2.0,
        "speedup_vs_full_retrain": 2.4,
        "theoretical_speedup": 1.33,
        "previous_heldout_accuracy": 0.9,
        "heldout_accuracy": 0.905,
        "verification": {"consistency_with_naive": 1.0, "noise_floor_consistency": 0.99},
    }
    ledger.transition(
        "req-1", status=DONE, details={"runs": {"run-a": audit}, "finished_at": time.time()}, allowed_from=(CLAIMED,)
    )
    entry = ledger.get("req-1").as_dict()

    (row,) = unlearning_rows(entry["details"]["runs"])
    assert row["version"] == "1 → 2" and row["blocks retrained"] == 2 and row["ids forgotten"] == 2
    assert row["speed-up (×)"] == "2.40" and row["seed's speed-up, MNIST (×)"] == 66.7
    assert row["held-out acc before → after (%)"] == "90.00 → 90.50"
    assert row["agreement with naive retrain (noise floor) (%)"] == "100.00 (99.00)"

    markdown = ledger_markdown(entry, ledger.history("req-1"))
    assert "| status | **done** |" in markdown and "| ids | 3, 5 |" in markdown
    for version, status in enumerate(("pending", "claimed", "done"), start=1):
        assert f"| {version} | {status} | 20" in markdown  # the status history, with UTC times
    assert "no run trained on" not in markdown  # every id was trained on

    # a request whose ids were held out of every run: done with no run changed, and the entry says why
    ledger.append(request_id="req-2", ids=[7, 9], dataset="digits", reason="user asked")
    ledger.transition("req-2", status=CLAIMED, details={"holder": "test"}, allowed_from=("pending",))
    ledger.transition("req-2", status=DONE, details={"runs": {}, "not_trained_on": [7, 9]}, allowed_from=(CLAIMED,))
    held_out = ledger.get("req-2").as_dict()
    markdown = ledger_markdown(held_out, ledger.history("req-2"))
    assert "| ids no run trained on (left out of every later training) | 7, 9 |" in markdown, markdown
    assert [row["ids no run trained on"] for row in pass_rows([entry, held_out])] == [0, 2]

    text = describe(title="Unlearning record", lines=["one", ""], links={"ledger": store.uri("ledger")})
    assert text.startswith("# Unlearning record\n\none\n\n**Full reports:**\n\n- [ledger](file://")
    assert as_url("relative/report.md") == (Path.cwd() / "relative" / "report.md").as_uri()
