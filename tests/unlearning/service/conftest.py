"""Real servers for the service tests, all on 127.0.0.1 and started here.

* ``s3_url``: a fresh bucket on the session's moto S3 server (``tests/conftest.py``).
* ``prefect_api_url``: a real ``prefect server start`` (events, triggers and schedules need one),
  through :func:`flows.runtime.prefect_api`.
* ``ray_address``: one local Ray runtime (``address="local"``); its address is exported so
  ``obliviate serve`` subprocesses and their flow runs join it instead of starting their own.
* ``serve``: starts ``python -m flows.cli serve`` for a store and stops it afterwards.
* ``train_r1`` / ``settle_req1``: run r1 trained into a store, and request req-1 filed and applied in one pass.
* ``train_rb``: run rb trained under a one-day batch window, and two ids of any block.
* ``serve_stopped_by_a_group_sigterm``: serve stopped mid-retrain by a SIGTERM to its process group (and a second
  signal, if asked); its log and the request's entry.

Credentials and endpoint are in the environment before Ray starts, so workers inherit them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def tiny_run():
    """Options of a tiny block-trained run (digits, LeNet-5, 4 blocks of 1 epoch): ``tiny_run(blocks=3)`` overrides."""

    def options(**changes):
        return {
            "data": "digits",
            "model": "lenet5",
            "blocks": 4,
            "epochs": 1,
            "batch_size": 32,
            "learning_rate": 0.01,
            "schedule": "constant",
            "train_size": 400,
            "heldout_size": 200,
            "seed": 0,
        } | changes

    return options


@pytest.fixture
def train_r1(tiny_run):
    """``train_r1(url)``: train run r1 (``tiny_run``: 3 blocks, 300 images) in a store; each block's 1st dataset id."""

    def train(url: str) -> list[int]:
        from actors.chains import ChainWorker
        from flows.train import run_spec
        from storage import ObjectStore
        from storage.registry import RunRegistry

        spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
        ChainWorker(url).train(spec)
        registry = RunRegistry(ObjectStore(url))
        chain, _ = registry.load_chain(registry.current("r1"))
        return [int(spec["train_ids"][int(block[0])]) for block in chain.plan.blocks]

    return train


@pytest.fixture
def train_rb(tmp_path, tiny_run):
    """``train_rb(**changes)``: train run rb (``tiny_run(split_seed=0, **changes)``) in ``tmp_path/store`` under a
    one-day batch window; ``(url, store, ids_in)``, where ``ids_in(block, start=0)`` gives two dataset ids of that
    block from position ``start``."""

    def train(**changes):
        from actors.chains import ChainWorker
        from flows.batching import save_policy
        from flows.train import run_spec
        from obliviate.unlearning.batching import DAY_S, BatchPolicy
        from obliviate.unlearning.plan import BlockPlan
        from storage import ObjectStore

        url = f"file://{tmp_path / 'store'}"
        store = ObjectStore(url)
        store.ensure_container()
        spec = run_spec(run_id="rb", **tiny_run(split_seed=0, **changes))
        ChainWorker(url).train(spec)
        plan = BlockPlan.from_dict(store.get_json("runs/rb/plan.json"))

        def ids_in(block: int, start: int = 0) -> list[int]:
            return [int(spec["train_ids"][p]) for p in plan.block_ids(block)[start : start + 2]]

        save_policy(store, BatchPolicy(window_s=DAY_S))
        return url, store, ids_in

    return train


@pytest.fixture
def settle_req1():
    """``settle_req1(url, victim)``: file req-1 for ``victim`` and apply it in one pass (done); its ledger details."""

    def settle(url: str, victim: int) -> dict:
        from actors.chains import ChainWorker
        from flows.settle import run_pass
        from flows.unlearn import submit_deletion
        from storage import ObjectStore
        from storage.ledger import DeletionLedger

        worker = ChainWorker(url)
        submit_deletion(url, [victim], dataset="digits", request_id="req-1", emit=False)
        result = run_pass(url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})
        assert result["settled"] == {"req-1": "done"}
        return DeletionLedger(ObjectStore(url)).get("req-1").details

    return settle


@pytest.fixture(scope="session")
def exited_pid() -> int:
    """The pid of a process of this host that has exited: what a crashed holder of a claim or writer of a marker left."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True
    )
    return int(done.stdout)


@pytest.fixture
def store_url(tmp_path):
    return f"file://{tmp_path}/store"


@pytest.fixture(params=["file", "s3"])
def any_store(request, tmp_path):
    """A store URL on each backend: ``file://`` under tmp_path, then a fresh bucket on the moto S3 server."""
    from storage import ObjectStore

    if request.param == "file":
        url = f"file://{tmp_path}/store"
        ObjectStore(url).ensure_container()
        return url
    return request.getfixturevalue("s3_url")


