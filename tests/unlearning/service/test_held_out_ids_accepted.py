"""A deletion request naming a row of the dataset that no registered run trained on (a run's held-out set, or never
used) was rejected as a whole ("unknown ids [...]: no registered run ... trained on them"), the trained ids with it.
The right to erasure covers that row too: such ids are accepted with nothing to forget now, recorded on the request
(``details.not_trained_on``) and left out of every later training of the dataset; a request of such ids only is done
with no fan-out. Only an id that is no row of the dataset is still refused."""

from __future__ import annotations

import logging
from pathlib import Path

from actors.chains import ChainWorker
from flows.batching import batch_gate, save_policy
from flows.cli.forget import describe
from flows.settle import AttemptPolicy, run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from obliviate.unlearning.batching import BatchPolicy
from obliviate.unlearning.service import RunSpec
from storage import ObjectStore
from storage.ledger import DONE, PENDING, REJECTED, DeletionLedger
from storage.registry import RunRegistry

DIGITS_ROWS = 1797


def _registered(store: ObjectStore, spec: dict) -> RunSpec:
    """A registered run with no version: what the pass needs to map ids to runs (no training)."""
    run = RunSpec.from_dict(spec)
    registry = RunRegistry(store)
    registry.put_spec(run)
    registry.register(run, block_ids=[])
    return run


def _never_used(*specs: dict) -> list[int]:
    """Rows of digits in no training set and no held-out set of ``specs``."""
    named = {int(i) for spec in specs for key in ("train_ids", "heldout_ids") for i in spec[key]}
    return [i for i in range(DIGITS_ROWS) if i not in named]


def test_a_request_of_trained_and_held_out_ids_is_done_and_a_later_training_leaves_all_out(
    tmp_path: Path, tiny_run
) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    worker = ChainWorker(url)
    before = run_spec(run_id="before", **tiny_run(split_seed=0))
    after = run_spec(run_id="after", **tiny_run(split_seed=1, seed=1))
    worker.train(before)
    later_trains = {int(i) for i in after["train_ids"]}
    trained = int(before["train_ids"][150])
    held_out = next(int(i) for i in before["heldout_ids"] if int(i) in later_trains)
    never_used = next(i for i in _never_used(before) if i in later_trains)
    submit_deletion(url, [trained, held_out, never_used], dataset="digits", request_id="req-mix", emit=False)

    result = run_pass(url, unlearn_runs=lambda per_run: {r: worker.unlearn(r, q) for r, q in per_run.items()})

    assert result["settled"] == {"req-mix": DONE}, result
    entry = DeletionLedger(store).get("req-mix")
    assert entry.details["not_trained_on"] == sorted([held_out, never_used])
    assert sorted(entry.details["runs"]) == ["before"] and entry.details["runs"]["before"]["deleted_ids"] == [trained]
    registry = RunRegistry(store)
    assert registry.current("before").version == 2 and trained in registry.current("before").deleted_ids
    line = describe(entry.as_dict())
    assert f"no registered run trained on 2 of its ids {sorted([held_out, never_used])}" in line, line
    assert "every later training of dataset 'digits' leaves them out" in line, line

    later = worker.train(after)

    current = registry.current("after")
    assert later["left_out_for_requests"] == ["req-mix"]
    left_out = {held_out, never_used} | ({trained} & later_trains)
    assert set(current.deleted_ids) == left_out
    chain, _ = registry.load_chain(current)
    positions, _ = RunSpec.from_dict(after).positions(sorted(left_out))
    assert chain.deleted_ids == frozenset(positions.tolist())


