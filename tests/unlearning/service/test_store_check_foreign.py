"""`store check` on the README's default store after the demo and steal ran (probe 68, D-d): the demo's own
store (./runs/demo, with the deletion story's store at ./runs/demo/service) and steal's plain files
(./runs/steal, ./runs/demo/steal) live inside the default store ./runs. A nested store is not the outer
store's: skipped and said; a file obliviate did not write is left alone; our own crash leftovers are still
collected."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from torch import nn

from actors.chains import ChainWorker
from flows.cli import main
from flows.settle import store_pass
from flows.train import run_spec, training_claim
from obliviate.extraction.target import save_checkpoint
from storage import ObjectStore
from storage.check import check_store
from storage.errors import StorageError

REPO = Path(__file__).resolve().parents[3]

AN_HOUR_AGO = time.time() - 3600
# steal's outputs (--out runs/steal, the demo's runs/demo/steal) and target train's checkpoint: plain files
USER_FILES = ["steal/target.pt", "steal/steal.json", "steal/steal.md", "steal/steal.png", "target.pt"]
DEMO_USER_FILES = ["demo/steal/target.pt", "demo/steal/steal.json", "demo/steal/steal.md", "demo/steal/steal.png"]


def _old(path: Path) -> None:
    os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))


def _user_files(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".pt"):  # target train's own writer
            save_checkpoint(path, model=nn.Linear(4, 2), arch="linear", meta={"num_classes": 2})
        elif name.endswith(".json"):
            path.write_text(json.dumps({"queries_to_90": 120}))
        else:
            path.write_bytes(b"# extraction audit\n" if name.endswith(".md") else b"\x89PNG\r\n\x1a\n")
        _old(path)


@pytest.fixture
def default_store(tmp_path, tiny_run, capsys):
    """./runs as the README leaves it: a run, the demo's store inside (a reduce result and the deletion story's
    store with a run), steal's plain files in both, and our own crash leftovers in the outer store."""
    root = tmp_path / "runs"
    url = f"file://{root}"
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=2, train_size=200, heldout_size=100))
    ChainWorker(url).train(spec)
    demo = root / "demo"
    assert main(["reduce", "--data", "digits", "--k", "10", "--workers", "0", "--out", str(demo)]) == 0
    ChainWorker(f"file://{demo}/service").train(spec)
    capsys.readouterr()
    _user_files(root, USER_FILES + DEMO_USER_FILES)
    # our own leftovers of a crash: a write's temporary file and bytes whose commit record never came
    chain = root / "runs/r1/chains/train"
    ours = [chain / ".tmp-0123456789abcdef-ckpt-0001.pt", chain / "ckpt-0009.pt"]
    for path in ours:
        path.write_bytes(b"half a checkpoint")
        _old(path)
    # the nested store's own leftover: its check's business, not the outer one's
    (nested_leftover,) = demo.glob("reduce-*")
    nested_tmp = nested_leftover / ".tmp-fedcba9876543210-summary.json"
    nested_tmp.write_bytes(b"{")
    _old(nested_tmp)
    return url, root, [str(p.relative_to(root)) for p in ours], nested_tmp


