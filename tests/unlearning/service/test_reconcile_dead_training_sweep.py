"""The scheduled reconcile pass deletes what a training that died before publishing holds of settled ids (SPEC 5).

The pass that settles a request leaves a run being trained right then to its training (it leaves the request's ids
out before it publishes; the request's record says ``left_to_training``). When that training then dies (SIGKILL, a
lost machine), nothing published, and its checkpoints from the block holding the id on stayed in the store, trained
on it, until someone ran ``obliviate store check --repair``. Now each reconcile pass (serve's cron) sweeps such runs
once their training claim is free (the holder is gone), deletes those checkpoints (the checkpoints before the block
stay, and a rerun resumes from them) and says it on the request: ``details.interrupted_trainings.purged``, as the pass
writes it, and the run leaves ``left_to_training``.

The dead training is a real ``ChainWorker.train`` under the run's training claim (what ``obliviate train`` runs, here
without Ray) in a subprocess killed by SIGKILL, on file:// and on (moto) S3; the reconcile flow runs against a real
Prefect server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from actors.chains import ChainWorker
from flows.reconcile import reconcile_flow
from flows.settle import run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.check import check_store
from storage.ledger import DONE, DeletionLedger
from tests.unlearning.service.chain_files import chain_blocks, id_in_block, wait_for_block

REPO = Path(__file__).resolve().parents[3]
# r1 (trained in-process, registered) and r-y (the training that dies) share the split and the block plan, so an id
# of r-y's block 1 is one r1 trained on too: a request for it is accepted and becomes done.
OPTIONS = {"blocks": 3, "train_size": 300, "heldout_size": 100}
SLOW_EPOCHS = 100  # a block of 100 digits takes a second or more: the kill lands before block 3 is stored


def _training(url: str, tiny_run) -> subprocess.Popen:
    """r-y trained under its training claim in a subprocess, as ``obliviate train`` does (without Ray)."""
    spec = run_spec(run_id="r-y", split_seed=0, **tiny_run(**OPTIONS, epochs=SLOW_EPOCHS))
    code = (
        "import json, sys\n"
        "from actors.chains import ChainWorker\n"
        "from flows.train import training_claim\n"
        # a long lease: the training, paused while the pass runs, still holds its claim (a gone process's claim is
        # taken over at once, whatever its lease)
        f"with training_claim({url!r}, 'r-y', lease_s=600.0):\n"
        f"    ChainWorker({url!r}).train(json.loads(sys.argv[1]))\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(spec)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process


def test_reconcile_deletes_what_a_dead_training_left_to_holds_of_a_settled_request(
    any_store, prefect_api_url, tiny_run
) -> None:
    url, store = any_store, ObjectStore(any_store)
    worker = ChainWorker(url)
    worker.train(run_spec(run_id="r1", split_seed=0, **tiny_run(**OPTIONS)))
    process = _training(url, tiny_run)
    try:
        chain = wait_for_block(store, process, 1, "r-y")
        # Paused from the moment block 1 is seen until the pass is done, so it is still training (unpublished)
        # when the pass looks, however slow the request and the pass are on a loaded machine. Paused only after
        # the request was sent, a training that finished its blocks meanwhile read the request before publishing,
        # left the id out itself and published, so the pass had no interrupted training to leave it to (CI).
        process.send_signal(signal.SIGSTOP)
        try:
            victim = id_in_block(store, 1, "r-y")
            request = submit_deletion(url, [victim], dataset="digits", emit=False)["request_id"]
            settled = run_pass(url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})
        finally:
            process.send_signal(signal.SIGCONT)
        assert settled["settled"] == {request: DONE}
        assert not store.exists("runs/r-y/current"), "r-y published before the pass: nothing was left to its training"
        details = DeletionLedger(store).get(request).details
        said = details.get("interrupted_trainings", {})
        assert "r-y" in said.get("left_to_training", {}), details  # its claim was live: left to it
        assert "purged" not in said, said
        wait_for_block(store, process, 2, "r-y")
        process.send_signal(signal.SIGKILL)  # the training dies: no release of its claim, nothing published
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=60)
    stored = chain_blocks(store, "r-y")[chain]
    assert stored[:3] == [0, 1, 2], stored
    assert not store.exists("runs/r-y/current")

    result = reconcile_flow(store=url)

    assert chain_blocks(store, "r-y").get(chain, []) == [0], "checkpoints from block 1 on were trained on the id"
    swept = result["dead_trainings"]["purged"]["r-y"][chain]
    assert (swept["first_block"], swept["blocks"], swept["requests"]) == (1, [b for b in stored if b >= 1], [request])
    said = DeletionLedger(store).get(request).details["interrupted_trainings"]
    purged = said["purged"]["r-y"][chain]
    assert purged["first_block"] == 1 and purged["ids_count"] == 1 and purged["bytes"] > 0, purged
    assert purged["swept_at"] > 0 and "r-y" not in said.get("left_to_training", {}), said
    report = check_store(store, min_age_s=0)
    assert report.deleted_ids_held == [], report.deleted_ids_held

    told = len(DeletionLedger(store).history(request))
    again = reconcile_flow(store=url)  # nothing left: nothing deleted, nothing written
    assert again["dead_trainings"] is None and len(DeletionLedger(store).history(request)) == told