def test_a_request_of_held_out_ids_only_is_done_with_no_fan_out(tmp_path: Path, tiny_run, caplog) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    spec = run_spec(run_id="r", **tiny_run(split_seed=0))
    _registered(store, spec)
    ids = sorted([int(spec["heldout_ids"][0]), _never_used(spec)[0]])
    submit_deletion(url, ids, dataset="digits", request_id="req-held", emit=False)
    fanned_out: list[dict] = []

    def unlearn_runs(per_run: dict) -> dict:
        fanned_out.append(per_run)
        return {}

    logger = logging.getLogger("test-held-out")
    with caplog.at_level(logging.INFO, logger="test-held-out"):
        result = run_pass(url, unlearn_runs=unlearn_runs, attempts=AttemptPolicy(), logger=logger)

    assert result["settled"] == {"req-held": DONE} and result["runs"] == {}, result
    assert fanned_out == []
    entry = DeletionLedger(store).get("req-held")
    assert entry.details["not_trained_on"] == ids and entry.details["runs"] == {}
    said = [r.getMessage() for r in caplog.records if "req-held" in r.getMessage()]
    assert any("no registered run of dataset 'digits' trained on any of its 2 id(s)" in s for s in said), said
    assert any("no run retrained" in s for s in said), said
    line = describe(entry.as_dict())
    assert line.startswith("request req-held: done; no registered run trained on any of its ids"), line
    assert "nothing was retrained" in line, line


def test_the_batch_gate_lets_held_out_ids_wait_and_rejects_an_id_past_the_rows(tmp_path: Path, tiny_run) -> None:
    store = ObjectStore(f"file://{tmp_path / 'store'}")
    store.ensure_container()
    spec = run_spec(run_id="r", **tiny_run(split_seed=0))
    _registered(store, spec)
    save_policy(store, BatchPolicy(window_s=86_400.0))
    ledger = DeletionLedger(store)
    ledger.append(request_id="held", ids=[int(spec["heldout_ids"][0])], dataset="digits", reason=None)
    # past the rows: `forget` refuses it up front; a request filed where the dataset does not load gets this far
    ledger.append(request_id="past", ids=[int(spec["train_ids"][0]), DIGITS_ROWS], dataset="digits", reason=None)

    gate = batch_gate(store, ledger.due_entries(lease_s=60.0))

    assert gate["requests"] == ["held"] and sorted(gate["rejected"]) == ["past"], gate
    assert ledger.get("held").status == PENDING
    reason = ledger.get("past").details["reason"]
    assert "row index of dataset 'digits' (1797 rows: ids 0..1796); got [1797]" in reason, reason
    assert "Resubmit without them" in reason, reason


def test_an_id_past_the_rows_is_rejected_by_the_pass_with_the_rule(tmp_path: Path, tiny_run) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    spec = run_spec(run_id="r", **tiny_run(split_seed=0))
    _registered(store, spec)
    ledger = DeletionLedger(store)
    ledger.append(request_id="past", ids=[int(spec["heldout_ids"][0]), 5000], dataset="digits", reason=None)
    fanned_out: list[dict] = []

    result = run_pass(url, unlearn_runs=lambda per_run: fanned_out.append(per_run) or {})

    assert result["settled"] == {"past": REJECTED} and fanned_out == [], result
    reason = ledger.get("past").details["reason"]
    assert reason.startswith("rule: a sample id is a row index of dataset 'digits' (1797 rows: ids 0..1796)"), reason
    assert "got [5000]" in reason and "rejected as a whole" in reason and "Resubmit without them" in reason, reason


def test_where_the_dataset_does_not_load_only_rows_its_runs_name_are_accepted(tmp_path: Path, tiny_run) -> None:
    """Without the row count the pass knows only the rows the runs name; an id past them is retried, not accepted."""
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    elsewhere = str(tmp_path / "only-on-the-training-machine.npz")  # does not load here
    spec = run_spec(run_id="r", **tiny_run(split_seed=0)) | {"dataset": elsewhere}
    _registered(store, spec)
    named = max(int(i) for key in ("train_ids", "heldout_ids") for i in spec[key])
    ledger = DeletionLedger(store)
    ledger.append(request_id="held", ids=[int(spec["heldout_ids"][0])], dataset=elsewhere, reason=None)
    ledger.append(request_id="beyond", ids=[named + 1], dataset=elsewhere, reason=None)

    result = run_pass(url, unlearn_runs=lambda per_run: {}, attempts=AttemptPolicy(max_attempts=3))

    assert result["settled"] == {"held": DONE, "beyond": PENDING}, result
    error = ledger.get("beyond").details["last_error"]
    assert f"whether ids [{named + 1}] are rows of it is unknown" in error, error
    assert "Make the dataset load where `obliviate serve` runs" in error, error