def test_a_nested_store_is_skipped_and_plain_files_are_left_alone(default_store, capsys):
    """The outer check reported the demo's reduce result as damaged ('... but it is gone', exit 1 for good,
    --repair UNRECOVERABLE) and listed steal's report and target checkpoints as orphans, which --repair deleted.
    Now the nested store is skipped (said in one line, with how to check it), the plain files are counted as
    not written by obliviate and left alone, the store is healthy (exit 0), and --repair collects only our own
    crash leftovers."""
    url, root, ours, nested_tmp = default_store
    store = ObjectStore(url)

    report = check_store(store, min_age_s=600)
    assert report.corrupt == [] and report.lineage == [] and report.healthy, report.as_dict()
    assert report.nested == ["demo/"], report.as_dict()
    assert report.orphans == sorted(ours), report.as_dict()
    assert sorted(report.foreign) == sorted(USER_FILES), report.as_dict()

    assert main(["store", "check", "--store", url]) == 0
    err = capsys.readouterr().err
    assert f"skipped nested store demo/ (a store of its own: check it with --store {url}/demo)" in err, err
    assert f"{len(USER_FILES)} file(s) not written by obliviate left alone" in err, err
    assert "damaged" not in err.replace("0 damaged", ""), err

    assert main(["store", "check", "--repair", "--store", url]) == 0
    err = capsys.readouterr().err
    assert "UNRECOVERABLE" not in err and f"collected {len(ours)} orphan(s)" in err, err
    for name in USER_FILES + DEMO_USER_FILES:
        assert (root / name).exists(), f"--repair deleted the user's {name}"
    assert not any((root / name).exists() for name in ours)
    assert nested_tmp.exists()  # the nested store's leftover waits for its own check

    # the nested stores are checked on their own: healthy, the deletion story's store skipped in turn
    nested = check_store(ObjectStore(f"{url}/demo"), min_age_s=600)
    assert nested.healthy and nested.nested == ["service/"], nested.as_dict()
    assert sorted(nested.foreign) == sorted(name.removeprefix("demo/") for name in DEMO_USER_FILES)
    assert nested.orphans == [str(nested_tmp.relative_to(root / "demo"))], nested.as_dict()
    assert check_store(ObjectStore(f"{url}/demo/service"), min_age_s=600).healthy


def test_a_run_named_like_a_store_folder_is_not_a_nested_store(store_url, tiny_run):
    """A run whose id is a store folder's name (runs/registry/spec.json looks like a store rooted at runs/) is the
    store's own run: checked, and its crash leftovers collected."""
    root = Path(store_url.removeprefix("file://"))
    spec = run_spec(run_id="registry", split_seed=0, **tiny_run(blocks=2, train_size=200, heldout_size=100))
    ChainWorker(store_url).train(spec)
    leftover = root / "runs/registry/chains/train/ckpt-0009.pt"
    leftover.write_bytes(b"half a checkpoint")
    _old(leftover)
    report = check_store(ObjectStore(store_url), min_age_s=600)
    assert report.nested == [] and report.healthy, report.as_dict()
    assert report.orphans == ["runs/registry/chains/train/ckpt-0009.pt"], report.as_dict()
    assert report.objects_checked >= 6


def test_a_store_holding_only_a_nested_store_is_not_said_empty(tmp_path, capsys):
    """./runs after only the demo's first step: `store check` said 'the store holds nothing; check --store if you
    expected data', as for a mistyped store. Now it names the nested store and how to check it, and nothing else."""
    root = tmp_path / "runs"
    assert main(["reduce", "--data", "digits", "--k", "10", "--workers", "0", "--out", str(root / "demo")]) == 0
    capsys.readouterr()
    assert main(["store", "check", "--store", f"file://{root}"]) == 0
    err = capsys.readouterr().err
    assert (
        "holds nothing" not in err
        and f"skipped nested store demo/ (a store of its own: check it with --store file://{root}/demo)" in err
    ), err


def test_on_s3_a_nested_store_and_plain_objects_are_left_alone(s3_url, moto_endpoint, capsys):
    """The same on S3 (moto): a nested store under the prefix is skipped, an object put there without obliviate's
    commit record is left alone by --repair, whatever its age."""
    import s3fs

    from flows.repair import check_and_repair

    assert main(["reduce", "--data", "digits", "--k", "10", "--workers", "0", "--store", f"{s3_url}/demo"]) == 0
    capsys.readouterr()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint})  # a user's upload, not obliviate's
    bucket_path = s3_url.removeprefix("s3://")
    for name in ("steal/steal.json", "demo/steal/steal.md"):
        fs.pipe_file(f"{bucket_path}/{name}", b"{}")
    report = check_and_repair(s3_url, repair=True, min_orphan_age_s=0)
    assert report.healthy and report.nested == ["demo/"] and report.foreign == ["steal/steal.json"], report.as_dict()
    assert report.collected == [] and report.unrecoverable == [], report.as_dict()
    assert fs.exists(f"{bucket_path}/steal/steal.json") and fs.exists(f"{bucket_path}/demo/steal/steal.md")


# a user's files, each with a checksum file of its own that does not match it: sha256sum's format, and one that
# reads like our commit record; outside our folders (the root, steal/, and runs/steal/, which no run's layout holds)
USER_CHECKSUMMED = {
    "steal/model.pt": f"{'0' * 64}  model.pt\n",
    "notes.txt": f"{'1' * 64}  notes.txt\n",
    "runs/steal/target.pt": json.dumps({"sha256": "2" * 64, "size": 3, "committed_at": AN_HOUR_AGO}),
}


