"""A holder whose claim was taken over (it stalled past its lease) stops its work at the next safe point.

c1ee851 made a taken-over holder stop renewing its lease, but its work went on until its release (which returned
``False``): a deletion pass wrote its batch record and settled, a training wrote its next checkpoints and published,
while the new holder did the same. Now the work checks its claim at each safe point (a pass: before claiming each
request, before its fan-out, its batch record and each settle; a training: before each checkpoint write, the
registration and the publish, in the Ray worker itself) and stops there, writing nothing more, with one line:
``claim on <pointer> (version v) was lost to <new holder> at <time>; <work> stopped without writing``.
The claims a pass takes on deletion requests are renewed the same checked way (they were renewed blindly).

Each holder is a real process, SIGSTOPped past its lease, taken over, then SIGCONTinued.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.settle import PASS_CLAIM_KEY
from flows.train import run_spec
from flows.unlearn import submit_deletion
from storage import ObjectStore
from storage.lease import ClaimLost, LeaseKeeper, claim_free, claim_leases, lease_key, renew, take_claim
from storage.ledger import CLAIMED, PENDING, DeletionLedger
from storage.registry import RunRegistry, training_claim_key
from tests.unlearning.service.chain_files import chain_blocks

REPO = Path(__file__).resolve().parents[3]

# One deletion pass with a 1 s lease, inside the store's pass claim ("pass") or alone ("request"), whose fan-out
# (the real in-process unlearning) says "fanning" and waits for the test's go before it unlearns.
_PASS = """
import json, logging, os, sys, time
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
from actors.chains import ChainWorker
from flows.settle import AttemptPolicy, held_pass_claim, run_pass, store_pass
from storage import ObjectStore
from storage.lease import ClaimLost
url, mode, go = sys.argv[1], sys.argv[2], sys.argv[3]
worker = ChainWorker(url)

def unlearn_runs(per_run):
    print("fanning", flush=True)
    claim = held_pass_claim(url) if mode == "pass-guarded" else None  # as flows.unlearn's fan-out gives it
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
    results = {}
    for run, requests in per_run.items():
        try:
            results[run] = worker.unlearn(run, requests, claim=claim)
        except ClaimLost as err:  # as the fan-out records a run whose worker raised
            results[run] = {"run_id": run, "status": "failed", "error": f"ClaimLost: {err}"}
    return results

attempts = AttemptPolicy(lease_s=1.0, first_backoff_s=60.0)
if mode in ("pass", "pass-guarded"):
    with store_pass(ObjectStore(url), holder="stalled-pass", lease_s=1.0) as other:
        assert other is None, other
        result = run_pass(url, unlearn_runs=unlearn_runs, attempts=attempts, holder="stalled-pass")
else:
    result = run_pass(url, unlearn_runs=unlearn_runs, attempts=attempts, holder="stalled-pass")
