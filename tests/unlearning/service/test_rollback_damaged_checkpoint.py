"""serve --rollback with a damaged checkpoint the interim needs: the pass goes on, the request is retried and failed.

The gate raised the checkpoint's CorruptObject out of every pass before any request was claimed: the
request stayed ``pending`` (never attempted, never failed, no mend) and every other request waited
behind it. Now that run's interim is skipped (it keeps serving its version; the request is not yet
forgotten), the request records the damage and its mend, and the batch flushes for the exact retrain,
which fails on the same damage and is recorded ``failed`` with its attempts, as without rollback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.chains import ChainWorker
from flows.batching import batch_gate, save_policy
from flows.cli.forget import describe
from flows.rollback import save_rollback
from flows.settle import AttemptPolicy, run_pass
from flows.train import run_spec
from obliviate.unlearning.batching import DAY_S, BatchPolicy
from obliviate.unlearning.plan import BlockPlan
from storage import ObjectStore
from storage.ledger import FAILED, PENDING, DeletionLedger
from storage.registry import RunRegistry


def test_a_damaged_checkpoint_the_interim_needs_does_not_stall_the_pass(tmp_path: Path, tiny_run) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    spec = run_spec(run_id="rb", **tiny_run(split_seed=0))
    worker = ChainWorker(url)
    worker.train(spec)
    plan = BlockPlan.from_dict(store.get_json("runs/rb/plan.json"))
    ids = [int(spec["train_ids"][p]) for p in plan.block_ids(3)[:2]]
    save_policy(store, BatchPolicy(window_s=DAY_S))
    save_rollback(store, enabled=True, floor_points=100.0)  # any checkpoint would meet this floor
    registry = RunRegistry(store)
    before = registry.current("rb")

    ckpt = tmp_path / "store" / "runs" / "rb" / "chains" / "train" / "ckpt-0002.pt"  # M_2, the interim of block 3
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 10] = b"XXXXXXXXXX"
    ckpt.write_bytes(bytes(data))

    ledger = DeletionLedger(store)
    ledger.append(request_id="c", ids=ids, dataset="digits", reason=None)
    gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))  # raised CorruptObject before
    assert gate["flush"] and gate["reason"] == "rollback_damaged"  # its exact retrain is not held back
    failure = gate["interim"]["failed"]["rb"]
    assert failure["requests"] == ["c"] and failure["error"].startswith("CorruptObject")
    assert "store check --repair" in failure["mend"]
    # nothing published: the run serves its version, and the request is not called forgotten
    assert registry.current("rb") == before and "rb" not in gate["interim"]["runs"]
    assert not store.exists("ledger/forgotten/c.json")
    noted = ledger.get("c")
    assert noted.status == PENDING and noted.details["interim_error"].startswith("rb: CorruptObject")
    assert "store check --repair" in noted.details["interim_mend"]
    again = batch_gate(store, ledger.open_entries(stale_after_s=600.0))  # a later pass: noted once only
    assert again["interim"]["failed"]["rb"]["requests"] == ["c"] and len(ledger.history("c")) == 2
    said = describe(ledger.get("c").as_dict())  # what `forget --status c` says of it
    assert "not forgotten yet: no rolled-back version could be published (rb: CorruptObject" in said
    assert "mend: " in said and "store check --repair" in said

    def unlearn_runs(per_run: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for run_id, requests in per_run.items():
            try:
                out[run_id] = worker.unlearn(run_id, requests)
            except Exception as err:  # noqa: BLE001 -- as the fan-out records a run that raised
                out[run_id] = {"run_id": run_id, "status": "failed", "error": f"{type(err).__name__}: {err}"}
        return out

    settled = run_pass(url, unlearn_runs=unlearn_runs, attempts=AttemptPolicy(max_attempts=1), batch=gate)
    assert settled["settled"] == {"c": FAILED}
    final = ledger.get("c")
    assert final.details["attempts"] == 1 and "CorruptObject" in final.details["reason"]
    assert "forget --retry c" in final.details["reason"]
    assert registry.current("rb") == before


def test_forget_status_says_why_a_batch_was_retrained_at_once_after_a_damaged_interim() -> None:
    said = describe({"request_id": "x", "status": "done", "details": {"batch": "rollback_damaged"}})
    assert said.startswith("request x: done (retrained at once: a checkpoint the rolled-back version needed")