def test_a_users_file_with_its_own_sha256_is_left_alone_and_our_damage_still_reported(tmp_path, capsys):
    """A user's file with a .sha256 of its own beside it, outside our folders, was verified as ours and reported
    damaged when it did not match (and --repair's exit said the store was broken). Now only what our layout owns is
    verified: the user's files are counted as not ours and left alone by --repair, while a damaged object of ours
    is still reported."""
    root = tmp_path / "store"
    url = f"file://{root}"
    store = ObjectStore(url)
    store.put_json("groups/g1.json", {"runs": ["r1", "r2"]})
    store.put_json("groups/g2.json", {"runs": ["r3"]})
    (root / "groups/g1.json").write_bytes(b'{"runs": ["r1"]}')  # ours, damaged
    for name, checksum in USER_CHECKSUMMED.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the user's own bytes")
        Path(f"{path}.sha256").write_text(checksum)
        _old(path)
        _old(Path(f"{path}.sha256"))
    before = {name: (root / name).read_bytes() for name in USER_CHECKSUMMED}

    report = check_store(store, min_age_s=0)
    assert [item["key"] for item in report.corrupt] == ["groups/g1.json"], report.as_dict()
    assert report.objects_checked == 2 and report.orphans == [], report.as_dict()
    assert sorted(report.foreign) == sorted([*USER_CHECKSUMMED, *(f"{n}.sha256" for n in USER_CHECKSUMMED)])

    assert main(["store", "check", "--repair", "--orphan-age", "0", "--store", url]) == 1  # ours is still damaged
    err = capsys.readouterr().err
    assert "damaged groups/g1.json" in err or "UNRECOVERABLE groups/g1.json" in err, err
    assert not [line for line in err.splitlines() if "damaged" in line and "steal" in line], err
    for name, checksum in USER_CHECKSUMMED.items():
        assert (root / name).read_bytes() == before[name] and Path(f"{root / name}.sha256").read_text() == checksum


def _write_cut_before_its_commit_record(store: ObjectStore, root: Path, key: str, data: bytes) -> None:
    """Our real write of ``key``, cut off between its bytes and its commit record (a full disk: here a folder where
    the record goes)."""
    blocker = root / f"{key}.sha256"
    blocker.mkdir(parents=True)
    with pytest.raises(StorageError):
        store.put_bytes(key, data)
    blocker.rmdir()
    assert (root / key).read_bytes() == data and not store.exists(key)


def test_a_brand_new_runs_interrupted_first_write_is_ours_and_collected_once_old(tmp_path, capsys):
    """Bytes of a brand-new run's first write cut off before any commit record were counted as a user's files
    (its run folder held nothing committed), never collected. Their names are our writer's (the block plan, a
    block's checkpoint, a temporary of one): now reported as interrupted writes and collected by --repair once
    older than --orphan-age; a write in flight (young) is kept, and a user's plain file there still left alone."""
    root = tmp_path / "store"
    url = f"file://{root}"
    store = ObjectStore(url)
    ours = ["runs/fresh/plan.json", "runs/fresh/chains/train/ckpt-0001.pt"]
    for key in ours:
        _write_cut_before_its_commit_record(store, root, key, b"half written")
    # a writer killed while writing a checkpoint's temporary (storage.objects' atomic write names it so)
    temporary = f"runs/fresh/chains/train/.tmp-{uuid.uuid4().hex}-ckpt-0002.pt"
    (root / temporary).write_bytes(b"half")
    ours.append(temporary)
    (root / "runs/steal").mkdir(parents=True)
    (root / "runs/steal/steal.json").write_text("{}")  # a user's plain file: not our writer's name
    for name in [*ours, "runs/steal/steal.json"]:
        _old(root / name)
    _write_cut_before_its_commit_record(store, root, "runs/young/plan.json", b"in flight")  # just now

    report = check_store(store, min_age_s=600)
    assert report.healthy and report.orphans == sorted(ours), report.as_dict()
    assert report.foreign == ["runs/steal/steal.json"], report.as_dict()
    assert "runs/young/plan.json" in report.uncommitted and "runs/young/plan.json" not in report.orphans

    assert main(["store", "check", "--store", url]) == 0
    err = capsys.readouterr().err
    assert f"{len(ours)} interrupted write(s)" in err and "runs/fresh/plan.json" in err, err
    assert main(["store", "check", "--repair", "--store", url]) == 0
    err = capsys.readouterr().err
    assert f"collected {len(ours)} orphan(s)" in err, err
    assert not any((root / name).exists() for name in ours)
    assert (root / "runs/young/plan.json").exists() and (root / "runs/steal/steal.json").exists()


