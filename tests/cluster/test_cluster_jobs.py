"""steal and tune as Ray jobs, reduce and tune joined to a running cluster, on a Ray head on 127.0.0.1.

The jobs run what the README's cluster section shows (`obliviate submit -- steal ...`, `obliviate submit -- tune
...`), at the smallest sizes the commands accept, against the same kind of head as test_job_submission.py's.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.cluster.test_job_submission import (
    CURRENT_CLUSTER,
    HeadDied,
    jobs_head,
    ray_head_env,
    start_log_tail,
    started_head,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A 2-CPU Ray head started by `ray start` without an autoscaling config: (dashboard URL, GCS address, env)."""
    env = ray_head_env(
        RAY_AUTH_MODE="disabled",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    )
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "OBLIVIATE_STORE", "PREFECT_API_URL"):
        env.pop(name, None)
    temp_dir = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths live under it
    with jobs_head(temp_dir, env) as address:
        # `ray start` records the head's GCS address in its temp dir: what --ray-address / RAY_ADDRESS take
        gcs = (temp_dir / CURRENT_CLUSTER).read_text().strip()
        yield address, gcs, env


def run(command: list[str], env: dict, *, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def said(completed: subprocess.CompletedProcess) -> str:
    return completed.stdout[-4000:] + completed.stderr[-4000:]


#: The smallest audit `steal` accepts: one cell (one attacker, one selector, one budget, one seed), few steps.
TINY_STEAL = [
    "--pool", "digits", "--attackers", "basic", "--selectors", "random", "--budgets", "20", "--seeds", "1",
    "--steps", "5", "--pool-size", "200", "--test-size", "30", "--eps", "0.1",
]  # fmt: skip
#: The smallest reduction sweep `tune` accepts: one trial.
TINY_TUNE = [
    "--data", "digits", "--ks", "5", "--bins", "16", "--target-size", "100", "--pool-size", "100",
    "--test-size", "50", "--steps", "5", "--starts", "2", "--workers", "1",
]  # fmt: skip


@pytest.mark.slow
def test_submit_steal_runs_the_audit_on_the_cluster_and_the_report_lands_in_out(ray_head, tmp_path) -> None:
    address, _, env = ray_head
    target = tmp_path / "target.pt"  # outside the upload's working dir: the job reads it where it lies
    trained = run(
        [str(BIN / "obliviate"), "target", "train", "--data", "digits", "--out", str(target), "--train-size", "300"]
        + ["--steps", "20"],
        env,
    )
    assert trained.returncode == 0, said(trained)
    out = tmp_path / "steal"
    submitted = run(
        [str(BIN / "obliviate"), "submit", "--address", address, "--working-dir", str(ROOT), "--", "steal"]
        + ["--target", str(target), "--out", str(out), *TINY_STEAL],
        env,
    )
    assert submitted.returncode == 0, said(submitted)
    assert "SUCCEEDED" in submitted.stdout, said(submitted)
    report = json.loads((out / "steal.json").read_text())
    assert [(c["attacker"], c["selector"], c["budget"]) for c in report["cells"]] == [("basic", "random", 20)]
    assert (out / "steal.md").is_file() and (out / "steal.png").is_file()


@pytest.mark.slow
def test_submit_tune_runs_the_sweep_on_the_cluster_and_the_report_lands_in_the_store(ray_head, tmp_path) -> None:
    address, _, env = ray_head
    store = tmp_path / "store"
    submitted = run(
        [str(BIN / "obliviate"), "submit", "--address", address, "--working-dir", str(ROOT), "--", "tune"]
        + ["reduction", *TINY_TUNE, "--name", "on-cluster", "--store", f"file://{store}"],
        env,
    )
    assert submitted.returncode == 0, said(submitted)
    assert "SUCCEEDED" in submitted.stdout, said(submitted)
    results = json.loads((store / "tune" / "on-cluster" / "results.json").read_text())
    assert len(results["trials"]) == 1 and results["trials"][0]["k"] == 5, results
    assert (store / "tune" / "on-cluster" / "table.md").is_file()


@pytest.mark.slow
def test_reduce_and_tune_joined_to_the_cluster_by_its_address_run_there(ray_head, tmp_path) -> None:
    _, gcs, env = ray_head
    reduced = run(
        [str(BIN / "obliviate"), "reduce", "--data", "digits", "--k", "10", "--starts", "4", "--workers", "2"]
        + ["--ray-address", gcs, "--out", str(tmp_path / "reduce")],
        env,
    )
    assert reduced.returncode == 0, said(reduced)
    assert "over 4 restarts" in reduced.stdout, said(reduced)
    summary = json.loads(next((tmp_path / "reduce").glob("reduce-*/summary.json")).read_text())
    assert summary["k"] == 10 and summary["workers"] == 2
    store = tmp_path / "store"
    tuned = run(
        [str(BIN / "obliviate"), "tune", "reduction", *TINY_TUNE, "--name", "joined", "--store", f"file://{store}"],
        {**env, "RAY_ADDRESS": gcs},
    )
    assert tuned.returncode == 0, said(tuned)
    assert len(json.loads((store / "tune" / "joined" / "results.json").read_text())["trials"]) == 1


@pytest.mark.slow
def test_reduce_asking_more_cpus_than_a_cluster_without_autoscaler_has_is_refused_at_once(ray_head, tmp_path) -> None:
    """`reduce --workers 3` joined to a 2-CPU head started by `ray start` waited SLOT_WAIT_S (120 s), then failed."""
    _, gcs, env = ray_head
    began = time.monotonic()
    try:
        refused = run(
            [str(BIN / "obliviate"), "reduce", "--data", "digits", "--k", "10", "--starts", "4", "--workers", "3"]
            + ["--ray-address", gcs, "--out", str(tmp_path / "reduce")],
            env,
            timeout=100,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("reduce was still waiting for 3 CPUs of a 2-CPU cluster without autoscaler after 100 s")
    elapsed = time.monotonic() - began
    assert refused.returncode == 2, said(refused)
    err = refused.stderr
    assert "could not reserve 3 workers x 1 CPUs (3 CPUs): it has 2 CPUs and no autoscaler" in err, said(refused)
    assert "refused at once instead of after 120 s of waiting; lower --workers to at most 2, or run on a " in err
    assert "cluster that autoscales (`ray up cluster.yaml`)" in err and "Traceback" not in err, said(refused)
    assert elapsed < 90, f"refused only after {elapsed:.0f} s"  # a Prefect server and a Ray join take about 30


#: An autoscaling config for Ray's fake multi-node provider (RAY_FAKE_CLUSTER=1), the way Ray's docs test autoscaling
#: on one machine ("Testing Autoscaling Locally"): the head plus up to one 1-CPU worker, none started unless asked.
FAKE_AUTOSCALING_CONFIG = """\
cluster_name: fake_autoscaling
max_workers: 1
provider: {type: fake_multinode, use_node_id_as_ip: true, disable_node_updaters: true, disable_launch_config_check: true}
available_node_types:
  ray.head.default: {resources: {CPU: 2}, node_config: {}, max_workers: 0}
  ray.worker.cpu: {resources: {CPU: 1}, node_config: {}, min_workers: 0, max_workers: 1}
head_node_type: ray.head.default
auth: {}
upscaling_speed: 1.0
idle_timeout_minutes: 1
docker: {}
initialization_commands: []
setup_commands: []
head_setup_commands: []
worker_setup_commands: []
head_start_ray_commands: []
worker_start_ray_commands: []
file_mounts: {}
cluster_synced_files: []
file_mounts_sync_continuously: false
rsync_exclude: []
rsync_filter: []
"""


def autoscales_says(gcs: str, env: dict) -> str:
    """What cluster_autoscales() answers in a driver joined to ``gcs``, once the head's monitor has reported."""
    driver = textwrap.dedent(
        f"""
        import time, ray
        from flows.runtime import cluster_autoscales
        ray.init(address={gcs!r}, log_to_driver=False)
        deadline = time.monotonic() + 30  # the monitor reports a few seconds after the head starts
        while (answer := cluster_autoscales()) is None and time.monotonic() < deadline:
            time.sleep(1)
        print(answer)
        """
    )
    completed = run([sys.executable, "-c", driver], env, timeout=120)
    assert completed.returncode == 0, said(completed)
    return completed.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_whether_a_joined_cluster_can_grow_is_read_from_its_autoscaler(ray_head, tmp_path_factory) -> None:
    _, gcs, env = ray_head
    assert autoscales_says(gcs, env) == "False"  # `ray start` without a config: Ray only mirrors its nodes
    fake_env = {**env, "RAY_FAKE_CLUSTER": "1"}
    config = tmp_path_factory.mktemp("config") / "autoscaling.yaml"
    config.write_text(FAKE_AUTOSCALING_CONFIG)
    temp_dir = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths live under it
    ready = functools.partial(wait_until_address_recorded, temp_dir)
    with started_head(temp_dir, fake_env, ready=ready, extra=(f"--autoscaling-config={config}",)):
        assert autoscales_says((temp_dir / CURRENT_CLUSTER).read_text().strip(), fake_env) == "True"


def wait_until_address_recorded(temp_dir: Path, head: subprocess.Popen, address: str) -> None:
    """Until ``ray start`` has recorded the head's GCS address in ``temp_dir`` (60 s at most)."""
    deadline = time.monotonic() + 60
    while not (temp_dir / CURRENT_CLUSTER).is_file():
        if head.poll() is not None:
            raise HeadDied(f"the Ray head at {address} exited with {head.returncode} while starting")
        if time.monotonic() > deadline:
            raise AssertionError(f"the Ray head at {address} recorded no address in 60 s: {start_log_tail(temp_dir)}")
        time.sleep(0.5)
