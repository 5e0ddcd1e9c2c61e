"""Request robustness on a local store (fast; no servers): ids at the boundary, attempts, leases,
terminal states, poison isolation inside a pass, store check and repair."""

from __future__ import annotations

import hashlib
import re
import time

import pytest
import torch

from actors.chains import ChainWorker
from flows.repair import check_and_repair
from flows.settle import AttemptPolicy, run_pass
from flows.train import run_spec
from flows.unlearn import submit_deletion
from obliviate.unlearning.service import MAX_SAMPLE_ID, RequestError, parse_ids
from storage import ObjectStore
from storage.errors import ObjectNotFound
from storage.ledger import CANCELLED, CLAIMED, DONE, FAILED, PENDING, REJECTED, DeletionLedger
from storage.registry import TRAIN_CHAIN, RunRegistry


@pytest.fixture
def trained(store_url, small_run):
    """One tiny trained run shared by a test: (store url, spec dict)."""
    spec = run_spec(run_id="r1", split_seed=0, **small_run)
    ChainWorker(store_url).train(spec)
    return store_url, spec


@pytest.fixture
def small_run(tiny_run):
    return tiny_run(blocks=3, train_size=300, heldout_size=100)


def in_process(store_url: str):
    """The pass's fan-out with the real worker, in this process (the Ray fan-out is tested elsewhere)."""
    worker = ChainWorker(store_url)

    def unlearn_runs(per_run):
        out = {}
        for run_id, requests in per_run.items():
            try:
                out[run_id] = worker.unlearn(run_id, requests)
            except Exception as err:  # noqa: BLE001 -- as the Ray fan-out reports it
                out[run_id] = {"run_id": run_id, "status": "failed", "error": f"{type(err).__name__}: {err}"}
        return out

    return unlearn_runs


def test_ids_are_checked_fully_at_the_boundary():
    for bad in ("1_000", "+5", "٣", "5e3", "0x10", "99999999999999999999", [2**63], [2**64 + 1]):
        with pytest.raises(RequestError, match="rule"):
            parse_ids(bad)
    assert parse_ids([MAX_SAMPLE_ID]) == (MAX_SAMPLE_ID,)
    # each refusal ends with its fix (three named the rule and the value only)
    for bad, fix in (("-1", "Write each id as plain digits"), ("5,5", "Give each id once"), ("", "at least one id")):
        with pytest.raises(RequestError, match=fix):
            parse_ids(bad)
    with pytest.raises(RequestError, match=r"1797 rows: ids 0\.\.1796"):
        parse_ids("5,1797", dataset_size=1797, dataset="digits")
    assert parse_ids(" 7, 3", dataset_size=1797) == (3, 7)