print(json.dumps(result, default=str), flush=True)
"""


@pytest.fixture
def filed(any_store, tiny_run):
    """Run r1 trained and registered in ``any_store``, and request req-1 for one of its ids filed."""
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=3, train_size=300, heldout_size=100))
    ChainWorker(any_store).train(spec)
    submit_deletion(any_store, [int(spec["train_ids"][0])], dataset="digits", request_id="req-1", emit=False)
    return any_store


def _stalled_pass(url: str, mode: str, tmp_path: Path, take_over) -> tuple[dict, str, object]:
    """Run the pass, SIGSTOP it while it fans out, let its 1 s lease lapse, ``take_over()``, SIGCONT, let it end."""
    go = tmp_path / "go"
    holder = subprocess.Popen(
        [sys.executable, "-c", _PASS, url, mode, str(go)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "fanning", holder.stderr.read()
        os.kill(holder.pid, signal.SIGSTOP)
        time.sleep(1.6)  # past its 1 s lease
        taken = take_over()
        os.kill(holder.pid, signal.SIGCONT)
        time.sleep(1.5)  # six renewal periods of the woken holder before its fan-out returns
        go.touch()
        out, err = holder.communicate(timeout=180)
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.wait()
    assert holder.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err, taken


def test_a_pass_whose_store_claim_was_taken_over_stops_before_its_batch_record_and_hands_its_requests_back(
    filed, tmp_path
):
    url, store = filed, ObjectStore(filed)
    ledger = DeletionLedger(store)
    before = {}

    def take_over():
        before["claim"] = store.read_pointer(PASS_CLAIM_KEY)
        assert before["claim"].target["holder"] == "stalled-pass"
        return take_claim(store, PASS_CLAIM_KEY, holder={"host": "elsewhere", "pid": 4242, "holder": "the taker"})

    result, err, taker = _stalled_pass(url, "pass", tmp_path, take_over)
    # nothing written after the fan-out: no batch record, the request not settled but handed back (attempt not counted)
    assert store.list("ledger/batches") == []
    status = ledger.get("req-1")
    assert status.status == PENDING and int(status.details["attempts"]) == 0, status
    assert "lost its claim on the store" in status.details["handed_back"]["reason"]
    assert result["settled"] == {"req-1": PENDING} and "req-1" not in result["lost"]
    # said in one line, also the pass's result
    said = [line for line in err.splitlines() if "stopped without writing" in line]
    assert len(said) == 1, err
    assert said[0].endswith(result["claim_lost"]), (said, result)
    assert (
        f"claim on {store.uri(PASS_CLAIM_KEY)} (version {before['claim'].version}) was lost to the taker, pid 4242 on "
        f"elsewhere (version {taker.version}) at " in said[0]
    )
    assert "deletion pass stalled-pass (before recording its batch) stopped without writing" in said[0]
    assert "was taken over: its holder did not renew" not in err, err  # the keeper's line is not said as well
    # the taker's claim untouched
    current = store.read_pointer(PASS_CLAIM_KEY)
    assert current.version == taker.version and current.target == taker.holder
    assert store.list(claim_leases(PASS_CLAIM_KEY)) == [lease_key(PASS_CLAIM_KEY, taker.version, folder=taker.folder)]


def test_a_fan_out_whose_pass_was_taken_over_before_it_unlearned_writes_no_checkpoint(filed, tmp_path):
    # The fan-out's workers are given the pass claim (flows.settle.held_pass_claim): the unlearning of a stalled
    # pass ran in full, writing a retrained chain beside its taker's, and was stopped only at the pass's next safe
    # point. It stops now before its first write.
    url, store = filed, ObjectStore(filed)
    before: dict = {}

    def take_over():
        before["keys"] = set(store.list("runs/r1"))
        return take_claim(store, PASS_CLAIM_KEY, holder={"host": "elsewhere", "pid": 4242, "holder": "the taker"})

    result, err, _taker = _stalled_pass(url, "pass-guarded", tmp_path, take_over)
    assert set(store.list("runs/r1")) == before["keys"]  # no checkpoint, manifest or pointer version written
    assert RunRegistry(store).current("r1").version == 1
    assert result["settled"] == {"req-1": PENDING}, result  # handed back, attempt not counted
    status = DeletionLedger(store).get("req-1")
    assert status.status == PENDING and int(status.details["attempts"]) == 0, status
    worker_line = [line for line in err.splitlines() if "the unlearning of run r1 stopped without writing" in line]
    assert len(worker_line) == 1 and f"claim on {store.uri(PASS_CLAIM_KEY)}" in worker_line[0], err
    assert "deletion pass stalled-pass (before recording its batch) stopped without writing" in err, err


def test_a_request_claim_taken_over_while_its_pass_stalled_is_renewed_no_more_and_left_to_its_taker(filed, tmp_path):
    url, store = filed, ObjectStore(filed)
    ledger = DeletionLedger(store)
    before = {}

    def take_over():
        before["status"] = ledger.get("req-1")
        assert before["status"].status == CLAIMED and before["status"].details["holder"] == "stalled-pass"
        taken = ledger.claim("req-1", holder="the taker", lease_s=1.0, max_attempts=3)
        assert taken is not None and taken.version > before["status"].version
        renew(store, "req-1", claim_version=taken.version, holder="the taker", lease_s=60.0)
        return taken

    result, err, taken = _stalled_pass(url, "request", tmp_path, take_over)
    mine = before["status"].version
    # no lease of the lost claim: neither renewed after the wake nor left behind
    assert store.list("ledger/leases/req-1") == [lease_key("req-1", taken.version)]
    now = ledger.get("req-1")
    assert (now.status, now.version, now.details["holder"]) == (CLAIMED, taken.version, "the taker")
    assert result["lost"] == ["req-1"] and result["settled"] == {} and "claim_lost" not in result
    said = [line for line in err.splitlines() if "stopped without writing" in line]
    assert len(said) == 1, err
    status_uri = store.uri("ledger/status/req-1")
    assert (
        f"claim on {status_uri} (version {mine}) was lost to pass 'the taker' (version {taken.version}) at " in said[0]
    )
    assert "the erasure and settle of request req-1 stopped without writing" in said[0]
    # one line per lost claim: the keeper found it at a renewal too, but the pass's line is the one said
    assert "was taken over: its holder did not renew" not in err, err


def test_a_request_claims_renewal_checks_the_claim_is_still_its_own(filed, caplog):
    """The keeper of a pass's request claims: a claim taken over is noticed at its renewal, never renewed again."""
    store = ObjectStore(filed)
    ledger = DeletionLedger(store)
    taken = ledger.claim("req-1", holder="a", lease_s=0.5, max_attempts=3)
    mine = ledger.request_claim(taken, lease_s=0.5)
    keeper = LeaseKeeper(store, lease_s=0.5, holder="a")  # not started: a pass whose renewals stalled
    assert keeper.hold_claim(mine) and keeper.check(mine)
    assert store.list("ledger/leases/req-1") == [lease_key("req-1", taken.version)]
    time.sleep(0.7)
    taker = ledger.claim("req-1", holder="b", lease_s=0.5, max_attempts=3)
    assert taker is not None and taker.version > taken.version
    with caplog.at_level(logging.WARNING, logger="storage.lease"), keeper:
        deadline = time.monotonic() + 10
        while not keeper.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert keeper.lost == [mine.key] and keeper.lost_event.is_set()
        renewals = keeper.renewals
        time.sleep(0.5)
        assert keeper.renewals == renewals
    assert not keeper.check(mine)
    assert store.list("ledger/leases/req-1") == []
    said = [r.getMessage() for r in caplog.records if "was taken over" in r.getMessage()]
    assert len(said) == 1 and f"now at version {taker.version}: pass 'b'" in said[0], said
    # a claim released by its own holder before its own write moves it is not lost
    own = ledger.claim("req-1", holder="c", lease_s=0.5, max_attempts=3)  # b renewed nothing: lapsed
    assert own is not None
    keeper2 = LeaseKeeper(store, lease_s=0.4, holder="c")
    with keeper2:
        claim = ledger.request_claim(own, lease_s=0.4)
        assert keeper2.hold_claim(claim)
        keeper2.release(claim.key)
        assert ledger.settle("req-1", claim_version=own.version, status=PENDING, details={}) is not None
        time.sleep(0.5)
    assert keeper2.lost == [] and keeper2.check(claim)