@pytest.fixture
def s3_url(moto_endpoint):
    import s3fs

    from storage import ObjectStore

    s3fs.S3FileSystem.clear_instance_cache()
    url = f"s3://svc-{uuid.uuid4().hex[:10]}/store"
    ObjectStore(url).ensure_container()
    return url


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory):
    from flows.runtime import prefect_api

    with prefect_api(home=tmp_path_factory.mktemp("prefect-home")) as url:
        yield url


@pytest.fixture(scope="session")
def ray_address(moto_endpoint):
    import ray

    from flows.runtime import ensure_ray

    previous = os.environ.get("RAY_ADDRESS")
    os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():  # a runtime from earlier tests predates this session's S3 environment
        ray.shutdown()
    ensure_ray(num_cpus=2)
    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address
    yield address
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


@pytest.fixture(autouse=True)
def _no_pooled_workers_left():
    """Pooled unlearning workers are detached: stop each test's pools so the next starts clean.

    Every store's pool (prefix ``pool/``), not one store's as :func:`flows.train.shutdown_pools` does:
    a test's stores (tmp_path, fresh buckets) are not known here, and this session's Ray runtime is its own.
    """
    yield
    import ray

    if ray.is_initialized():
        from flows.train import _kill_pools

        _kill_pools("pool/")


@pytest.fixture
def serve(prefect_api_url, ray_address, tmp_path):
    """Start ``obliviate serve`` for a store; returns (process, log path)."""
    started: list[subprocess.Popen] = []

    def start(store_url: str, *extra: str, timeout: float = 120.0) -> subprocess.Popen:
        from storage import ObjectStore

        store = ObjectStore(store_url)
        log = tmp_path / f"serve-{len(started)}.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "PREFECT_API_URL": prefect_api_url,
            "RAY_ADDRESS": ray_address,
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "PYTHONUNBUFFERED": "1",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--store", store_url, "--audit-cron", "off", *extra],
            cwd=REPO,
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(process)
        process.log_path = log  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{log.read_text()[-3000:]}")
            if store.exists("service/endpoint.json") and store.get_json("service/endpoint.json")["pid"] == process.pid:
                return process
            time.sleep(0.5)
        raise RuntimeError(f"serve not ready after {timeout} s:\n{log.read_text()[-3000:]}")

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


#: What serve says when it hands a request back itself or its pass does (flows.settle, flows.deployments).
HANDED_BACK = "handed back (serve is stopping); its attempt is not counted"


@dataclass
class GroupStop:
    """One serve stopped by a SIGTERM to its process group (``serve_stopped_by_a_group_sigterm``)."""

    text: str  # serve's log, stdout and stderr
    entry: Any  # request group-1's ledger entry after the stop
    history: list[str]  # its statuses, in order
    handed_back_s: float | None  # from the SIGTERM to the hand-back line (None: not seen)
    exited_s: float  # from the SIGTERM to serve's exit
    second_s: float | None  # from the SIGTERM to the second signal (None: none sent, serve had exited)

    def assert_handed_back_or_settled(self) -> None:
        """The request is handed back (pending, its attempt not counted) or, where the retrain outran the stop (Ray's
        workers may outlive the group signal, so how far it gets varies by machine), settled done; never left claimed
        or failed. No traceback either way."""
        text, entry, history = self.text, self.entry, self.history
        if entry.status == "pending":
            assert entry.details["attempts"] == 0, (entry.details, text[-3000:])
            assert "serve stopped during the work" in entry.details["handed_back"]["reason"]
            assert history == ["pending", "claimed", "pending"]
            assert HANDED_BACK in text, text[-3000:]
        else:
            assert entry.status == "done" and history == ["pending", "claimed", "done"], (entry.details, text[-3000:])
        assert "obliviate serve: stopped;" in text, text[-3000:]
        assert "Logging error" not in text and "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="session")
def trained_slow_runs(tmp_path_factory):
    """The folder that keeps, per epochs, a file store holding run "slow" trained at those epochs."""
    return tmp_path_factory.mktemp("slow-runs")


