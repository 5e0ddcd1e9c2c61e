"""One training per run id at a time: a second `obliviate train` of the same run is refused at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.cli import main
from flows.train import training_claim, training_claim_key
from obliviate.errors import ConfigError
from storage import ObjectStore
from storage.lease import ClaimHeld, LeaseKeeper, release_claim, take_claim

REPO = Path(__file__).resolve().parents[3]


def _someone_else(store: str, run_id: str, *, pid: int, host: str | None = None, lease_s: float = 20.0):
    """A claim of another process, as its ``training_claim`` leaves it."""
    holder = {"host": host or socket.gethostname(), "pid": pid, "command": "obliviate train"}
    return take_claim(ObjectStore(store), training_claim_key(run_id), holder=holder, lease_s=lease_s)


def test_two_claims_started_together_one_wins(any_store) -> None:
    store = ObjectStore(any_store)
    start = threading.Barrier(2)
    outcome: dict[str, str] = {}

    def claim(name: str) -> None:
        start.wait()
        try:
            take_claim(store, "runs/same/train-claim", holder={"host": "h", "pid": name})
            outcome[name] = "won"
        except ClaimHeld as held:
            outcome[name] = f"refused by {held.holder['pid']}"

    threads = [threading.Thread(target=claim, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    winners = [name for name, said in outcome.items() if said == "won"]
    assert len(winners) == 1 and len(outcome) == 2, outcome
    assert outcome[{"a": "b", "b": "a"}[winners[0]]] == f"refused by {winners[0]}"


def test_two_trainings_of_one_run_in_one_process_one_wins(any_store) -> None:
    start, inside = threading.Barrier(2), threading.Event()
    outcome: list[str] = []

    def train() -> None:
        start.wait()
        try:
            with training_claim(any_store, "r"):
                outcome.append("won")
                inside.wait(timeout=30)  # hold it until the other one has been answered
        except ConfigError as err:
            outcome.append(str(err))
            inside.set()

    threads = [threading.Thread(target=train) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    refused = [said for said in outcome if said != "won"]
    assert outcome.count("won") == 1 and len(refused) == 1, outcome
    assert refused[0].startswith("one training per run id at a time") and f"pid {os.getpid()}" in refused[0]


def test_a_live_training_refuses_a_second_one_naming_holder_and_fix(any_store) -> None:
    live = os.getppid()  # a process of this host that runs
    _someone_else(any_store, "r", pid=live)
    with pytest.raises(ConfigError) as refused, training_claim(any_store, "r"):
        pytest.fail("a second training of run r was let in")
    said = str(refused.value)
    assert "one training per run id at a time" in said
    assert f"pid {live} on host {socket.gethostname()}" in said and " UTC" in said
    assert "Wait for it to finish" in said and "another --run-id" in said
    with training_claim(any_store, "other"):  # another run id is free
        pass


def test_the_train_command_is_refused_at_once_with_exit_2(store_url, capsys) -> None:
    _someone_else(store_url, "busy", pid=os.getppid(), host="trainer-7")
    began = time.monotonic()
    code = main(["train", "--store", store_url, "--run-id", "busy", "--blocks", "2", "--epochs", "1"])
    assert code == 2 and time.monotonic() - began < 30  # no Prefect server or Ray started
    said = capsys.readouterr().err
    assert "obliviate train: error: one training per run id at a time" in said
    assert "on host trainer-7" in said and "another --run-id" in said


def test_a_released_or_dead_holder_is_taken_over(any_store) -> None:
    store = ObjectStore(any_store)
    # released: free at once
    claim = _someone_else(any_store, "r", pid=os.getppid(), host="elsewhere")
    assert release_claim(store, claim)
    with training_claim(any_store, "r"):
        pass
    # a process of this host that is gone: taken over at once
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _someone_else(any_store, "r", pid=gone.pid)
    with training_claim(any_store, "r"):
        target = store.read_pointer(training_claim_key("r")).target
        assert target["pid"] == os.getpid() and target["took_over"]["pid"] == gone.pid
    # another host's holder that stopped renewing: taken over once its lease lapsed
    _someone_else(any_store, "r", pid=1, host="elsewhere", lease_s=3.0)
    with pytest.raises(ConfigError, match="pid 1 on host elsewhere"), training_claim(any_store, "r"):
        pass
    time.sleep(3.2)
    with training_claim(any_store, "r"):
        pass


def test_a_renewed_claim_stays_held_and_a_nested_claim_is_the_same(any_store) -> None:
    store = ObjectStore(any_store)
    # a 4 s lease renewed every 1 s: a renewal that S3 answers 3 s late still keeps it (a 2 s one lapsed once in CI)
    claim = _someone_else(any_store, "r", pid=1, host="elsewhere", lease_s=4.0)
    with LeaseKeeper(store, lease_s=4.0, holder="elsewhere:1") as keeper:
        keeper.hold(claim.key, claim.version, folder=claim.folder)
        time.sleep(4.5)  # past the first lease: only its renewals keep it
        with pytest.raises(ConfigError, match="lease renewed"), training_claim(any_store, "r"):
            pass
    assert release_claim(store, claim)
    with training_claim(any_store, "r"), training_claim(any_store, "r"):  # obliviate train, then its flow
        version = store.read_pointer(training_claim_key("r")).version
    assert "released_at" in store.read_pointer(training_claim_key("r")).target
    assert store.read_pointer(training_claim_key("r")).version == version + 1


@pytest.mark.slow
def test_two_train_commands_of_one_run_started_together(store_url, tiny_run, prefect_api_url, ray_address, tmp_path):
    """The probe's case: both trained every block; the loser said "0 blocks trained now, 3 resumed"."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "RAY_ADDRESS": ray_address}
    command = [sys.executable, "-m", "flows.cli", "train", "--store", store_url, "--run-id", "twice"]
    command += ["--blocks", "3", "--epochs", "1", "--train-size", "300", "--heldout-size", "100"]
    logs = [tmp_path / f"train-{k}.log" for k in range(2)]
    processes = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT) for log in logs
    ]
    codes = sorted(process.wait(timeout=400) for process in processes)
    said = [log.read_text() for log in logs]
    assert codes == [0, 2], said
    winner, loser = (said[0], said[1]) if "3 blocks trained" in said[0] else (said[1], said[0])
    assert "3 blocks trained" in winner and "0 resumed" in winner, said
    assert "one training per run id at a time" in loser and "Wait for it to finish" in loser, said
    assert "blocks trained" not in loser