# ----- a training: the Ray worker stops writing once the claim it trains under was taken over --------------------

# epochs that make one block of 50 digits take a few seconds, so blocks remain to be trained after a 20 s stall
SLOW_EPOCHS = 1500  # CI once stored all 12 blocks at 500 before the lease lapsed
BLOCKS = 12


@pytest.mark.slow
def test_a_training_whose_driver_stalled_and_was_taken_over_writes_no_further_checkpoint(
    any_store, prefect_api_url, tiny_run
):
    """A real `obliviate train`: its process (which renews the claim) SIGSTOPped, its Ray worker training on."""
    url, store = any_store, ObjectStore(any_store)
    options = tiny_run(blocks=BLOCKS, train_size=600, heldout_size=100)
    words = ["--data", options["data"], "--model", options["model"], "--blocks", str(BLOCKS)]
    words += ["--epochs", str(SLOW_EPOCHS), "--batch-size", str(options["batch_size"])]
    words += ["--lr", str(options["learning_rate"]), "--schedule", options["schedule"]]
    words += ["--train-size", str(options["train_size"]), "--heldout-size", str(options["heldout_size"])]
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    env |= {"PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "PYTHONUNBUFFERED": "1"}
    train = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", "--store", url, "--run-id", "rt", *words],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    key = training_claim_key("rt")
    try:
        deadline = time.monotonic() + 300
        while not any(1 in blocks for blocks in chain_blocks(store, "rt").values()):
            assert train.poll() is None, train.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint 1 of rt in 300 s"
            time.sleep(0.2)
        os.kill(train.pid, signal.SIGSTOP)  # the driver stalls; its Ray worker trains and writes on
        stalled = store.read_pointer(key)
        deadline = time.monotonic() + 60
        while not claim_free(store, stalled, gone=None, now=time.time()):  # its 20 s lease, unrenewed, lapses
            assert time.monotonic() < deadline
            time.sleep(0.2)
        taker = take_claim(store, key, holder={"host": "elsewhere", "pid": 4242, "command": "the taker"})
        at_take_over = chain_blocks(store, "rt")
        time.sleep(15)  # the worker, alone, would write several more blocks meanwhile
        after = chain_blocks(store, "rt")
        os.kill(train.pid, signal.SIGCONT)
        _, err = train.communicate(timeout=180)
    finally:
        if train.poll() is None:
            os.kill(train.pid, signal.SIGCONT)
            train.kill()
            train.wait()
    (chain,) = at_take_over
    # at most the checkpoint whose write was under way at the take-over lands after it; nothing later, no version
    assert after == chain_blocks(store, "rt"), (after, chain_blocks(store, "rt"))
    assert len(after[chain]) <= len(at_take_over[chain]) + 1, (at_take_over, after)
    assert after[chain][-1] < BLOCKS, after
    assert RunRegistry(store).current("rt") is None and not RunRegistry(store).is_registered("rt")
    current = store.read_pointer(key)
    assert current.version == taker.version and current.target == taker.holder  # its release refused
    assert train.returncode != 0 and "Traceback" not in err, err[-3000:]
    said = [line for line in err.splitlines() if "stopped without writing" in line]
    # once by the run's state line, once as the command's error (Prefect's "Encountered exception" line was a third)
    assert len(said) == 2 and said[1].startswith("obliviate train: error: "), err[-3000:]
    assert all(
        f"claim on {store.uri(key)} (version {stalled.version}) was lost to the taker, pid 4242 on elsewhere "
        f"(version {taker.version}) at "
        in line
        and "the training of run rt stopped without writing" in line
        for line in said
    ), said


def test_a_training_that_finds_its_run_served_but_unregistered_registers_it_only_while_it_holds_the_claim(
    any_store, tiny_run
) -> None:
    # A run served but not registered (its registration failed after its publish) is registered, and its missed
    # requests unlearned, by the next training of it: that branch wrote without reading the claim first.
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=2, train_size=200, heldout_size=100))
    worker = ChainWorker(any_store)
    worker.train(spec)
    store = ObjectStore(any_store)
    store.delete("registry/r1.json")
    key = training_claim_key("r1")
    stalled = take_claim(store, key, holder={"host": "here", "pid": 1, "command": "obliviate train"})
    taker = take_claim(
        store, key, holder={"host": "elsewhere", "pid": 4242, "command": "obliviate train"}, gone=lambda _: True
    )
    assert taker.version > stalled.version
    submit_deletion(any_store, [int(spec["train_ids"][0])], dataset="digits", request_id="req-late", emit=False)

    with pytest.raises(ClaimLost, match=r"was lost to .*; the training of run r1 stopped without writing"):
        worker.train(spec, {"key": stalled.key, "version": stalled.version, "holder": stalled.holder})

    registry = RunRegistry(store)
    assert not registry.is_registered("r1") and registry.current("r1").version == 1  # nothing written
    assert DeletionLedger(store).get("req-late").status == PENDING
    # its holder's training does the same work
    summary = worker.train(spec, {"key": taker.key, "version": taker.version, "holder": taker.holder})
    assert summary["status"] == "already_trained" and summary["late_requests"] == ["req-late"], summary
    assert registry.is_registered("r1") and registry.current("r1").version == 2