def test_attempts_back_off_then_fail_and_retry_and_cancel(store_url):
    submit_deletion(store_url, [1], dataset="digits", request_id="r-1", emit=False)
    ledger = DeletionLedger(ObjectStore(store_url))
    for attempt in (1, 2):
        claim = ledger.claim("r-1", holder="h", lease_s=30, max_attempts=2)
        assert claim.status == CLAIMED and claim.details["attempt"] == attempt
        assert ledger.claim("r-1", holder="other", lease_s=30, max_attempts=2) is None  # held
        settled = ledger.fail_attempt(
            "r-1",
            claim_version=claim.version,
            error=f"boom {attempt}",
            max_attempts=2,
            first_backoff_s=0.3,
            max_backoff_s=1,
        )
        if attempt == 1:
            assert settled.status == PENDING and settled.details["last_error"] == "boom 1"
            assert ledger.due_entries(lease_s=30) == []  # backing off
            assert ledger.claim("r-1", holder="h", lease_s=30, max_attempts=2) is None
            time.sleep(0.35)
            assert [e.request_id for e in ledger.due_entries(lease_s=30)] == ["r-1"]
    final = ledger.get("r-1")
    assert final.status == FAILED and "gave up after 2 attempt(s)" in final.details["reason"]
    assert [e["error"] for e in final.details["errors"]] == ["boom 1", "boom 2"]
    assert ledger.due_entries(lease_s=30) == []
    assert ledger.retry("r-1").status == PENDING and ledger.get("r-1").details["attempts"] == 0
    with pytest.raises(RequestError, match="only a failed request"):
        ledger.retry("r-1")
    claim = ledger.claim("r-1", holder="h", lease_s=30, max_attempts=2)
    with pytest.raises(RequestError, match="a pass is applying it now"):
        ledger.cancel("r-1", applied_to=[])
    # part-way applied while claimed: it said "submit nothing, or retrain those runs", no action a user can take
    with pytest.raises(RequestError, match=r"applied to runs \['run-a'\] \(a pass is applying it now\)") as refused:
        ledger.cancel("r-1", applied_to=["run-a"])
    assert "not undone by cancelling" in str(refused.value) and "retrain" not in str(refused.value)
    ledger.settle("r-1", claim_version=claim.version, status=PENDING, details={})
    with pytest.raises(RequestError, match="applied to runs"):
        ledger.cancel("r-1", applied_to=["run-a"])
    assert ledger.cancel("r-1", applied_to=[]).status == CANCELLED
    assert ledger.claim("r-1", holder="h", lease_s=30, max_attempts=2) is None


def test_a_lapsed_lease_is_taken_over_and_the_old_holder_cannot_settle(store_url):
    submit_deletion(store_url, [1], dataset="digits", request_id="r-1", emit=False)
    ledger = DeletionLedger(ObjectStore(store_url))
    first = ledger.claim("r-1", holder="dead", lease_s=0.5, max_attempts=3)
    assert ledger.due_entries(lease_s=0.5) == []
    time.sleep(0.6)
    assert [e.request_id for e in ledger.due_entries(lease_s=0.5)] == ["r-1"]
    second = ledger.claim("r-1", holder="alive", lease_s=0.5, max_attempts=3)
    assert second.details["attempt"] == 2 and "stopped renewing" in second.details["errors"][-1]["error"]
    assert ledger.settle("r-1", claim_version=first.version, status=DONE, details={}) is None  # lost its claim
    assert ledger.settle("r-1", claim_version=second.version, status=DONE, details={}).status == DONE


def test_a_poison_request_fails_alone_and_good_ones_merged_with_it_are_applied(trained):
    store_url, spec = trained
    store = ObjectStore(store_url)
    ledger = DeletionLedger(store)
    good_1 = submit_deletion(store_url, spec["train_ids"][:2], dataset="digits", emit=False)["request_id"]
    # Entries written by hand (or by an older version without the rules): ids beyond int64, not integers.
    for request_id, ids in (("poison-big", [2**64]), ("poison-text", ["x1"])):
        store.put_json(
            f"ledger/requests/{request_id}.json",
            {"request_id": request_id, "ids": ids, "dataset": "digits", "reason": "", "requested_at": time.time()},
        )
    good_2 = submit_deletion(store_url, spec["train_ids"][2:4], dataset="digits", emit=False)["request_id"]
    result = run_pass(store_url, unlearn_runs=in_process(store_url), attempts=AttemptPolicy(max_attempts=1))
    assert result["settled"] == {good_1: DONE, good_2: DONE, "poison-big": REJECTED, "poison-text": REJECTED}
    assert "int64" in ledger.get("poison-big").details["reason"]
    current = RunRegistry(store).current("r1")
    assert set(current.applied_requests) == {good_1, good_2} and current.version == 2  # merged, applied once


