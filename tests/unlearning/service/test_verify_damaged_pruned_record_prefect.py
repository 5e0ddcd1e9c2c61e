"""`obliviate verify --version N` run with Prefect (no ``--no-prefect``) when the run's pruned record is damaged.

19f78b9 made such a past version replay (exit 0 when its proof holds) with a note naming the damaged record and its
mend, and tested it with ``--no-prefect``, checking the artifact's text through the function that builds it. Here the
command runs as a user's does (a child process, a real ``prefect server start`` named by ``PREFECT_API_URL``): the
exit code, the report under ``ledger/verifications/`` and the markdown artifact the flow run left on the Prefect
server, read back through Prefect's client.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import ObjectStore

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


def _damaged_store(url: str, tiny_run) -> str:
    """r1 with v1 pruned, v2 whole, v3 current and its pruned record damaged (test_verify_damaged_pruned_record)."""
    from tests.unlearning.service.test_verify_damaged_pruned_record import _three_versions_pruned_record_damaged

    return _three_versions_pruned_record_damaged(url, tiny_run)


def _flow_run_artifacts(flow_run_id: str) -> list:
    """The artifacts the Prefect server holds for one flow run (created before the flow run ended)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    only = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        return list(client.read_artifacts(artifact_filter=only))


def _verify_flow_run_id(started_after: float) -> str:
    """The id of the one ``verify`` flow run the server holds that started after ``started_after`` (epoch s)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["verify"])))
    ours = [run for run in runs if run.start_time is not None and run.start_time.timestamp() >= started_after]
    assert len(ours) == 1, [(run.id, run.name, run.start_time) for run in runs]
    return str(ours[0].id)


def test_verify_with_prefect_of_a_whole_past_version_passes_and_its_artifact_names_the_damaged_record(
    store_url, tiny_run, prefect_api_url
) -> None:
    key = _damaged_store(store_url, tiny_run)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url}
    started = time.time() - 1  # the server's clock is this machine's
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "verify", "--store", store_url, "--run", "r1", "--version", "2"]
        + ["--blocks", "3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    err = done.stderr
    assert done.returncode == 0, err[-4000:]  # the proof holds: the damaged record changes no exit code
    assert "Traceback" not in err, err[-4000:]
    assert "verify r1 v2: passed; 1/1 replayed blocks bit-identical" in err, err[-4000:]
    record_url = f"{store_url}/{key}"
    assert "  note: the pruned record of run r1 (which of its versions retention or a purge deleted the " in err
    assert f"{record_url}) cannot be read: " in err, err[-4000:]

    # the ledger's record of this verification, read back from the store
    report = re.search(r"^  report: (\S+)$", err, flags=re.MULTILINE)
    assert report, err[-4000:]
    report_key = report[1].removeprefix(store_url + "/")
    assert report_key.startswith("ledger/verifications/r1-v000002-"), report_key
    recorded = ObjectStore(store_url).get_json(report_key)
    assert recorded["status"] == "passed" and recorded["problems"] == [], recorded
    assert recorded["records_damaged"] == [key] and "records_unreadable" not in recorded, recorded
    (note,) = recorded["notes"]
    assert record_url in note and "fails its checksum; it was damaged" in note, note
    assert "restore it from a backup (`obliviate store check` reports it too)" in note, note
    assert json.loads(done.stdout.strip().splitlines()[-1])["report"] == report[1]

    # the artifact the flow run created on the Prefect server (what its UI shows), read back from the server
    artifacts = _flow_run_artifacts(_verify_flow_run_id(started))
    assert [a.key for a in artifacts] == ["verify-r1"], [(a.key, a.type) for a in artifacts]
    (artifact,) = artifacts
    assert artifact.type == "markdown", artifact.type
    text = str(artifact.data)
    assert "# verify r1 v2: **passed**" in text, text
    notes = [line for line in text.splitlines() if line.startswith("- note: ")]
    assert len(notes) == 1 and notes[0] == f"- note: {note}", (notes, note)  # the record's URL and its mend
    assert not any(line.startswith("- problem: ") for line in text.splitlines()), text