@pytest.mark.parametrize("taken_over", [False, True])
def test_a_batch_gate_whose_pass_claim_was_taken_over_records_no_batch_and_rolls_nothing_back(
    filed, taken_over: bool
) -> None:
    # The gate of a pass (serve --batch-window --rollback) wrote the open batch and published interim versions
    # without reading the pass claim: a pass taken over while it stalled wrote them beside its taker's.
    from flows.batching import OPEN_BATCH_KEY, batch_gate, save_policy
    from flows.settle import lost_pass_claim, store_pass
    from obliviate.unlearning.batching import BatchPolicy
    from storage.serving import save_rollback

    store = ObjectStore(filed)
    save_policy(store, BatchPolicy(window_s=3600.0))
    save_rollback(store, enabled=True, floor_points=100.0)  # any interim meets the floor: r1 would roll back
    with store_pass(store, holder="stalled-pass", lease_s=1.0) as other:
        assert other is None
        if taken_over:
            # as a taker does once the stalled pass's lease lapsed (this one is live: it is told it is gone)
            take_claim(
                store,
                PASS_CLAIM_KEY,
                holder={"host": "elsewhere", "pid": 4242, "holder": "the taker"},
                gone=lambda _: True,
            )
            deadline = time.monotonic() + 10  # its keeper finds the claim moved at its next renewal (every 0.25 s)
            while lost_pass_claim(store, where="waiting") is None and time.monotonic() < deadline:
                time.sleep(0.05)
        gate = batch_gate(store, DeletionLedger(store).due_entries(lease_s=60.0))

    current = RunRegistry(store).current("r1")
    if not taken_over:  # the same gate, its claim its own: the batch recorded, r1 rolled back
        assert gate["requests"] == ["req-1"] and not gate["flush"], gate
        assert store.exists(OPEN_BATCH_KEY) and current.version == 2, current
        return
    assert gate["reason"] == "claim_lost" and not gate["flush"] and gate["requests"] == [], gate
    assert "deletion pass" in gate["claim_lost"], gate
    assert "(before rejecting requests at its batch gate) stopped without writing" in gate["claim_lost"], gate
    assert not store.exists(OPEN_BATCH_KEY) and current.version == 1, current
    assert DeletionLedger(store).get("req-1").status == PENDING