def test_forget_wait_says_what_each_run_did_in_words(trained, capsys):
    from flows.cli import main

    store_url, spec = trained
    request_id = submit_deletion(store_url, spec["train_ids"][-2:], dataset="digits", emit=False)["request_id"]
    run_pass(store_url, unlearn_runs=in_process(store_url), attempts=AttemptPolicy(max_attempts=1))
    assert main(["forget", "--store", store_url, "--status", request_id, "--wait", "1"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("  run r1:"))
    # it printed "speed-up 1.2922020945655124" and no accuracy
    assert re.fullmatch(
        r"  run r1: published version 1 -> 2, blocks retrained \[\d(, \d)*\], (about \d+\.\d\dx less training than "
        r"retraining from scratch \(estimated from this retrain\)|no saving over retraining from scratch \(a deletion "
        r"in block 1 retrains every block\)), held-out accuracy \d+\.\d % -> \d+\.\d %",
        line,
    ), line


def test_store_check_rebuilds_a_flipped_byte_and_collects_orphans_only_when_nothing_is_open(trained, tmp_path):
    store_url, spec = trained
    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    key = registry.checkpoint_key("r1", TRAIN_CHAIN, 2)
    original = store.get_bytes(key)
    path = tmp_path / "store" / key
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    # An orphan: a chain an attempt wrote and never published (a lost race, a crash).
    store.put_bytes("runs/r1/chains/u000001-deadbeef0000/ckpt-0003.pt", b"left behind")
    submit_deletion(store_url, spec["train_ids"][:1], dataset="digits", request_id="open-1", emit=False)

    report = check_and_repair(store_url, repair=False, min_orphan_age_s=0)
    assert [c["key"] for c in report.corrupt] == [key] and report.corrupt[0]["repairable_by_replay"]
    assert report.corrupt[0]["needed_by"] == [{"run": "r1", "version": 1, "member": "2"}]
    assert not report.healthy and report.orphans == [] and "still open" in report.orphans_held_back

    repaired = check_and_repair(store_url, repair=True, min_orphan_age_s=0)
    assert [r["key"] for r in repaired.repaired] == [key] and repaired.healthy
    assert hashlib.sha256(store.get_bytes(key)).digest() == hashlib.sha256(original).digest()
    assert store.exists("runs/r1/chains/u000001-deadbeef0000/ckpt-0003.pt")  # held back: a request is open

    ledger = DeletionLedger(store)
    ledger.cancel("open-1", applied_to=[])
    collected = check_and_repair(store_url, repair=True, min_orphan_age_s=0)
    assert collected.collected == ["runs/r1/chains/u000001-deadbeef0000/ckpt-0003.pt"]
    assert not store.exists("runs/r1/chains/u000001-deadbeef0000/ckpt-0003.pt")
    chain = registry.load_chain(registry.current("r1"))[0]  # the whole published version reads clean
    assert chain.final.block_index == 3 and all(torch.isfinite(v).all() for v in chain.final.model_state.values())


def test_store_check_finds_objects_or_records_lost_outside_obliviate_and_repair_restores_them(
    trained, tmp_path, capsys
):
    """A deleted checkpoint (its commit record left behind) was invisible to ``store check``: listing
    shows only objects with both halves, so the served model's M_B could vanish and the store read
    healthy. A lost record and a lost timing record are lineage problems; a lost orphan is garbage."""
    from flows.cli import main

    store_url, spec = trained
    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    root = tmp_path / "store"
    final, first = registry.checkpoint_key("r1", TRAIN_CHAIN, 3), registry.checkpoint_key("r1", TRAIN_CHAIN, 1)
    sidecar = registry.checkpoint_key("r1", TRAIN_CHAIN, 2)[: -len(".pt")] + ".json"
    originals = {key: store.get_bytes(key) for key in (final, first)}
    orphan = "runs/r1/chains/u000001-deadbeef0000/ckpt-0003.pt"
    store.put_bytes(orphan, b"left behind")
    for lost_bytes in (final, orphan):
        (root / lost_bytes).unlink()
    (root / f"{first}.sha256").unlink()
    (root / f"{sidecar}.sha256").unlink()

    with pytest.raises(ObjectNotFound, match=r"is committed \(\d+ bytes\) but its bytes are missing: .*--repair"):
        store.get_bytes(final)
    # a deletion needing the lost M_B fails with that reason (once: max_attempts=1), then succeeds after repair
    request_id = submit_deletion(store_url, spec["train_ids"][:1], dataset="digits", emit=False)["request_id"]
    run_pass(store_url, unlearn_runs=in_process(store_url), attempts=AttemptPolicy(max_attempts=1))
    failed = DeletionLedger(store).get(request_id)
    assert failed.status == FAILED and "run r1: ObjectNotFound" in failed.details["reason"]
    assert ".." not in failed.details["reason"] and failed.details["reason"].endswith(f"--retry {request_id}`.")
    assert main(["forget", "--store", store_url, "--status", request_id, "--wait", "1"]) == 4
    assert "  run r1: failed, ObjectNotFound: " in capsys.readouterr().err  # it said "version None -> None"

    # A lease renewed while its settled request drops it can be left as a record alone: garbage, not damage.
    from storage.lease import lease_key

    lease = lease_key(request_id, 1)
    store.put_json(lease, {"holder": "h", "claim_version": 1, "renewed_at": 0.0, "lease_s": 4.0})
    (root / lease).unlink()

    report = check_and_repair(store_url, repair=False, min_orphan_age_s=0)
    assert [c["key"] for c in report.corrupt] == [final, orphan] and "bytes are gone" in report.corrupt[0]["error"]
    assert report.corrupt[0]["needed_by"] == [{"run": "r1", "version": 1, "member": "3"}]
    assert sorted(p["key"] for p in report.lineage) == sorted([first, sidecar]) and not report.healthy
    assert report.orphans == sorted([orphan, lease])
    assert main(["store", "check", "--store", store_url, "--orphan-age", "0"]) == 1
    said = capsys.readouterr().err
    assert f"damaged {final} (rebuildable with --repair); needed by run r1 version 1: " in said
    assert "lineage of run r1 version 1: member 2's timing record is not committed" in said
    assert f"orphans (garbage, not damage; --repair deletes them): {lease}, {orphan}" in said  # "2 orphan(s)"

    repaired = check_and_repair(store_url, repair=True, min_orphan_age_s=0)
    assert sorted(r["key"] for r in repaired.repaired) == sorted([first, sidecar, final])
    assert repaired.unrecoverable == [] and repaired.collected == sorted([orphan, lease]) and repaired.healthy
    assert {key: store.get_bytes(key) for key in (final, first)} == originals  # replayed bit for bit
    again = check_and_repair(store_url, repair=False, min_orphan_age_s=0)
    assert again.healthy and again.corrupt == again.lineage == again.orphans == []
    DeletionLedger(store).retry(request_id)
    assert run_pass(store_url, unlearn_runs=in_process(store_url))["settled"] == {request_id: DONE}


def test_store_check_of_a_reduce_result_whose_bytes_are_gone_says_one_thing(tmp_path, capsys):
    """A result file deleted with its record kept read "not rebuildable ... no published version needs it: ...
    rebuild it with `store check --repair`", and --repair then called it UNRECOVERABLE, "not a chain checkpoint"."""
    from flows.cli import main

    store_url = f"file://{tmp_path / 'store'}"
    assert (
        main(["reduce", "--data", "digits", "--k", "5", "--starts", "3", "--workers", "0", "--store", store_url]) == 0
    )
    store = ObjectStore(store_url)
    subset = next(key for key in store.list("") if key.endswith("/subset.npy"))
    result = subset.rsplit("/", 1)[0]
    (tmp_path / "store" / subset).unlink()  # its commit record stays
    capsys.readouterr()
    assert main(["store", "check", "--store", store_url]) == 1
    said = capsys.readouterr().err
    assert (
        f"damaged {subset} (rewritten by running the command that wrote the result again (the same `obliviate "
        f"reduce`)); part of result {result}: " in said
    )
    assert "bytes are gone" in said
    assert "--repair" not in said and "no published version needs it" not in said
    for flipped in ("summary.json",):  # a flipped byte in another member: the same answer
        path = tmp_path / "store" / result / flipped
        path.write_bytes(path.read_bytes().replace(b"{", b"[", 1))
    assert main(["store", "check", "--store", store_url, "--repair"]) == 1
    said = capsys.readouterr().err
    assert f"UNRECOVERABLE {subset}: a file of a reduce result, not rebuildable by replay: running the same " in said
    assert f"UNRECOVERABLE {result}/summary.json: a file of a reduce result" in said
    assert f"part of result {result}" in said and "not a chain checkpoint" not in said
    capsys.readouterr()
    assert (
        main(["reduce", "--data", "digits", "--k", "5", "--starts", "3", "--workers", "0", "--store", store_url]) == 0
    )
    assert main(["store", "check", "--store", store_url]) == 0  # as the message says: the same reduce mends it


def test_store_check_names_what_needs_each_object_and_how_to_mend_it(trained, tmp_path, capsys):
    """Seen by a user: a checkpoint overwritten with its record was 'UNRECOVERABLE' though replay
    reproduces it; a damaged spec or pointer read 'no published version needs it: delete and rewrite
    it'; a reduce result's lost record and a lost version pointer read healthy."""
    from flows.cli import main

    store_url, _ = trained
    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    root = tmp_path / "store"
    assert (
        main(["reduce", "--data", "digits", "--k", "5", "--starts", "3", "--workers", "0", "--store", store_url]) == 0
    )
    result = next(key for key in store.list("") if key.startswith("reduce-") and key.endswith("/subset.npy"))
    tile = "mi-tiles/ec49a20e6fc73398-b256-raw-t64/r0000000-c0000000.npy"  # as a Ray reduce stores them
    store.put_bytes(tile, b"\x00" * 64)
    capsys.readouterr()

    last, before = registry.checkpoint_key("r1", TRAIN_CHAIN, 3), registry.checkpoint_key("r1", TRAIN_CHAIN, 2)
    original = store.get_bytes(last)
    for suffix in ("", ".sha256"):  # another checkpoint's bytes and commit record copied over M_3
        (root / f"{last}{suffix}").write_bytes((root / f"{before}{suffix}").read_bytes())
    (root / f"{result}.sha256").unlink()
    (root / tile).write_bytes(b"\x01" * 64)

    assert main(["store", "check", "--store", store_url]) == 1
    said = capsys.readouterr().err
    assert "lineage of run r1 version 1: member 3 was rewritten after publication" in said
    assert "`store check --repair` rebuilds it by replay" in said
    assert f"damaged {result} (rewritten by running the command that wrote the result again" in said
    assert "but its commit record is gone" in said
    assert f"damaged {tile} (an MI matrix cache: --repair deletes it" in said and "no model version needs it" in said
    assert "delete and rewrite it" not in said

    assert main(["store", "check", "--store", store_url, "--repair"]) == 1  # the result's record stays lost
    said = capsys.readouterr().err
    assert f"repaired {last}: replayed block 3 from checkpoint 2" in said and store.get_bytes(last) == original
    assert f"repaired {tile}: deleted" in said and not store.exists(tile)

    (root / "runs/r1/spec.json").write_text("{}")
    assert main(["store", "check", "--store", store_url, "--repair"]) == 1
    said = capsys.readouterr().err
    assert "damaged runs/r1/spec.json" not in said  # --repair reports what it could not mend instead
    assert "UNRECOVERABLE runs/r1/spec.json: " in said and "replay; needed by run r1 version 1" in said  # no '.;'
    assert main(["store", "check", "--store", store_url]) == 1
    assert (
        "damaged runs/r1/spec.json (not rebuildable by store check: restore it from a backup); needed by run "
        "r1 version 1" in capsys.readouterr().err
    )

    (root / "runs/r1/current/v000000001.json").unlink()  # the version pointer, lost outside obliviate
    report = check_and_repair(store_url, repair=False, min_orphan_age_s=0)
    lost = [problem for problem in report.lineage if problem["key"] == "runs/r1/current"]
    assert lost and lost[0]["version"] is None and "has no version pointer" in lost[0]["problem"]


def test_the_words_for_a_slow_retrain_a_stopped_serve_and_an_id_past_int64(tmp_path):
    """Seen by a user: "0.89x faster than retraining", "the `obliviate serve` that announced None
    stopped", and "ASCII digits only" for an id that was all ASCII digits but too large."""
    from flows.cli.forget import _run_outcome
    from flows.unlearn import ENDPOINT_KEY, served_endpoint

    slower = _run_outcome("a", {"status": "published", "speedup_vs_full_retrain": 0.8})
    assert "1.25x slower than retraining from scratch" in slower and "faster" not in slower
    # the reason was always "a deletion in an early block", also for the last block alone
    last = {"status": "published", "speedup_vs_full_retrain": 0.8, "first_affected_block": 4, "blocks_retrained": [4]}
    assert "(loading, checking and publishing cost more than the 1 block(s) retrained saved)" in _run_outcome("a", last)
    first = {**last, "first_affected_block": 1, "blocks_retrained": [1, 2, 3, 4]}
    assert "(a deletion in block 1 retrains every block, plus the checks)" in _run_outcome("a", first)
    # a request merged into a batch showed the batch's retrain as if it were its own
    merged = {**last, "requests": ["r1", "r2", "r3"], "deleted_ids": [5, 6, 7, 8]}
    assert "one retrain for the 3 requests of its batch, 4 ids, blocks retrained [4]" in _run_outcome("a", merged)
    # since 082d172 a request keeps the batch's counts, not its lists
    counted = {**last, "batch_requests": 3, "merged_with_count": 2, "batch_deleted_ids": 4, "deleted_ids": [5]}
    assert "one retrain for the 3 requests of its batch, 4 ids, blocks retrained [4]" in _run_outcome("a", counted)
    alone = {**last, "batch_requests": 1, "deleted_ids": [5]}
    assert "batch" not in _run_outcome("a", alone)

    assert "batch" not in _run_outcome("a", {**last, "requests": ["r1"], "deleted_ids": [5]})
    # why a batch was retrained before its window closed was only in the JSON ("rollback_below_floor")
    from flows.cli.forget import describe

    early = describe({"request_id": "x", "status": "done", "details": {"batch": "rollback_below_floor"}})
    assert early.startswith("request x: done (retrained at once: no rolled-back version") and "floor" in early
    assert describe({"request_id": "x", "status": "done", "details": {"batch": "window"}}) == "request x: done"
    store = ObjectStore(f"file://{tmp_path}")
    store.put_json(ENDPOINT_KEY, {"stopped_at": time.time(), "pid": 1})
    assert served_endpoint(store) == (None, "the `obliviate serve` that served this store stopped")
    with pytest.raises(RequestError, match=r"a sample id is a row index of digits \(1797 rows: ids 0..1796\)"):
        parse_ids("3,99999999999999999999", dataset_size=1797, dataset="digits")


def test_the_speedup_is_said_as_the_estimate_it_is():
    """Two identical retrains of every block printed "2.61x slower" and "1.32x faster than retraining from
    scratch"; since e183a84 the audit estimates it from the retrain's own pace (speedup_basis)."""
    from flows.cli.forget import _run_outcome

    basis = {"status": "published", "speedup_basis": "estimate: ...", "blocks_retrained": [1, 2, 3]}
    every = _run_outcome("a", {**basis, "speedup_vs_full_retrain": 1.0, "first_affected_block": 1})
    assert "no saving over retraining from scratch (a deletion in block 1 retrains every block)" in every
    assert "faster" not in every and "slower" not in every
    last = _run_outcome("a", {**basis, "speedup_vs_full_retrain": 3.0, "blocks_retrained": [3]})
    assert "about 3.00x less training than retraining from scratch (estimated from this retrain)" in last
