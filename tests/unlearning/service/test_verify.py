"""`obliviate verify` (SPEC 6, Proof by replay): passes on an honest store, catches tampering.

The runs are trained and unlearned in-process with the worker the flows use, in a file:// store
(no servers needed: the flow wrapper adds only the Prefect artifact).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.cli import main
from flows.train import run_spec
from flows.verify import _markdown, verify_run
from storage import ObjectStore
from storage.check import save_keep_superseded
from storage.registry import RunRegistry


@pytest.fixture
def unlearned_store(tmp_path: Path, tiny_run) -> tuple[str, list[int]]:
    url = f"file://{tmp_path / 'store'}"
    ObjectStore(url).ensure_container()
    save_keep_superseded(ObjectStore(url), keep=True)  # v1 stays to be verified (by default a deletion purges it)
    worker = ChainWorker(url)
    spec = run_spec(run_id="v-run", **tiny_run(split_seed=0))
    worker.train(spec)
    ids = [int(spec["train_ids"][i]) for i in (150, 151, 390)]  # blocks in the middle and the end
    audit = worker.unlearn("v-run", {"req-1": ids})
    assert audit["status"] == "published" and audit["to_version"] == 2
    return url, ids


def test_verify_passes_on_an_honest_store_and_records_the_result(unlearned_store) -> None:
    url, _ = unlearned_store
    result = verify_run(url, "v-run", blocks="all")
    assert result["status"] == "passed", result["problems"]
    assert result["blocks_replayed"] == [1, 2, 3, 4] and all(result["bit_identical"].values())
    assert result["lineage"] == "recorded" and result["applied_requests"] == ["req-1"]
    assert ObjectStore(url).list("ledger/verifications")
    first = verify_run(url, "v-run", version=1, blocks="2")
    assert first["status"] == "passed" and first["blocks_replayed"] == [2]


def test_verify_of_a_version_no_longer_served_says_so(unlearned_store, capsys) -> None:
    """`verify --version 1` passed with no word that v1 is not served and still holds the ids req-1 deleted."""
    url, _ = unlearned_store
    assert main(["verify", "--store", url, "--run", "v-run", "--version", "1", "--blocks", "4", "--no-prefect"]) == 0
    err = capsys.readouterr().err
    assert "note: v1 is not the version served (v2); it predates request(s) req-1 and still holds their ids" in err
    assert main(["verify", "--store", url, "--run", "v-run", "--blocks", "4", "--no-prefect"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_verify_catches_a_flipped_checkpoint_byte(unlearned_store, tmp_path: Path, capsys) -> None:
    url, _ = unlearned_store
    registry = RunRegistry(ObjectStore(url))
    member = registry.manifest(registry.current("v-run")).members["3"]
    path = tmp_path / "store" / member.key
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    code = main(["verify", "--store", url, "--run", "v-run", "--blocks", "all", "--no-prefect"])
    assert code == 4
    err = capsys.readouterr().err
    assert "failed" in err and "M_3 cannot be read" in err and "`obliviate store check --repair` rebuilds" in err
    # M_3 is neither a start nor an end to compare: blocks 3 and 4 are counted, not read as "2/2 identical"
    assert "v-run v2: failed; 2/2 replayed blocks bit-identical; 2 block(s) could not be replayed (below)" in err
    assert err.count("--repair") == 1  # the fix once (it was given twice in a row)
    report = re.search(r"^  report: (file://\S+)$", err, flags=re.MULTILINE)
    assert report and ObjectStore(url).exists(report.group(1).removeprefix(url + "/")), err


def test_verify_names_only_the_checkpoints_it_could_not_read(unlearned_store, tmp_path: Path, capsys) -> None:
    """With only M_2 damaged it said "block 2: cannot replay without readable stored M_1 and M_2."."""
    url, _ = unlearned_store
    registry = RunRegistry(ObjectStore(url))
    member = registry.manifest(registry.current("v-run")).members["2"]
    path = tmp_path / "store" / member.key
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert main(["verify", "--store", url, "--run", "v-run", "--blocks", "all", "--no-prefect"]) == 4
    err = capsys.readouterr().err
    assert "block 2: cannot replay without readable stored M_2." in err
    assert "block 3: cannot replay without readable stored M_2." in err
    assert "M_1 and M_2" not in err and "M_2 and M_3" not in err, err


def test_verify_a_record_lost_while_the_bytes_stay_says_so(unlearned_store, tmp_path: Path, capsys) -> None:
    url, _ = unlearned_store
    registry = RunRegistry(ObjectStore(url))
    member = registry.manifest(registry.current("v-run")).members["2"]
    (tmp_path / "store" / f"{member.key}.sha256").unlink()
    assert main(["verify", "--store", url, "--run", "v-run", "--blocks", "1", "--no-prefect"]) == 4
    assert "has bytes but no commit record (.sha256)" in capsys.readouterr().err  # it said "no object at"


def test_verify_blocks_retrained_on_a_version_without_deletions_is_refused(unlearned_store, capsys) -> None:
    url, _ = unlearned_store
    assert main(["verify", "--store", url, "--run", "v-run", "--version", "1", "--blocks", "retrained"]) == 2
    assert "has no deletion applied, so no block was retrained. Use --blocks all" in capsys.readouterr().err
    assert main(["verify", "--store", url, "--run", "v-run", "--blocks", "retrained", "--no-prefect"]) == 0  # v2


def test_verify_catches_an_applied_id_left_in_a_block_list(unlearned_store) -> None:
    """A dishonest publisher: version 3 claims req-1 applied but serves the chain that still holds its ids."""
    url, _ = unlearned_store
    registry = RunRegistry(ObjectStore(url))
    current = registry.current("v-run")
    original = registry.store.read_pointer_version(registry.pointer_key("v-run"), 1)
    old = registry.store.read_manifest(original.target["manifest"])
    registry.publish(
        "v-run",
        chain_name="forged",
        members={int(k): v for k, v in old.members.items()},
        metadata=old.metadata,
        pointer_target={"applied_requests": ["req-1"], "deleted_ids": list(current.deleted_ids), "metrics": {}},
        expected_version=current.version,
    )
    result = verify_run(url, "v-run", blocks="retrained")
    assert result["status"] == "failed"
    assert any("still lists ids of applied requests" in p for p in result["problems"])


def test_block_plan_is_fixed_at_registration_and_read_back(unlearned_store) -> None:
    url, _ = unlearned_store
    store = ObjectStore(url)
    stored = store.get_json("runs/v-run/plan.json")
    registry = RunRegistry(store)
    chain, _ = registry.load_chain(registry.current("v-run"))
    assert chain.plan.to_dict() == stored
    # a later train call with the same run reads the stored plan, whatever the labels say now
    store.put_json("runs/v-run/plan.json", {**stored, "blocks": list(reversed(stored["blocks"]))})
    assert ChainWorker(url)._fixed_plan(registry.spec("v-run"), None).to_dict()["blocks"][0] == stored["blocks"][-1]  # type: ignore[arg-type]


@pytest.mark.parametrize("record", ["manifest", "spec"])
def test_verify_of_a_version_whose_manifest_or_spec_is_damaged_reports_it(
    unlearned_store, tmp_path: Path, record: str, capsys
) -> None:
    """A flipped manifest byte exited 2 (a usage error, by README) with the checksum error and no report."""
    url, _ = unlearned_store
    registry = RunRegistry(ObjectStore(url))
    key = registry.current("v-run").manifest_key if record == "manifest" else "runs/v-run/spec.json"
    path = tmp_path / "store" / key
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert main(["verify", "--store", url, "--run", "v-run", "--blocks", "2", "--no-prefect"]) == 4
    err = capsys.readouterr().err
    assert "v-run v2: failed; no block replayed: a record it needs cannot be read (below)" in err, err
    what = (
        "the manifest of version 2 (its lineage, recipe and checkpoints" if record == "manifest" else "the run's spec"
    )
    assert f"  {what}" in err and f"{key}) cannot be read, so no block was replayed: " in err, err
    assert "but was committed with" in err and "restore it from a backup" in err, err
    report = re.search(r"^  report: (file://\S+)$", err, flags=re.MULTILINE)
    assert report, err
    recorded = ObjectStore(url).get_json(report.group(1).removeprefix(url + "/"))
    assert recorded["status"] == "failed" and recorded["records_unreadable"] == [key]
    assert any("restore it from a backup" in p for p in recorded["problems"]), recorded


@pytest.mark.parametrize(
    ("damaged", "argv"),
    [
        ("runs/v-run/current/v000000002.json", []),  # the current version's pointer: what verify reads first
        ("runs/v-run/current/v000000001.json", ["--version", "1"]),
    ],
)
def test_verify_of_a_version_whose_pointer_is_damaged_reports_it(
    unlearned_store, tmp_path: Path, damaged: str, argv: list[str], capsys
) -> None:
    """A damaged version pointer exited 2 with the bare checksum error and no report, while a damaged manifest or
    spec gave exit 4 and a recorded report saying what is damaged and how to mend it. Now the same. (A damaged pruned
    record: test_verify_damaged_pruned_record.py.)"""
    url, _ = unlearned_store
    path = tmp_path / "store" / damaged
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    assert main(["verify", "--store", url, "--run", "v-run", "--blocks", "2", "--no-prefect", *argv]) == 4
    err = capsys.readouterr().err
    version = 1 if argv else 2
    assert f"v-run v{version}: failed; no block replayed: a record it needs cannot be read (below)" in err, err
    what = f"the version pointer of version {version} of run"
    assert f"  {what} " in err and f"{url}/{damaged}) cannot be read, so no block was replayed: " in err, err
    assert "fails its checksum; it was damaged" in err and "restore it from a backup" in err, err
    report = re.search(r"^  report: (file://\S+)$", err, flags=re.MULTILINE)
    assert report, err
    recorded = ObjectStore(url).get_json(report.group(1).removeprefix(url + "/"))
    assert recorded["status"] == "failed" and recorded["records_unreadable"] == [damaged], recorded
    assert recorded["version"] == version and recorded["blocks_replayed"] == [], recorded
    assert any(f"{url}/{damaged}" in p and "restore it from a backup" in p for p in recorded["problems"]), recorded
    assert "- requests applied: unknown" in _markdown(recorded)  # the Prefect artifact of the same report


def test_a_damaged_version_pointer_restored_from_a_backup_after_store_check_repair_verifies(
    unlearned_store, tmp_path: Path, capsys
) -> None:
    """verify's mend for a damaged version pointer is a backup; but `store check --repair` deleted the manifest and
    checkpoints only that version used (nothing readable referenced them), so the restored pointer named a manifest
    that was gone. Now they are kept while a version pointer of the run cannot be read, and said so."""
    url, _ = unlearned_store
    registry = RunRegistry(ObjectStore(url))
    manifest_key = registry.current("v-run").manifest_key
    path = tmp_path / "store/runs/v-run/current/v000000002.json"
    backup = path.read_bytes()
    path.write_bytes(backup.replace(b'"version": 2', b'"version": 3'))
    assert main(["store", "check", "--repair", "--orphan-age", "0", "--store", url]) == 1
    err = capsys.readouterr().err
    assert "kept: a version pointer of theirs cannot be read (damaged, above)" in err, err
    assert (tmp_path / "store" / manifest_key).exists()
    path.write_bytes(backup)  # restored from a backup
    assert main(["verify", "--store", url, "--run", "v-run", "--blocks", "2", "--no-prefect"]) == 0
    assert main(["store", "check", "--store", url]) == 0


@pytest.mark.parametrize(
    ("argv", "rule"),
    [
        (
            ["--blocks", "abc"],
            "--blocks must be all, retrained or a block number (1..the run's number of blocks); got 'abc'.",
        ),
        (
            ["--blocks", "0"],
            "--blocks must be all, retrained or a block number (1..the run's number of blocks); got '0'.",
        ),
        (["--version", "0"], "--version must be a version number, 1 or more; got 0."),
        (["--version", "-2", "--blocks", "2"], "--version must be a version number, 1 or more; got -2."),
    ],
)
def test_verify_refuses_a_malformed_choice_before_it_opens_the_store(tmp_path: Path, argv, rule, capsys) -> None:
    """`verify --blocks abc` was refused only once the store was open (16-21 s under load); a missing store said so."""
    missing = f"file://{tmp_path / 'nowhere'}"  # opened, it would be refused as a store that does not exist
    assert main(["verify", "--store", missing, "--run", "v-run", *argv]) == 2
    err = capsys.readouterr().err
    assert f"obliviate verify: error: {rule}" in err and "does not exist" not in err, err
    assert not (tmp_path / "nowhere").exists()


def test_an_interrupted_verify_says_it_keeps_nothing_to_resume_from() -> None:
    """A Ctrl-C said "rerunning the same command resumes from whatever it had stored": verify stores only each
    replay's result, once it ends, so a rerun replays again."""
    from flows.cli import interrupted_message, parse_args

    said = interrupted_message(parse_args(["verify", "--run", "r"]))
    assert said.startswith("obliviate verify: interrupted. A replay's result is recorded (ledger/verifications/) only")
    assert "rerunning the command replays every block asked for again" in said
    assert "resumes" not in said
