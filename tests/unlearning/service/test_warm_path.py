"""Issue 14: checkpoint writes overlapped with training, and the warm worker pool.

* :class:`storage.background.BackgroundWriter`: in order, bounded, failures surface.
* A run trained and unlearned with background checkpoint writes stores the same bytes as with
  synchronous writes (bit-identical checkpoints, same sha256 in the manifests).
* A write that fails stops the chain before anything is published: the old version stays.
* ``ChainWorker.warm`` loads every registered run's data and warms torch up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.deployments import POOL_KEY
from flows.train import run_spec
from flows.unlearn import wait_for_request
from obliviate.unlearning.service import work_token
from storage.background import BackgroundWriteError, BackgroundWriter
from storage.ledger import DeletionLedger
from storage.objects import ObjectStore
from storage.registry import RunRegistry


@pytest.fixture
def tiny(tiny_run) -> dict:
    return tiny_run(blocks=3, train_size=300, heldout_size=100, split_seed=0)


def test_background_writer_keeps_order_bounds_the_queue_and_surfaces_failures():
    written: list[int] = []
    gate = threading.Event()

    def slow_write(item: int) -> None:
        gate.wait(5)
        written.append(item)

    writer = BackgroundWriter(slow_write, depth=2)
    writer(0)  # taken by the thread, which waits at the gate
    time.sleep(0.1)
    writer(1)
    writer(2)  # the queue holds 2 now: the next call blocks until the writer moves on
    blocked = threading.Thread(target=writer, args=(3,))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive() and written == []
    gate.set()
    blocked.join(5)
    writer.close()
    assert written == [0, 1, 2, 3] and writer.written == 4

    def failing(item: int) -> None:
        if item == 1:
            raise OSError("disk full")
        written.append(item)

    written.clear()
    writer = BackgroundWriter(failing, depth=1)
    with pytest.raises(BackgroundWriteError, match="disk full"), writer:
        for item in range(5):
            writer(item)
            time.sleep(0.05)
    assert written == [0]  # nothing after the failed item is written
    # A storage error, so a command reports it in one line ("obliviate train: error: ..."), not a traceback.
    from obliviate.errors import ObliviateError

    failed = BackgroundWriter(failing, depth=1)
    with pytest.raises(ObliviateError, match="a background write failed .*disk full"), failed:
        failed(0)
        failed(1)
        failed.close()

    with pytest.raises(ValueError, match="depth"):
        BackgroundWriter(failing, depth=0)


def _chain_hashes(url: str, run_id: str, version: int | None = None) -> dict[str, str]:
    registry = RunRegistry(ObjectStore(url))
    current = registry.current(run_id)
    return {index: member.sha256 for index, member in registry.manifest(current).members.items()}


@pytest.mark.slow
def test_background_checkpoint_writes_are_bit_identical_and_failures_block_publishing(tmp_path, tiny):
    spec = run_spec(run_id="w", **tiny)
    urls = {depth: f"file://{tmp_path}/depth{depth}" for depth in (0, 2)}
    for depth, url in urls.items():
        worker = ChainWorker(url, write_depth=depth)
        worker.train(spec)
        block_two = RunRegistry(ObjectStore(url)).entry("w")["block_sample_ids"][1][:2]
        audit = worker.unlearn("w", {"r1": [int(i) for i in block_two]})
        assert audit["status"] == "published" and audit["to_version"] == 2
    assert _chain_hashes(urls[0], "w") == _chain_hashes(urls[2], "w")
    assert len(_chain_hashes(urls[2], "w")) == tiny["blocks"] + 1

    # A checkpoint write that fails (a real filesystem error: a directory sits where the last
    # block's checkpoint goes): the unlearning raises, nothing is published, version 2 stays.
    url = urls[2]
    registry = RunRegistry(ObjectStore(url))
    current = registry.current("w")
    chain, _ = registry.load_chain(current)
    ids = [int(i) for i in registry.entry("w")["block_sample_ids"][0][:2]]
    positions, _ = spec_of(registry).positions(ids)
    token = work_token(
        base_version=current.version, excluded_positions=chain.deleted_ids | set(positions.tolist()), policy="exact"
    )
    blocker = tmp_path / "depth2" / registry.checkpoint_key("w", token, tiny["blocks"])
    blocker.mkdir(parents=True)
    worker = ChainWorker(url, write_depth=2, retry_deadline_s=0.5)
    with pytest.raises(BackgroundWriteError, match=f"checkpoint {tiny['blocks']} of run w"):
        worker.unlearn("w", {"r2": ids})
    assert registry.current("w").version == 2
    assert registry.stored_checkpoints("w", token, first=1)  # the blocks before it were written


def spec_of(registry: RunRegistry):
    return registry.spec("w")


@pytest.mark.slow
def test_warm_loads_every_registered_run(tmp_path, tiny):
    url = f"file://{tmp_path}/store"
    trainer = ChainWorker(url)
    trainer.train(run_spec(run_id="a", **tiny))
    trainer.train(run_spec(run_id="b", **tiny | {"split_seed": 1}))
    fresh = ChainWorker(url)
    summary = fresh.warm()
    assert summary["runs"] == ["a", "b"] and summary["skipped"] == {}
    assert summary["warm_up_seconds"] > 0 and len(fresh._data) == 2
    assert fresh.warm(["missing"])["skipped"]  # a run that cannot be read is named, not fatal


def _forget(url: str, ids: list[int], request_id: str, *, api_url: str) -> None:
    """Submit a deletion as a user does, with ``obliviate forget`` in a process of its own.

    (In this long-lived pytest process, Prefect's process-wide events worker can be left wedged by
    earlier tests, and the event then never leaves; a user's command starts fresh.)
    """
    env = {**os.environ, "PREFECT_API_URL": api_url}
    command = [sys.executable, "-m", "flows.cli", "forget", "--store", url, "--data", "digits"]
    command += ["--ids", ",".join(map(str, ids)), "--request-id", request_id]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _claim_holder(url: str, request_id: str) -> str:
    history = DeletionLedger(ObjectStore(url)).history(request_id)
    return next(h["details"]["holder"] for h in history if h["status"] == "claimed")


@pytest.mark.slow
def test_serve_unlearns_in_its_own_process_on_a_warm_pool_and_the_runner_path_still_works(
    s3_url, prefect_api_url, ray_address, serve, tiny
):
    """Default ``--dispatch warm``: serve's own process claims the request (the claim's holder ends
    with serve's pid) on a pool it warmed; ``--dispatch runner``: a runner subprocess does."""
    trained = ChainWorker(s3_url).train(run_spec(run_id="hot", **tiny))
    assert trained["version"] == 1
    registry = RunRegistry(ObjectStore(s3_url))
    block_ids = [int(i) for i in registry.entry("hot")["block_sample_ids"][1]]

    # No reconcile cron inside the test: a cron pass started by the runner may legitimately claim
    # the request first (in a subprocess), which is not the path under test.
    process = serve(s3_url, "--reconcile-cron", "0 0 1 1 *")
    deadline = time.monotonic() + 120
    while not ObjectStore(s3_url).exists(POOL_KEY) and time.monotonic() < deadline:
        time.sleep(0.5)
    pool = ObjectStore(s3_url).get_json(POOL_KEY)
    assert pool["pid"] == process.pid and all(w["runs"] == ["hot"] for w in pool["workers"])
    _forget(s3_url, block_ids[:2], "warm-1", api_url=prefect_api_url)
    entry = wait_for_request(s3_url, "warm-1", timeout_s=120)
    assert entry["status"] == "done" and entry["details"]["runs"]["hot"]["to_version"] == 2
    assert _claim_holder(s3_url, "warm-1").endswith(f"-{process.pid}")
    # The event reaches serve's own listener: it started the pass ("processing", then "processed") or, when the
    # event stream lagged past the watcher's 5-s safety net (seen on a loaded CI machine), it finds
    # the request already done ("duplicate"). Either way it is recorded, by serve, not lost.
    ledger = DeletionLedger(ObjectStore(s3_url))
    deadline = time.monotonic() + 60
    while not ledger.events() and time.monotonic() < deadline:
        time.sleep(0.5)
    outcomes = [e["outcome"] for e in ledger.events()]
    assert len(outcomes) == 1 and outcomes[0] in ("processing", "processed", "duplicate"), outcomes
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)

    other = f"{s3_url}-runner"  # a store of its own: no race with the stopped serve's withdrawal
    ChainWorker(other).train(run_spec(run_id="hot", **tiny))
    runner = serve(other, "--dispatch", "runner")
    _forget(other, block_ids[2:4], "runner-1", api_url=prefect_api_url)
    entry = wait_for_request(other, "runner-1", timeout_s=150)
    assert entry["status"] == "done" and entry["details"]["runs"]["hot"]["to_version"] == 2
    holder_pid = int(_claim_holder(other, "runner-1").rsplit("-", 1)[1])
    assert holder_pid not in (runner.pid, os.getpid())  # a flow-run subprocess of the runner


