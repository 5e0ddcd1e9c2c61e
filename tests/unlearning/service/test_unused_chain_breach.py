"""SPEC 5 reaches the unlearning chains no published version uses: ``store check`` reports them, ``--repair`` deletes.

An unlearning retrain writes its checkpoints to ``runs/<run>/chains/u<base>-<hash of what it leaves out>``. One that
stops half-way (its worker killed) leaves that folder behind; when the next pass retrains from the same base for a
larger set of requests (another request came in meanwhile), it writes and publishes another folder, and the first,
which left out only the first request's ids, still holds checkpoints trained on the second's. Once the second request
is done, those checkpoints are a SPEC 5 breach ("no stored checkpoint trained on a deleted id remains") that
``store check`` called healthy: it judged training chains only. Now it judges every chain of a run, names run, chain,
first block, id count and request, exits 1, and ``--repair`` deletes the checkpoints from the first block holding a
deleted id on, never one a published version uses.

The half-way retrain is a real ``ChainWorker.unlearn`` in a subprocess killed by SIGKILL, on file:// and on (moto) S3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.settle import run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.ledger import DONE
from storage.registry import RunRegistry
from tests.unlearning.service.chain_files import chain_blocks, id_in_block, store_check_cli

REPO = Path(__file__).resolve().parents[3]
OPTIONS = {"blocks": 3, "train_size": 300, "heldout_size": 100}
# epochs that make one block of 100 digits take a second or more, so the SIGKILL lands before block 3 is stored
SLOW_EPOCHS = 100


def _retrain_killed_half_way(url: str, store: ObjectStore, request_id: str, victim: int) -> str:
    """``ChainWorker.unlearn`` of ``request_id`` in a subprocess, SIGKILLed once block 2 is stored; its chain."""
    code = f"from actors.chains import ChainWorker; ChainWorker({url!r}).unlearn('r1', {{{request_id!r}: [{victim}]}})"
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            unlearning = [c for c, blocks in chain_blocks(store, "r1").items() if c.startswith("u") and 2 in blocks]
            if unlearning:
                process.send_signal(signal.SIGKILL)
                process.communicate(timeout=60)
                return unlearning[0]
            if process.poll() is not None:
                pytest.fail(f"the retrain ended before block 2: {process.communicate()[1][-3000:]}")
            time.sleep(0.1)
        pytest.fail("no checkpoint 2 of the retrain within 240 s")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)
    raise AssertionError  # unreachable


def test_store_check_reports_and_repairs_an_unlearning_chain_no_version_uses(any_store, tiny_run) -> None:
    url, store = any_store, ObjectStore(any_store)
    worker = ChainWorker(url)
    worker.train(run_spec(run_id="r1", split_seed=0, **tiny_run(**OPTIONS, epochs=SLOW_EPOCHS)))
    first, second = id_in_block(store, 1, "r1"), id_in_block(store, 2, "r1")
    submit_deletion(url, [first], dataset="digits", request_id="req-a", emit=False)
    stopped = _retrain_killed_half_way(url, store, "req-a", first)
    assert chain_blocks(store, "r1")[stopped][:2] == [1, 2]

    # req-b comes in meanwhile: the next pass retrains from the same base without both ids, into another folder
    submit_deletion(url, [second], dataset="digits", request_id="req-b", emit=False)
    settled = run_pass(url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})
    assert settled["settled"] == {"req-a": DONE, "req-b": DONE}
    registry = RunRegistry(store)
    used = {m.key for m in registry.manifest(registry.current("r1")).members.values()}
    assert not any(f"/chains/{stopped}/" in key for key in used), "the stopped retrain's chain is no version's"
    stored = chain_blocks(store, "r1")[stopped]

    code, said, report = store_check_cli(url)
    assert code == 1, said
    [held] = report["deleted_ids_held"]
    # it left req-a's id out (its name is the hash of that set) and holds req-b's, stored from block 2 on
    assert (held["run"], held["chain"], held["kind"], held["first_block"]) == ("r1", stopped, "unlearning", 2)
    assert (held["ids"], held["requests"], held["exclusions_known"]) == ([second], ["req-b"], True)
    assert held["blocks"] == [b for b in stored if b >= 2] and held["published"] is True
    assert "SPEC 5: run r1 (an unlearning chain no version uses" in said and f"chain {stopped}" in said, said
    assert "req-b" in said and "from block 2" in said

    code, said, report = store_check_cli(url, "--repair")
    assert code == 0, said
    assert [(e["run"], e["chain"], e["first_block"]) for e in report["erased"]] == [("r1", stopped, 2)]
    assert report["deleted_ids_held"] == []
    assert chain_blocks(store, "r1").get(stopped, []) == [1]  # block 1 never saw req-b's id (a young orphan, kept)
    assert all(store.exists(key) for key in used)  # what the published version uses is untouched
    chain, _ = registry.load_chain(registry.current("r1"))
    assert chain.deleted_ids == {int(p) for p in registry.spec("r1").positions([first, second])[0]}
