"""Rollback in the service (issue 11): an interim version never serves a block that saw the ids."""

from __future__ import annotations

import json

import pytest
import torch

from actors.chains import ChainWorker
from flows.audit import export_target
from flows.batching import batch_gate, save_policy
from flows.cli import main
from flows.rollback import heldout_judge, release_refused, save_rollback, served_model
from flows.verify import chain_of
from obliviate.data import load_dataset
from obliviate.unlearning.batching import BatchPolicy
from obliviate.unlearning.rollback import saw_deleted
from obliviate.unlearning.service import block_data
from obliviate.unlearning.trainer import heldout_accuracy
from storage.ledger import DeletionLedger
from storage.registry import RunRegistry
from storage.serving import run_state


@pytest.fixture
def trained(train_rb):
    return train_rb()


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_interim_serves_m_d_minus_1_at_once_and_the_retrain_restores_the_full_model(trained, tmp_path) -> None:
    url, store, ids_in = trained
    save_rollback(store, enabled=True, floor_points=100.0)  # any checkpoint meets this floor
    ledger = DeletionLedger(store)
    ledger.append(request_id="late-block", ids=ids_in(3), dataset="digits", reason=None)
    gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert not gate["flush"] and gate["interim"]["runs"]["rb"]["serve_block"] == 2
    registry = RunRegistry(store)
    chain = chain_of(url, "rb")  # the full chain the interim version derives from
    served = served_model(registry, "rb")
    assert served is not None and _states_equal(served, chain.model(2))
    assert saw_deleted(served={0: 2}, affected={0: 3}, retrained_through={}) == []
    assert store.exists("ledger/forgotten/late-block.json")
    assert export_target(registry, "rb", tmp_path / "target.pt")["version"] == 2
    # the batch's retrain (from the interim version) publishes the full, exact model
    audit = ChainWorker(url).unlearn("rb", {"late-block": ids_in(3)})
    assert audit["status"] == "published"
    new_chain, manifest = registry.load_chain(registry.current("rb"))
    assert "serve_block" not in manifest.metadata
    final = served_model(registry, "rb")
    assert final is not None and _states_equal(final, new_chain.model())


def test_a_retrain_evaluates_only_m_b_and_a_later_rollback_measures_the_block_it_serves(trained) -> None:
    url, store, ids_in = trained
    registry = RunRegistry(store)
    # no rollback yet: the retrain publishes nothing on the way, so it evaluates only its last block
    assert ChainWorker(url).unlearn("rb", {"early": ids_in(1)})["status"] == "published"
    retrained, _ = registry.load_chain(registry.current("rb"))
    assert [c.heldout_accuracy is None for c in retrained.checkpoints[1:]] == [True, True, True, False]
    save_rollback(store, enabled=True, floor_points=100.0)
    ledger = DeletionLedger(store)
    ledger.append(request_id="later", ids=ids_in(3), dataset="digits", reason=None)
    interim = batch_gate(store, ledger.open_entries(stale_after_s=600.0))["interim"]["runs"]["rb"]
    assert interim["published"] and interim["serve_block"] == 2
    spec = registry.spec("rb")
    data = block_data(spec, dataset=load_dataset(spec.dataset))
    assert interim["accuracy"] == pytest.approx(heldout_accuracy(retrained.model(2), data=data))


def test_below_the_floor_nothing_is_published_and_the_batch_flushes_now(trained) -> None:
    _url, store, ids_in = trained
    save_rollback(store, enabled=True, floor_points=0.0)  # no drop at all: the barely trained M_1 misses it
    registry = RunRegistry(store)
    before = registry.current("rb")
    ledger = DeletionLedger(store)
    ledger.append(request_id="late-block", ids=ids_in(2), dataset="digits", reason=None)
    gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert gate["flush"] and gate["reason"] == "rollback_below_floor"
    assert gate["interim"]["runs"]["rb"]["published"] is False
    assert registry.current("rb").version == before.version  # the run keeps serving its model
    assert not store.exists("ledger/forgotten/late-block.json")  # forgotten when its retrain lands


def test_block_1_never_pauses_the_run_it_flushes_now(trained) -> None:
    _url, store, ids_in = trained
    save_rollback(store, enabled=True, floor_points=100.0)  # any accuracy drop accepted, yet M_0 is no model
    registry = RunRegistry(store)
    before = registry.current("rb")
    ledger = DeletionLedger(store)
    ledger.append(request_id="first-block", ids=ids_in(1), dataset="digits", reason=None)
    gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert gate["flush"] and gate["reason"] == "rollback_no_earlier_model"  # not the floor: it accepts any drop
    assert gate["interim"]["runs"]["rb"]["published"] is False
    assert registry.current("rb").version == before.version and served_model(registry, "rb") is not None
    assert not store.exists("ledger/forgotten/first-block.json")


