"""The ``reduce`` flow end to end on local Ray and a Prefect test server (real components)."""

from __future__ import annotations

import json
import os
import urllib.request

import numpy as np
import pytest

from flows.artifacts import reduction_title, subset_plot
from obliviate.data import load_dataset
from obliviate.reduction.drmi import drmi_reduce
from obliviate.reduction.mi import mi_matrix
from tests.prefect_artifacts import artifacts_mentioning

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mnist_pool(make_mnist_pool):
    """300 real MNIST images (30 per class) as an .npz the flow loads by path."""
    return make_mnist_pool(per_class=30)


@pytest.fixture(scope="module")
def in_process(mnist_pool):
    pool, _ = mnist_pool
    matrix = mi_matrix(pool.images, levels=pool.levels)
    return {
        "all": drmi_reduce(matrix, k=30),
        "sample": drmi_reduce(matrix, k=30, num_starts=40, rng=np.random.default_rng(7)),
        "sample10": drmi_reduce(matrix, k=30, num_starts=10, rng=np.random.default_rng(7)),
    }


def test_flow_equals_in_process_and_reuses_tiles(ray_runtime, prefect_harness, file_store, mnist_pool, in_process):
    from flows.reduce import reduce_flow

    _, path = mnist_pool
    events = []
    from flows.progress import progress_to

    with progress_to(lambda stage, done, total: events.append((stage, done, total))):
        first = reduce_flow(data=path, k=30, store_url=file_store.url, workers=2, tile_size=64)
    expected = in_process["all"]
    assert first["restarts"] == 300
    assert first["h"] == expected.h
    assert np.array_equal(file_store.get_array(f"{first['result_key']}/subset.npy"), expected.subset)
    restarts = file_store.get_json(f"{first['result_key']}/restarts.json")
    assert [r["h"] for r in restarts] == [r.h for r in expected.restarts]
    assert [r["start"] for r in restarts] == list(range(300))
    manifest = file_store.read_manifest(f"{first['result_key']}/manifest.json")
    assert set(manifest.members) == {"subset", "restarts", "plot", "summary"}
    pool, _ = mnist_pool
    restart_h = [r.h for r in expected.restarts]
    picture = subset_plot(pool=pool, subset=expected.subset, restart_h=restart_h, title=reduction_title(first))
    assert file_store.get_member(manifest, "plot") == picture  # the same picture as --workers 0 draws
    assert first["tiles_computed"] == first["tiles_total"] == 15 and first["tiles_reused"] == 0
    assert ("tiles", 15, 15) in events and ("restarts", 300, 300) in events
    assert "table" in [a.type for a in artifacts_mentioning(key="drmi-reduction", text=first["result_url"])]

    stages = {"scheduling", "actor_start", "data_preparation", "object_store_transfer", "storage_write_publish"}
    assert stages <= set(first["stages"]) and first["restart_mode"] == "dense"
    # The stored summary holds the timings too (they were added to the returned dict only, after the write).
    stored = file_store.get_json(f"{first['result_key']}/summary.json")
    assert stored["stages"] == first["stages"] and stored["flow_seconds"] == first["flow_seconds"] > 0

    second = reduce_flow(data=path, k=30, store_url=file_store.url, workers=2, tile_size=64)
    assert second["tiles_computed"] == 0 and second["tiles_reused"] == 15
    assert second["h"] == expected.h and second["best_start"] == first["best_start"]
    # The second run found the worker pool warm: no worker process was started for it.
    assert second["warm_pool"] is True
    # Faster than the first run's start only if that one started workers: an earlier test may have left them warm.
    assert first["warm_pool"] or second["stages"]["actor_start"] < first["stages"]["actor_start"]


def test_resumed_run_computes_only_missing_tiles(ray_runtime, prefect_harness, file_store, mnist_pool, in_process):
    from flows.reduce import reduce_flow
    from storage.tiles import matrix_prefix

    pool, path = mnist_pool
    reduce_flow(data=path, k=30, store_url=file_store.url, workers=1, tile_size=100, starts=5, seed=1)
    prefix = matrix_prefix(fingerprint=pool.fingerprint, bins=256, normalize=False, tile_size=100)
    # As if the first run had crashed before committing two tiles.
    file_store.delete(f"{prefix}/r0000000-c0000200.npy")
    file_store.delete(f"{prefix}/r0000100-c0000100.npy")
    resumed = reduce_flow(data=path, k=30, store_url=file_store.url, workers=2, tile_size=100, starts=40, seed=7)
    assert resumed["tiles_computed"] == 2 and resumed["tiles_reused"] == 4
    assert resumed["h"] == in_process["sample"].h


