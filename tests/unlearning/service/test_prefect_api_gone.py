"""A command whose Prefect API does not answer (an `obliviate ui` server that went away meanwhile, or a dead
PREFECT_API_URL) ended with a 100-line `httpx.ConnectError` traceback (`obliviate verify`, after 79 s).
Now it says so in one line, exit 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from actors.chains import ChainWorker
from flows.runtime import PrefectUnavailable, prefect_api
from flows.train import run_spec
from storage import ObjectStore

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def dead_api_url() -> str:
    with socket.socket() as sock:  # a port nothing listens on any more
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api"


def test_a_connection_error_from_an_api_that_does_not_answer_is_one_sentence(dead_api_url, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", dead_api_url)
    must_answer = r"the Prefect API at http://127\.0\.0\.1:\d+/api must answer"
    with pytest.raises(PrefectUnavailable, match=must_answer), prefect_api():
        raise RuntimeError(f"Failed to reach API at {dead_api_url}/") from httpx.ConnectError("refused")
    with pytest.raises(ValueError, match="not about the API"), prefect_api():  # anything else goes on as it was
        raise ValueError("not about the API")


def test_verify_against_a_dead_prefect_api_says_one_line(tmp_path, tiny_run, dead_api_url):
    url = f"file://{tmp_path / 'store'}"
    ObjectStore(url).ensure_container()
    ChainWorker(url).train(run_spec(run_id="v-run", **tiny_run(split_seed=0)))
    env = {**os.environ, "PREFECT_API_URL": dead_api_url, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "verify", "--store", url, "--run", "v-run", "--blocks", "4"],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("obliviate verify: error:")]
    assert len(errors) == 1 and f"the Prefect API at {dead_api_url} must answer" in errors[0], done.stderr[-3000:]
    assert "ConnectError" in errors[0] and "PREFECT_API_URL" in errors[0]