@pytest.mark.parametrize("acknowledged", [False, True])
def test_a_loss_its_holder_says_is_said_once_and_the_keeper_says_one_its_holder_never_did(
    filed, caplog, acknowledged: bool
) -> None:
    # A lost claim was said twice: by the keeper when a renewal found it moved, and by the pass's own stop line.
    # Held with loss_said_by_holder, the keeper says it only if it stops with the loss not said by the holder.
    store = ObjectStore(filed)
    ledger = DeletionLedger(store)
    taken = ledger.claim("req-1", holder="a", lease_s=0.5, max_attempts=3)
    mine = ledger.request_claim(taken, lease_s=0.5)
    keeper = LeaseKeeper(store, lease_s=0.5, holder="a")  # not started: a pass whose renewals stalled
    assert keeper.hold_claim(mine, loss_said_by_holder=True)
    time.sleep(0.7)
    assert ledger.claim("req-1", holder="b", lease_s=0.5, max_attempts=3) is not None

    def keeper_lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and "was taken over" in r.getMessage()
        ]

    with caplog.at_level(logging.WARNING, logger="storage.lease"):
        with keeper:
            deadline = time.monotonic() + 10
            while not keeper.lost and time.monotonic() < deadline:
                time.sleep(0.05)
            assert keeper.lost == [mine.key]
            assert keeper_lines() == []  # left to the holder's line
            if acknowledged:
                keeper.said_lost(mine.key)
        said = keeper_lines()
    if acknowledged:
        assert said == []
    else:  # the holder never said it: the keeper does, once, as it stops
        assert len(said) == 1 and f"version {mine.version}" in said[0] and "pass 'b'" in said[0], said


# ----- a worker on a node that does not see its driver's store ----------------------------------------------------


@pytest.mark.parametrize("work", ["train", "unlearn"])
def test_a_worker_whose_node_reads_another_store_at_its_url_stops_before_writing_and_says_the_store_is_not_shared(
    any_store, tiny_run, tmp_path, work: str
) -> None:
    # On a joined cluster a file:// store that only the driver's machine has is, to a worker on another node, an
    # empty (or another) folder at the same path; a worker reaching another S3 endpoint sees another bucket. A
    # training worker there wrote its run's spec and first checkpoint to that node's disk, then said its claim "was
    # lost to another holder at an unknown time". The worker is given the other node's view of the store's URL.
    store = ObjectStore(any_store)
    if store.is_local:
        node_url = f"file://{tmp_path}/other-node/store"
    else:
        node_url = f"s3://node-{uuid.uuid4().hex[:10]}/store"
        ObjectStore(node_url).ensure_container()
    node_store = ObjectStore(node_url)
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=2, train_size=200, heldout_size=100))
    worker = ChainWorker(node_url)
    if work == "train":
        claim = take_claim(store, training_claim_key("r1"), holder={"host": "driver", "pid": 1, "command": "train"})
        given = {"key": claim.key, "version": claim.version, "holder": claim.holder}
        call, what = functools.partial(worker.train, spec, given), "the training of run r1"
    else:
        ChainWorker(store.url).train(spec)
        claim = take_claim(store, PASS_CLAIM_KEY, holder={"host": "driver", "pid": 1, "holder": "the pass"})
        given = {"key": claim.key, "version": claim.version, "holder": claim.holder}
        requests = {"req-1": [int(spec["train_ids"][0])]}
        call, what = functools.partial(worker.unlearn, "r1", requests, claim=given), "the unlearning of run r1"

    with pytest.raises(ClaimLost) as raised:
        call()

    said = str(raised.value)
    assert said.startswith(
        f"claim on {node_store.uri(claim.key)} (version {claim.version}) is not in the store as this process (pid "
    ), said
    assert said.endswith(f"; {what} stopped without writing"), said
    assert ("a folder every node mounts at the same path (NFS, EFS)" if store.is_local else "AWS_ENDPOINT_URL") in said
    assert node_store.list("") == [] and node_store.list_pointers("") == []  # nothing written on that node
    assert not (tmp_path / "other-node").exists()  # not even the folder
