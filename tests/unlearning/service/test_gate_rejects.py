"""Requests for ids the pass rejects sat "pending, batched until ..." and were rejected only when the
batch flushed (421 of a 2,000 batch; a day later with --batch-window 1d), each with its own WARNING line.
Now the batch gate rejects them as they join, with one summary line per gate. The ids the pass rejects are
those past the dataset's rows (ids of rows no run trained on are accepted: test_held_out_ids_accepted); such
a request is written with DeletionLedger.append, as one filed where the dataset does not load would be."""

from __future__ import annotations

import logging

from flows.batching import batch_gate, batch_status, save_policy
from flows.train import run_spec
from obliviate.unlearning.batching import BatchPolicy
from obliviate.unlearning.service import RunSpec
from storage import ObjectStore
from storage.ledger import PENDING, REJECTED, DeletionLedger
from storage.registry import RunRegistry


def test_the_batch_gate_rejects_ids_past_the_rows_as_they_join_with_one_line(tmp_path, tiny_run, caplog):
    store = ObjectStore(f"file://{tmp_path / 'store'}")
    store.ensure_container()
    spec = RunSpec.from_dict(run_spec(run_id="r", **tiny_run(split_seed=0)))
    registry = RunRegistry(store)
    registry.put_spec(spec)
    registry.register(spec, block_ids=[])
    save_policy(store, BatchPolicy(window_s=86_400.0))  # serve --batch-window 1d
    trained = {int(i) for i in spec.to_dict()["train_ids"]}
    past_rows = [1797 + n for n in range(5)]  # digits has rows 0..1796
    ledger = DeletionLedger(store)
    ledger.append(request_id="good", ids=[min(trained)], dataset="digits", reason=None)
    for n, i in enumerate(past_rows):
        ledger.append(request_id=f"bad-{n}", ids=[i], dataset="digits", reason=None)

    with caplog.at_level(logging.WARNING, logger="flows.batching"):
        gate = batch_gate(store, ledger.due_entries(lease_s=60.0))

    assert not gate["flush"] and gate["requests"] == ["good"]  # only the good one waits a day
    assert sorted(gate["rejected"]) == [f"bad-{n}" for n in range(5)]
    for n, i in enumerate(past_rows):
        entry = ledger.get(f"bad-{n}")
        assert entry.status == REJECTED and f"(1797 rows: ids 0..1796); got [{i}]" in entry.details["reason"]
        assert batch_status(store, f"bad-{n}") is None  # not "batched until" anything
    assert ledger.get("good").status == PENDING
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("5 request(s) rejected as they joined the batch"), lines
    assert ledger.open_request_ids() == ["good"]


def test_an_event_whose_request_the_gate_rejects_fails_at_once_as_processed(store_url, prefect_api_url, tiny_run):
    """The sender of a request for ids past the rows learns it when the event is handled, not when the batch flushes."""
    from flows.unlearn import submit_deletion, unlearn_flow

    store = ObjectStore(store_url)
    store.ensure_container()
    spec = RunSpec.from_dict(run_spec(run_id="r", **tiny_run(split_seed=0)))
    RunRegistry(store).put_spec(spec)
    RunRegistry(store).register(spec, block_ids=[])
    save_policy(store, BatchPolicy(window_s=86_400.0))
    trained = {int(i) for i in spec.to_dict()["train_ids"]}
    waiting = submit_deletion(store_url, [min(trained)], dataset="digits", emit=False)["request_id"]
    past_rows = 1797  # submit_deletion refuses it up front where digits loads; filed where it did not
    bad = "bad"
    DeletionLedger(store).append(request_id=bad, ids=[past_rows], dataset="digits", reason=None)

    state = unlearn_flow(store=store_url, payload={"request_id": bad}, event_id="ev-bad", return_state=True)

    assert state.is_failed()
    assert f"got [{past_rows}], no row of it" in str(state.message)
    record = DeletionLedger(store).event("ev-bad")
    assert record["outcome"] == "processed" and record["status"] == REJECTED  # it said "duplicate"
    assert DeletionLedger(store).get(waiting).status == PENDING  # the good one still waits in its batch


def test_a_pass_logs_its_rejections_in_one_line(tmp_path, tiny_run, caplog):
    """With no batch window the pass itself rejects: one WARNING per request before (645 in one serve log)."""
    from flows.settle import AttemptPolicy, run_pass

    store = ObjectStore(f"file://{tmp_path / 'store'}")
    store.ensure_container()
    spec = RunSpec.from_dict(run_spec(run_id="r", **tiny_run(split_seed=0)))
    RunRegistry(store).put_spec(spec)
    RunRegistry(store).register(spec, block_ids=[])
    ledger = DeletionLedger(store)
    for n, i in enumerate(range(1797, 1797 + 8)):  # past digits' rows
        ledger.append(request_id=f"bad-{n}", ids=[i], dataset="digits", reason=None)

    logger = logging.getLogger("test-pass")
    with caplog.at_level(logging.WARNING, logger="test-pass"):
        result = run_pass(store.url, unlearn_runs=lambda per_run: {}, attempts=AttemptPolicy(), logger=logger)

    assert set(result["settled"].values()) == {REJECTED} and len(result["settled"]) == 8
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("rejected 8 request(s): bad-0"), lines
    assert "row index of dataset 'digits'" in lines[0]