@pytest.mark.slow
def test_serve_with_its_own_prefect_server_shows_the_unlearn_runs_it_dispatched(tmp_path, tiny):
    """`serve` with no PREFECT_API_URL starts a server; its dispatcher thread then ran the `unlearn`
    flow on a temporary server of its own (Prefect's settings as at import), so the runs never
    reached serve's dashboard, and the first request waited for that server to start."""
    import json
    import urllib.request

    from flows.unlearn import ENDPOINT_KEY

    repo = Path(__file__).resolve().parents[3]

    url = f"file://{tmp_path}/store"
    ChainWorker(url).train(run_spec(run_id="own", **tiny))
    block_ids = [int(i) for i in RunRegistry(ObjectStore(url)).entry("own")["block_sample_ids"][1]]
    # A user's first `serve`: no Prefect server configured, a home of its own (the Prefect database and a
    # local Ray runtime's token go there), so it starts its own server and Ray.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "RAY_"))}
    (tmp_path / "home").mkdir()
    env |= {"HOME": str(tmp_path / "home"), "PYTHONPATH": str(repo)}
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "flows.cli", "serve", "--store", url, "--audit-cron", "off"]
    command += ["--reconcile-cron", "0 0 1 1 *"]
    process = subprocess.Popen(
        command, cwd=repo, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 150
        while not ObjectStore(url).exists(POOL_KEY) and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        api_url = ObjectStore(url).get_json(ENDPOINT_KEY)["api_url"]
        _forget(url, block_ids[:2], "own-1", api_url=api_url)
        assert wait_for_request(url, "own-1", timeout_s=120)["status"] == "done"
        assert _claim_holder(url, "own-1").endswith(f"-{process.pid}")  # serve's dispatcher ran it
        query = json.dumps({"flows": {"name": {"any_": ["unlearn"]}}}).encode()
        request = urllib.request.Request(
            f"{api_url}/flow_runs/filter", data=query, headers={"Content-Type": "application/json"}
        )
        # The ledger says "done" before the run's final state reaches the server: wait for that state.
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(request, timeout=30) as answer:
                runs = json.load(answer)
            if [run["state_type"] for run in runs] == ["COMPLETED"] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert [run["state_type"] for run in runs] == ["COMPLETED"], log.read_text()[-3000:]
        assert "Starting temporary server" not in log.read_text()
        # A SIGTERM to the whole group (systemd's default, a container stop) stops serve's own Ray too:
        # serve then waited 60 s on the dead GCS and died on Ray's fatal error.
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=45)
        assert "Failed to connect to GCS" not in log.read_text(), log.read_text()[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # what serve's own Ray left behind, if anything
        process.wait(timeout=30)


@pytest.mark.slow
def test_serve_stopped_during_a_retrain_hands_the_request_back_without_counting_an_attempt(
    store_url, prefect_api_url, ray_address, serve, tiny_run
):
    """SIGTERM to `serve` mid-retrain counted the killed work as a failed attempt, then claimed the
    request again while stopping and died holding that claim: 2 of 3 attempts gone, a false
    "claimed" state until the lease lapsed."""
    slow = tiny_run(epochs=600, split_seed=0)  # about 10 s to retrain from block 1 on this machine
    ChainWorker(store_url).train(run_spec(run_id="slow", **slow))
    block_ids = [int(i) for i in RunRegistry(ObjectStore(store_url)).entry("slow")["block_sample_ids"][1]]
    process = serve(store_url, "--reconcile-cron", "0 0 1 1 *")
    deadline = time.monotonic() + 120
    while not ObjectStore(store_url).exists(POOL_KEY) and time.monotonic() < deadline:
        time.sleep(0.5)
    _forget(store_url, block_ids[:2], "stop-1", api_url=prefect_api_url)
    ledger = DeletionLedger(ObjectStore(store_url))
    deadline = time.monotonic() + 60
    while ledger.get("stop-1").status != "claimed" and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    process.terminate()
    process.wait(timeout=120)
    entry = ledger.get("stop-1")
    assert entry.status == "pending" and entry.details["attempts"] == 0, entry.details
    assert "serve stopped during the work" in entry.details["handed_back"]["reason"]
    assert [h["status"] for h in ledger.history("stop-1")] == ["pending", "claimed", "pending"]
    serve(store_url, "--reconcile-cron", "0 0 1 1 *")  # the next serve finishes it, on its first counted attempt
    done = wait_for_request(store_url, "stop-1", timeout_s=180)
    assert done["status"] == "done" and done["details"]["attempt"] == 1, done["details"]
