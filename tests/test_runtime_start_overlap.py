"""A tiny `obliviate train` started its Prefect server, waited for it to answer (about 5 s), and only then started
Ray (another 5 s). Now Ray starts while the server comes up (``prefect_api(while_starting=...)``), and the
processes it starts still inherit the server's ``PREFECT_API_URL``."""

from __future__ import annotations

import os

from flows.runtime import is_healthy, prefect_api


def test_work_given_to_prefect_api_runs_while_its_server_starts_and_sees_its_url(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    seen: list[tuple[str | None, str | None]] = []

    def while_starting() -> None:
        url = os.environ.get("PREFECT_API_URL")
        seen.append((url, None if url is None else str(is_healthy(url))))

    with prefect_api(home=tmp_path / "prefect", while_starting=while_starting) as api_url:
        assert seen == [(api_url, "False")], "the work ran once, pointed at the server, before it answered"
        assert is_healthy(api_url)
    assert "PREFECT_API_URL" not in os.environ


def test_work_given_to_prefect_api_runs_once_with_a_configured_api(monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    calls: list[str | None] = []
    with prefect_api(while_starting=lambda: calls.append(os.environ.get("PREFECT_API_URL"))) as api_url:
        assert api_url == "http://127.0.0.1:9/api"
        assert calls == [api_url]


RAY_WORKER_SEES = """
import os, sys, ray
from flows.runtime import ensure_ray, prefect_api

@ray.remote(num_cpus=0)
def api_url_of_worker():
    return os.environ.get("PREFECT_API_URL")

with prefect_api(home=sys.argv[1], while_starting=lambda: ensure_ray(num_cpus=1)) as api_url:
    print(api_url)
    print(ray.get(api_url_of_worker.remote()))
ray.shutdown()
"""


def test_ray_started_while_the_server_starts_gives_its_workers_the_api_url(tmp_path, child_env, run_python):
    env = child_env("PREFECT_API_URL", "RAY_ADDRESS")
    done = run_python(RAY_WORKER_SEES, str(tmp_path / "prefect"), env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    api_url, worker_url = done.stdout.split()[-2:]
    assert api_url.startswith("http://127.0.0.1:") and worker_url == api_url