@pytest.mark.parametrize("restart_memory_mb", [None, 0.2])  # tiles read by the flow (dense), by the workers
def test_a_damaged_stored_tile_is_computed_again(
    ray_runtime, prefect_harness, file_store, mnist_pool, in_process, restart_memory_mb
):
    """Tiles are a cache: a flipped byte once stopped every later reduce with 'delete and rewrite it'."""
    from flows.reduce import reduce_flow
    from storage.tiles import DIAGONAL, matrix_prefix

    pool, path = mnist_pool
    options = {"data": path, "k": 30, "store_url": file_store.url, "workers": 2, "tile_size": 100}
    reduce_flow(**options, starts=5, seed=1)
    prefix = matrix_prefix(fingerprint=pool.fingerprint, bins=256, normalize=False, tile_size=100)
    for key in (f"{prefix}/r0000000-c0000200.npy", f"{prefix}/{DIAGONAL}"):
        local = file_store.url.removeprefix("file://") + "/" + key
        with open(local, "r+b") as handle:
            handle.seek(200)
            handle.write(b"\x11" * 8)
    out = reduce_flow(**options, starts=40, seed=7, restart_memory_mb=restart_memory_mb)
    assert out["restart_mode"] == ("dense" if restart_memory_mb is None else "streaming")
    assert out["tiles_computed"] == 1 and out["h"] == in_process["sample"].h
    assert reduce_flow(**options, starts=40, seed=7)["tiles_computed"] == 0  # stored sound this time


def test_flow_on_s3_with_streaming_restarts(ray_runtime, prefect_harness, s3_store, mnist_pool, in_process):
    from flows.reduce import reduce_flow

    _, path = mnist_pool
    out = reduce_flow(
        data=path,
        k=30,
        store_url=s3_store.url,
        workers=2,
        tile_size=64,
        starts=10,
        seed=7,
        restart_memory_mb=0.2,  # 2 of 5 row bands: rows are streamed from S3 tiles, never the whole matrix
    )
    expected = in_process["sample10"]
    assert out["restart_mode"] == "streaming"
    assert out["h"] == expected.h
    assert np.array_equal(s3_store.get_array(f"{out['result_key']}/subset.npy"), expected.subset)
    manifest = s3_store.read_manifest(f"{out['result_key']}/manifest.json")
    assert s3_store.get_member(manifest, "plot").startswith(b"\x89PNG\r\n\x1a\n")
    assert out["result_url"].startswith("s3://")


