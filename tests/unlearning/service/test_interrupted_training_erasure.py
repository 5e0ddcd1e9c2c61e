"""SPEC 5 reaches the checkpoints of a training interrupted before it published (so before it registered its run).

A new user's repro (probe 107): `obliviate train --run-id r-y ... --blocks 3` stopped by Ctrl-C after 2 blocks left
runs/r-y/chains/<chain>/ckpt-0000..0002 in the store, unregistered. `obliviate forget --ids 1418` (1418 in r-y's
block 1) then ended `done` with ckpt-0001 and ckpt-0002, trained on 1418, still stored, and `store check` said
0 damaged, 0 lineage problems, 0 orphans. Now the pass that settles the request deletes those checkpoints (from the
earliest block holding an id on; the ones before it never saw the ids, and a rerun resumes from them) and names the
run in the request's record; a run being trained right then is left to its training. `store check` reports a stored
checkpoint holding an id of a settled request as a SPEC 5 breach (exit 1), `--repair` deletes it, and an unfinished
training that holds no deleted id is said as what it is.

The interrupted training is a real `obliviate train` subprocess stopped by SIGINT, on file:// and on (moto) S3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from actors.chains import ChainWorker
from flows.settle import run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.ledger import DONE, DeletionLedger
from storage.registry import RunRegistry
from tests.unlearning.service.chain_files import chain_blocks, id_in_block, store_check_cli, wait_for_block

REPO = Path(__file__).resolve().parents[3]
# r1 (registered, trained in-process) and r-y (the interrupted CLI training) share the split and the block plan,
# so an id of r-y's block 1 is one that r1 trained on too: a request for it is accepted and becomes done.
OPTIONS = {"blocks": 3, "train_size": 300, "heldout_size": 100}
# epochs that make one block of 100 digits take seconds, so SIGINT lands while block 3 trains
SLOW_EPOCHS = 600


def _env(prefect_api_url: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    return env | {"PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "PYTHONUNBUFFERED": "1"}


def _start_interrupted_training(url: str, prefect_api_url: str, tiny_run) -> subprocess.Popen:
    """`obliviate train --run-id r-y` with tiny_run's options (3 blocks) and slow blocks, as a subprocess."""
    options = tiny_run(**OPTIONS)
    words = ["--data", options["data"], "--model", options["model"], "--blocks", str(options["blocks"])]
    words += ["--epochs", str(SLOW_EPOCHS), "--batch-size", str(options["batch_size"])]
    words += ["--lr", str(options["learning_rate"]), "--schedule", options["schedule"]]
    words += ["--train-size", str(options["train_size"]), "--heldout-size", str(options["heldout_size"])]
    words += ["--seed", str(options["seed"]), "--min-lr-fraction", "0"]  # run_spec's default (the CLI's is 0.3)
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", "--store", url, "--run-id", "r-y", *words],
        cwd=REPO,
        env=_env(prefect_api_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]


def _pass(url: str) -> dict:
    worker = ChainWorker(url)
    return run_pass(url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})


def test_a_settled_request_deletes_what_an_interrupted_training_holds_of_its_ids(
    any_store, prefect_api_url, tiny_run
) -> None:
    url, store = any_store, ObjectStore(any_store)
    ChainWorker(url).train(run_spec(run_id="r1", split_seed=0, **tiny_run(**OPTIONS)))
    process = _start_interrupted_training(url, prefect_api_url, tiny_run)
    try:
        chain = wait_for_block(store, process, 2, "r-y")
        _interrupt(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert not RunRegistry(store).is_registered("r-y")
    stored = chain_blocks(store, "r-y")[chain]
    assert stored[:3] == [0, 1, 2], stored

    # No deleted id held yet: store check says the unfinished training as what it is, and the store is healthy.
    code, said, report = store_check_cli(url)
    assert code == 0, said
    assert [(u["run"], u["chain"]) for u in report["unfinished_trainings"]] == [("r-y", chain)]
    assert "unfinished training: run r-y (not registered" in said and "MB" in said

    victim = id_in_block(store, 1, "r-y")
    request = submit_deletion(url, [victim], dataset="digits", emit=False)["request_id"]
    assert _pass(url)["settled"] == {request: DONE}

    left = chain_blocks(store, "r-y").get(chain, [])
    assert left == [0], f"checkpoints from block 1 on were trained on {victim}; left: {left}"
    details = DeletionLedger(store).get(request).details
    purged = details["interrupted_trainings"]["purged"]["r-y"][chain]
    assert purged["first_block"] == 1 and purged["blocks"] == [b for b in stored if b >= 1]
    assert purged["ids_count"] == 1 and purged["bytes"] > 0
    assert "r1" in details["runs"]  # the registered run was unlearned as before

    code, said, report = store_check_cli(url)
    assert code == 0, said
    assert report["deleted_ids_held"] == []

    # What a rerun resumes from is intact: M_0, which never saw the ids (the rerun carries it into the chain of its
    # larger left-out set and trains blocks 1..3 without them). Trained through once, on the file store (slow blocks).
    resume_point = RunRegistry(store).stored_checkpoints("r-y", chain, first=0)
    assert [checkpoint.block_index for checkpoint, _, _ in resume_point] == [0]
    if not url.startswith("file://"):
        return
    summary = ChainWorker(url).train(run_spec(run_id="r-y", split_seed=0, **tiny_run(**OPTIONS, epochs=SLOW_EPOCHS)))
    assert summary["status"] == "trained" and request in summary["left_out_for_requests"]


def test_store_check_reports_and_repairs_a_checkpoint_holding_a_deleted_id(
    any_store, prefect_api_url, tiny_run
) -> None:
    """A request settled while r-y was being trained is left to that training; the training then stops (SIGINT)."""
    url, store = any_store, ObjectStore(any_store)
    ChainWorker(url).train(run_spec(run_id="r1", split_seed=0, **tiny_run(**OPTIONS)))
    process = _start_interrupted_training(url, prefect_api_url, tiny_run)
    try:
        chain = wait_for_block(store, process, 1, "r-y")
        victim = id_in_block(store, 1, "r-y")
        request = submit_deletion(url, [victim], dataset="digits", emit=False)["request_id"]
        assert _pass(url)["settled"] == {request: DONE}
        details = DeletionLedger(store).get(request).details
        assert "r-y" in details["interrupted_trainings"]["left_to_training"]  # its claim was live: left to it
        wait_for_block(store, process, 2, "r-y")
        _interrupt(process)
    finally:
        if process.poll() is None:
            process.kill()
    stored = chain_blocks(store, "r-y")[chain]
    assert stored[:3] == [0, 1, 2], stored

    code, said, report = store_check_cli(url)
    assert code == 1, said
    [held] = report["deleted_ids_held"]
    assert (held["run"], held["chain"], held["first_block"], held["ids_count"]) == ("r-y", chain, 1, 1)
    assert held["requests"] == [request]
    assert "SPEC 5: run r-y (not registered" in said and f"chain {chain}" in said and request in said
    assert "from block 1" in said

    code, said, report = store_check_cli(url, "--repair")
    assert code == 0, said
    assert [(e["run"], e["chain"], e["first_block"]) for e in report["erased"]] == [("r-y", chain, 1)]
    assert chain_blocks(store, "r-y")[chain] == [0]
    assert report["deleted_ids_held"] == []
    assert [(u["run"], u["chain"], u["blocks"]) for u in report["unfinished_trainings"]] == [("r-y", chain, [0])]