# `obliviate train`'s claim on a brand-new run (flows.train.training_claim), its writer killed (SIGKILL) between the
# write of the claim's first pointer version (a temporary in runs/<run>/train-claim/) and the link that commits it
_KILLED_WHILE_CLAIMING = """
import os, signal, sys
from flows.train import training_claim
os.link = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
with training_claim(sys.argv[1], sys.argv[2]):
    raise SystemExit("the claim was committed: the writer was not killed before it")
"""


def test_a_brand_new_runs_training_claim_temporary_left_by_a_killed_writer_is_collected_once_old(tmp_path, capsys):
    """A writer killed while taking `obliviate train`'s claim on a brand-new run left the claim's temporary
    (runs/<run>/train-claim/.tmp-<hex>), the only thing in its run folder: store check saw nothing ('the store holds
    nothing') and --repair never collected it. Now it is an interrupted write, collected once older than
    --orphan-age; one written just now (a writer that may still link it) is kept."""
    root = tmp_path / "store"
    url = f"file://{root}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [
        subprocess.Popen([sys.executable, "-c", _KILLED_WHILE_CLAIMING, url, run_id], cwd=REPO, env=env)
        for run_id in ("fresh", "young")
    ]
    assert [writer.wait(120) for writer in writers] == [-signal.SIGKILL] * 2
    (old,) = (root / "runs/fresh/train-claim").iterdir()
    (young,) = (root / "runs/young/train-claim").iterdir()
    assert re.fullmatch(r"\.tmp-[0-9a-f]{32}", old.name) and re.fullmatch(r"\.tmp-[0-9a-f]{32}", young.name)
    _old(old)
    leftover = str(old.relative_to(root))

    report = check_store(ObjectStore(url), min_age_s=600)
    assert report.healthy and report.orphans == [leftover] and report.foreign == [], report.as_dict()

    assert main(["store", "check", "--store", url]) == 0
    err = capsys.readouterr().err
    assert "1 interrupted write(s)" in err and leftover in err and "holds nothing" not in err, err
    assert main(["store", "check", "--repair", "--store", url]) == 0
    assert "collected 1 orphan(s)" in capsys.readouterr().err
    assert not old.exists() and young.exists()


def test_the_leases_of_a_training_or_pass_claim_are_ours_not_a_users(tmp_path):
    """Every `obliviate train` left its claim's lease (runs/<run>/train-claim-leases/c<version>.json and its commit
    record), every pass of serve or reconcile its store claim's (service/pass-claim-leases/), and store check counted
    them among 'file(s) not written by obliviate': never verified, and a killed renewal's leftovers never collected.
    Now they are ours: verified, and the leftovers collected once old."""
    root = tmp_path / "store"
    url = f"file://{root}"
    with training_claim(url, "r1"):
        pass
    with store_pass(ObjectStore(url), holder="a reconcile pass") as held_by:
        assert held_by is None
    leftovers = []
    for folder in ("runs/r1/train-claim-leases", "service/pass-claim-leases"):
        leases = root / folder
        assert sorted(p.name for p in leases.iterdir()) == ["c000000001.json", "c000000001.json.sha256"]
        leftover = leases / f".tmp-{uuid.uuid4().hex}-c000000001.json"  # a renewal killed before its rename
        leftover.write_bytes(b"{")
        _old(leftover)
        leftovers.append(str(leftover.relative_to(root)))
    report = check_store(ObjectStore(url), min_age_s=600)
    assert report.healthy and report.foreign == [] and report.objects_checked == 2, report.as_dict()
    assert report.orphans == sorted(leftovers), report.as_dict()