def test_cli_reduce_against_s3(ray_runtime, prefect_harness, s3_store, mnist_pool, in_process, capsys, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from flows.cli import main

    _, path = mnist_pool
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the harness's server
    code = main(
        [
            "reduce",
            "--data",
            path,
            "--k",
            "30",
            "--starts",
            "40",
            "--seed",
            "7",
            "--store",
            s3_store.url,
            "--workers",
            "2",
            "--tile-size",
            "128",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert f"H = {in_process['sample'].h:.4f} nats over 40 restarts" in captured.out
    assert "subset written to s3://" in captured.out
    # stderr is not a terminal here, so no progress bar is drawn into it (tests/test_progress.py
    # checks the bars themselves on a terminal console)
    assert "\r" not in captured.err and "━" not in captured.err
    keys = s3_store.list()
    assert any(key.endswith("/subset.npy") for key in keys)
    summary = json.loads(s3_store.get_bytes(next(k for k in keys if k.endswith("summary.json"))))
    assert summary["tiles_computed"] == 6


def test_cli_in_process_path_matches(tmp_path, mnist_pool, in_process, capsys):
    from flows.cli import main

    _, path = mnist_pool
    assert main(["reduce", "--data", path, "--k", "30", "--workers", "0", "--out", str(tmp_path)]) == 0
    assert f"H = {in_process['all'].h:.4f} nats over 300 restarts" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "value", "rule"),
    [
        ("--bins", "1", "--bins must be in 2..256; got 1. The spec default is 256."),
        ("--tile-size", "0", "--tile-size must be at least 32"),
        ("--starts", "0", "--starts must be in 1..300"),
        ("--restart-memory-mb", "-1", "--restart-memory-mb is the MiB"),
    ],
)
def test_cli_refuses_a_bad_option_before_starting_anything(tmp_path, mnist_pool, capsys, option, value, rule):
    from flows.cli import main

    _, path = mnist_pool
    out = tmp_path / "out"
    assert main(["reduce", "--data", path, "--k", "30", option, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert rule in err and value in err
    assert "Prefect API" not in err and "note: MI at" not in err  # refused before any server or notice
    assert not out.exists()  # nothing stored for a refused run


def test_cli_refuses_more_workers_than_a_local_runtime_has_cpus(tmp_path, mnist_pool, capsys, monkeypatch):
    import os

    from flows.cli import main

    _, path = mnist_pool
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    too_many = str((os.cpu_count() or 1) + 1)
    out = tmp_path / "out"
    # it used to wait 120 s for a reservation a local runtime can never grant
    assert main(["reduce", "--data", path, "--k", "30", "--workers", too_many, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--workers {too_many} needs {too_many} CPUs, but the local Ray runtime" in err and "--ray-address" in err
    assert "Prefect API" not in err and not out.exists()


def test_prefect_server_helper_starts_and_stops(monkeypatch, tmp_path):
    from flows.runtime import prefect_api

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with prefect_api(home=tmp_path / "prefect") as api_url:
        assert api_url.startswith("http://127.0.0.1:")
        assert os.environ["PREFECT_API_URL"] == api_url
        with urllib.request.urlopen(f"{api_url}/health", timeout=5) as response:
            assert response.status == 200
    assert "PREFECT_API_URL" not in os.environ
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{api_url}/health", timeout=2)


def test_a_prefect_server_dies_with_the_command_that_started_it_even_when_killed(tmp_path):
    """A command killed outright (kill -9, a CI timeout) left its Prefect server running for good: three were
    found still holding their ports half an hour after the commands that started them were killed."""
    import pathlib
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import os, signal\n"
        "from flows.runtime import prefect_server\n"
        f"with prefect_server(home={str(tmp_path / 'prefect')!r}) as server:\n"
        "    print(server.process.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    command = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, check=False)
    assert command.returncode == -signal.SIGKILL, command.stderr[-2000:]
    server_pid = int(command.stdout.split()[0])
    deadline = time.monotonic() + 30
    stat = pathlib.Path(f"/proc/{server_pid}/stat")
    while time.monotonic() < deadline:
        try:  # gone, or a zombie its new parent has not reaped yet (a container's init may never)
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.5)
    else:
        os.kill(server_pid, signal.SIGKILL)
        pytest.fail(f"the Prefect server {server_pid} outlived the killed command by 30 s")


def test_cli_tiles_only_on_a_pool_smaller_than_the_default_k(
    ray_runtime, prefect_harness, file_store, tmp_path, capsys, monkeypatch
):
    """`--tiles-only` on a 60-image pool was refused with 'got k=600', a k it never uses."""
    from prefect.settings import PREFECT_API_URL

    from flows.cli import main

    data = load_dataset("digits")
    path = tmp_path / "pool.npz"
    np.savez(path, images=data.images[:60], labels=data.labels[:60])
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the harness's server
    code = main(
        [
            "reduce",
            "--data",
            str(path),
            "--tiles-only",
            "--workers",
            "1",
            "--tile-size",
            "32",
            "--store",
            file_store.url,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tiles: 3 computed, 0 reused" in captured.out
    # A run on one worker reuses those tiles; its result line said "1 workers".
    code = main(
        ["reduce", "--data", str(path), "--k", "5", "--starts", "3", "--workers", "1", "--tile-size", "32"]
        + ["--store", file_store.url]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "tiles: 0 computed, 3 reused" in captured.out and "; 1 worker;" in captured.out
    opening = _newest_flow_log_line("k=5", ", store ")  # this run's opening line
    assert "1 worker x 1 thread," in opening, opening  # it logged "1 workers x 1 threads"


def _newest_flow_log_line(*parts: str) -> str:
    """The newest log line the Prefect test server received that holds every part (logs arrive in batches: wait)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import LogSort

    for _ in range(40):
        with get_client(sync_client=True) as client:
            for log in client.read_logs(limit=200, sort=LogSort.TIMESTAMP_DESC):
                if all(part in log.message for part in parts):
                    return log.message
        time.sleep(0.5)
    return ""