def test_a_cancelled_request_releases_its_rollback_at_the_next_pass(trained) -> None:
    _url, store, ids_in = trained
    save_rollback(store, enabled=True, floor_points=100.0)
    ledger = DeletionLedger(store)
    registry = RunRegistry(store)
    final = served_model(registry, "rb")
    ledger.append(request_id="keep", ids=ids_in(4), dataset="digits", reason=None)
    ledger.append(request_id="drop", ids=ids_in(2), dataset="digits", reason=None)
    batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert registry.manifest(registry.current("rb")).metadata["serve_block"] == 1
    ledger.cancel("drop", applied_to=[])
    batch_gate(store, ledger.open_entries(stale_after_s=600.0))  # the next pass: only "keep" holds the run back
    manifest = registry.manifest(registry.current("rb"))
    assert manifest.metadata["serve_block"] == 3 and set(manifest.members) == {"0", "1", "2", "3"}
    ledger.cancel("keep", applied_to=[])
    batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    current = registry.current("rb")
    assert "serve_block" not in registry.manifest(current).metadata
    served = served_model(registry, "rb")
    assert final is not None and served is not None and _states_equal(served, final)


def test_forget_cancel_releases_the_rollback_at_once(trained, capsys) -> None:
    url, store, ids_in = trained
    save_rollback(store, enabled=True, floor_points=100.0)
    ledger = DeletionLedger(store)
    registry = RunRegistry(store)
    final = served_model(registry, "rb")
    ledger.append(request_id="withdrawn", ids=ids_in(3), dataset="digits", reason=None)
    batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert registry.manifest(registry.current("rb")).metadata["serve_block"] == 2
    assert main(["forget", "--cancel", "withdrawn", "--store", url]) == 0  # no pass runs after this
    assert "released the rollback held for ['withdrawn']" in capsys.readouterr().err
    assert "serve_block" not in registry.manifest(registry.current("rb")).metadata
    served = served_model(registry, "rb")
    assert final is not None and served is not None and _states_equal(served, final)


def test_a_cancel_that_leaves_other_holds_serves_only_what_the_floor_vouches_for(train_rb) -> None:
    # Trained long enough that its blocks differ (held-out accuracy 0.23 / 0.45 / 0.60 / 0.72 after blocks 1-4).
    url, store, ids_in = train_rb(epochs=2, train_size=600)
    registry, ledger = RunRegistry(store), DeletionLedger(store)

    def served_now() -> tuple[int | None, dict]:
        target = registry.store.read_pointer(registry.pointer_key("rb")).target
        return registry.manifest(registry.current("rb")).metadata.get("serve_block"), dict(target.get("holds") or {})

    save_rollback(store, enabled=True, floor_points=100.0)  # any drop is accepted at acceptance
    ledger.append(request_id="late", ids=ids_in(4), dataset="digits", reason=None)
    ledger.append(request_id="early", ids=ids_in(2), dataset="digits", reason=None)
    batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert served_now() == (1, {"late": 4, "early": 2})
    # M_3 (what "late" alone allows) was never judged: "early" held the run at M_1 from the start.
    # With a floor of 0 points M_3 must match the pre-deletion model's accuracy plus its paired margin,
    # which it cannot once it disagrees with that model anywhere on the held-out set (nor can M_2).
    judge = heldout_judge(registry, [run_state(registry, "rb")])
    assert judge.margin({0: 3}) > 0 and judge.margin({0: 2}) > 0
    save_rollback(store, enabled=True, floor_points=0.0)
    ledger.cancel("early", applied_to=[])
    assert release_refused(store) == {"rb": ["early"]}
    assert served_now() == (1, {"late": 4})  # the hold is gone, the judged M_1 stays served
    # Under a floor that vouches for M_3 the next refusal serves it.
    save_rollback(store, enabled=True, floor_points=100.0)
    ledger.append(request_id="early2", ids=ids_in(2), dataset="digits", reason=None)
    batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert served_now() == (1, {"late": 4, "early2": 2})
    ledger.cancel("early2", applied_to=[])
    assert release_refused(store) == {"rb": ["early2"]}
    assert served_now() == (3, {"late": 4})
    assert _states_equal(served_model(registry, "rb"), chain_of(url, "rb").model(3))


def test_with_no_window_rollback_still_serves_m_d_minus_1_until_the_retrain_lands(trained, capsys) -> None:
    url, store, ids_in = trained
    save_policy(store, BatchPolicy())  # immediate, as without batching
    save_rollback(store, enabled=True, floor_points=100.0)
    ledger = DeletionLedger(store)
    ledger.append(request_id="now", ids=ids_in(3), dataset="digits", reason=None)
    gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))
    assert gate["flush"] and gate["interim"]["runs"]["rb"]["serve_block"] == 2
    assert store.exists("ledger/forgotten/now.json")
    assert main(["forget", "--status", "now", "--store", url]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["forgotten"]["forgotten_at"] >= shown["requested_at"]