@pytest.fixture
def slow_run_store(trained_slow_runs, tiny_run):
    """``slow_run_store(folder, epochs=1500)``: a file store at ``folder`` holding run "slow" (``tiny_run`` at
    ``epochs``, split seed 0), returned as its URL. Trained once per session and epochs, then copied: the training is
    deterministic and takes about 45 s per 1500 epochs."""
    from actors.chains import ChainWorker
    from flows.train import run_spec

    def copy(folder: Path, *, epochs: int = 1500) -> str:
        trained = trained_slow_runs / f"epochs-{epochs}"
        if not trained.is_dir():
            partial = trained.with_name(f"{trained.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)  # a training that failed in an earlier test is not taken
            ChainWorker(f"file://{partial}").train(run_spec(run_id="slow", **tiny_run(epochs=epochs, split_seed=0)))
            partial.rename(trained)
        shutil.copytree(trained, folder)
        return f"file://{folder}"

    return copy


@pytest.fixture
def serve_stopped_by_a_group_sigterm(tmp_path, prefect_api_url, slow_run_store):
    """``serve_stopped_by_a_group_sigterm(ray_env=None, second=None, epochs=1500, deleted_block=1)``: serve, working on
    request group-1 (ids of block ``deleted_block``, so its retrain is of the blocks from there on), stopped by
    a SIGTERM to its process group (systemd's default ``KillMode=control-group``, ``kill -TERM -- -PGID``), which
    stops its own local Ray runtime too. ``second``: a signal sent to the group again ``second_after_s`` later, while
    serve stops (a second Ctrl-C, GNU ``timeout``'s second SIGTERM). ``epochs``: of the run, so of its retrain."""
    from flows.deployments import POOL_KEY
    from storage.ledger import DeletionLedger
    from storage.objects import ObjectStore
    from storage.registry import RunRegistry

    def forget(url: str, ids: list[int], request_id: str) -> None:
        env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
        command = [sys.executable, "-m", "flows.cli", "forget", "--store", url, "--data", "digits"]
        command += ["--ids", ",".join(map(str, ids)), "--request-id", request_id]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    def stop(
        *,
        ray_env: dict[str, str] | None = None,
        second: signal.Signals | None = None,
        second_after_s: float = 3.0,
        epochs: int = 1500,
        deleted_block: int = 1,
    ) -> GroupStop:
        # 1500: about 20 s to retrain from block 1 (3 blocks of 4), so the stop lands mid-retrain
        store_url = slow_run_store(tmp_path / "store", epochs=epochs)
        entry = RunRegistry(ObjectStore(store_url)).entry("slow")
        block_ids = [int(i) for i in entry["block_sample_ids"][deleted_block]]
        # serve starts its own local Ray runtime (no RAY_ADDRESS): its processes are in serve's group.
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")} | (ray_env or {})
        env |= {"PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "PYTHONUNBUFFERED": "1"}
        (tmp_path / "home").mkdir()
        env["HOME"] = str(tmp_path / "home")  # a local Ray runtime's token goes there
        log = tmp_path / "serve.log"
        command = [sys.executable, "-m", "flows.cli", "serve", "--store", store_url, "--audit-cron", "off"]
        command += ["--reconcile-cron", "0 0 1 1 *", "--workers", "1"]
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        store = ObjectStore(store_url)
        ledger = DeletionLedger(store)
        handed_back_s = second_s = None
        try:
            deadline = time.monotonic() + 150
            while not store.exists(POOL_KEY) and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
            forget(store_url, block_ids[:2], "group-1")
            deadline = time.monotonic() + 60
            while ledger.get("group-1").status != "claimed" and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2)  # the retrain is under way on serve's own Ray workers
            os.killpg(process.pid, signal.SIGTERM)
            signalled = time.monotonic()
            while process.poll() is None and time.monotonic() - signalled < 90:
                if handed_back_s is None and HANDED_BACK in log.read_text():
                    handed_back_s = time.monotonic() - signalled
                if second is not None and second_s is None and time.monotonic() - signalled >= second_after_s:
                    with contextlib.suppress(ProcessLookupError):  # serve (its group) is gone: nothing was sent
                        os.killpg(process.pid, second)
                        second_s = time.monotonic() - signalled
                time.sleep(0.1)
            code = process.wait(timeout=1)
            exited_s = time.monotonic() - signalled
            assert code == 0, (code, log.read_text()[-3000:])
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # what serve's own Ray left behind, if anything
            process.wait(timeout=30)
        text = log.read_text()
        if handed_back_s is None and HANDED_BACK in text:  # said in its last 0.1 s
            handed_back_s = exited_s
        entry = ledger.get("group-1")
        history = [h["status"] for h in ledger.history("group-1")]
        return GroupStop(text, entry, history, handed_back_s, exited_s, second_s)

    return stop
