"""`obliviate verify` of a sharded run: every shard replayed, side by side on Ray (SPEC 6).

The shards are trained in-process with the worker the flows use, in a file:// store; verify replays them in Ray
tasks of this session's local Ray runtime (``ray_address``), under a real Prefect server where the flow runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from actors.chains import ChainWorker
from flows.cli import main
from flows.train import run_spec
from flows.verify import VERIFICATIONS, verify_shards
from obliviate.errors import ConfigError
from storage import ObjectStore
from storage.registry import RunRegistry

MEMBERS = ["g-s0of2", "g-s1of2"]


@pytest.fixture
def sharded_store(tmp_path: Path, tiny_run) -> str:
    """A run ``g`` of two shards of two blocks each, as ``train --shards 2`` leaves it."""
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    for k in range(2):
        ChainWorker(url).train(run_spec(run_id="g", shards=2, shard=k, **tiny_run(split_seed=0, blocks=2)))
    store.put_json("groups/g.json", {"run_id": "g", "members": MEMBERS, "rule": "mean_probability"})
    return url


def test_verify_a_sharded_run_by_its_name_replays_every_shard_on_ray(
    sharded_store: str, tmp_path: Path, ray_address: str, capsys
) -> None:
    url = sharded_store
    assert main(["verify", "--store", url, "--run", "g", "--no-prefect"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["status"] == "passed" and [r["run_id"] for r in report["shards"]] == MEMBERS
    assert all(r["bit_identical"] and all(r["bit_identical"].values()) for r in report["shards"])
    # replayed in Ray tasks, not in this process (the driver replayed them one after another before)
    assert all(r["replayed_on"]["pid"] != os.getpid() for r in report["shards"])
    assert "verify g (2 shards): passed" in captured.err
    assert main(["verify", "--store", url, "--run", "g", "--version", "1", "--no-prefect"]) == 2
    assert "each shard has its own versions; verify one shard's version with --run g-s0of2" in capsys.readouterr().err
    registry = RunRegistry(ObjectStore(url))
    path = tmp_path / "store" / registry.manifest(registry.current(MEMBERS[1])).members["2"].key
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))  # one shard tampered with: the sharded run fails, the other shard still passes
    assert main(["verify", "--store", url, "--run", "g", "--no-prefect"]) == 4
    err = capsys.readouterr().err
    assert "g-s1of2 v1: failed" in err and "g-s0of2 v1: passed" in err


@pytest.mark.parametrize("in_process", [False, True], ids=["ray", "in-process"])
def test_a_shard_that_raises_leaves_the_others_replayed_and_recorded(
    sharded_store: str, in_process: bool, request
) -> None:
    """A shard's own error comes out as itself (not Ray's remote traceback), once the other shards have ended."""
    if not in_process:
        request.getfixturevalue("ray_address")
    url = sharded_store
    with pytest.raises(ConfigError, match="run 'g-s9of2' has no published version") as raised:
        verify_shards(url, [MEMBERS[0], "g-s9of2", MEMBERS[1]], in_process=in_process)
    assert "Traceback" not in str(raised.value)
    recorded = ObjectStore(url).list(VERIFICATIONS)
    assert sorted({Path(key).name.split("-v0")[0] for key in recorded}) == MEMBERS


@pytest.mark.parametrize("in_process", [False, True], ids=["ray", "in-process"])
def test_verify_of_a_sharded_run_under_prefect_is_one_flow_run_with_an_artifact_per_shard(
    sharded_store: str, prefect_api_url: str, in_process: bool, request, monkeypatch, capsys
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowFilter, FlowFilterName

    if not in_process:
        request.getfixturevalue("ray_address")
    monkeypatch.setenv("PREFECT_API_URL", prefect_api_url)
    assert main(["verify", "--store", sharded_store, "--run", "g", *(["--in-process"] if in_process else [])]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["status"] for r in report["shards"]] == ["passed", "passed"]
    assert [r["replayed_on"]["pid"] == os.getpid() for r in report["shards"]] == [in_process, in_process]
    keys = [f"verify-{member}" for member in MEMBERS]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["verify-shards"])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    ours = [run for run in runs if run.parameters.get("store") == sharded_store]
    assert len(ours) == 1 and ours[0].state is not None and ours[0].state.is_completed()
    assert ours[0].parameters["shards"] == MEMBERS and ours[0].parameters["in_process"] is in_process
    by_key = {artifact.key: artifact for artifact in artifacts if artifact.flow_run_id == ours[0].id}
    assert sorted(by_key) == keys
    assert all(
        "**passed**" in str(artifact.data) and "replayed on:" in str(artifact.data) for artifact in by_key.values()
    )


def test_a_ray_address_where_no_cluster_answers_is_refused_before_any_replay(sharded_store: str, capsys) -> None:
    from flows.runtime import free_port

    address = f"127.0.0.1:{free_port()}"
    assert main(["verify", "--store", sharded_store, "--run", "g", "--ray-address", address, "--no-prefect"]) == 2
    assert address in capsys.readouterr().err
    assert ObjectStore(sharded_store).list(VERIFICATIONS) == []  # nothing replayed, no report


def test_in_process_replays_every_shard_here_one_after_another(sharded_store: str, tmp_path: Path, capsys) -> None:
    """``--in-process``: no Ray start for a small run (11.0 s on Ray, 4.2 s here for digits, 2 shards x 6 blocks)."""
    url = sharded_store
    assert main(["verify", "--store", url, "--run", "g", "--no-prefect", "--in-process"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["status"] == "passed" and [r["run_id"] for r in report["shards"]] == MEMBERS
    assert all(r["bit_identical"] and all(r["bit_identical"].values()) for r in report["shards"])
    assert all(r["replayed_on"]["pid"] == os.getpid() for r in report["shards"])
    assert "verify g (2 shards): passed" in captured.err
    registry = RunRegistry(ObjectStore(url))
    path = tmp_path / "store" / registry.manifest(registry.current(MEMBERS[0])).members["1"].key
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))  # the first shard tampered with: the second is still replayed and passes
    assert main(["verify", "--store", url, "--run", "g", "--no-prefect", "--in-process"]) == 4
    err = capsys.readouterr().err
    assert "g-s0of2 v1: failed" in err and "g-s1of2 v1: passed" in err


def test_in_process_with_a_ray_address_is_refused(sharded_store: str, capsys) -> None:
    args = ["verify", "--store", sharded_store, "--run", "g", "--no-prefect", "--in-process"]
    assert main([*args, "--ray-address", "127.0.0.1:6379"]) == 2
    assert (
        "--in-process replays the shards in this process, --ray-address 127.0.0.1:6379 on a Ray cluster; "
        "give one of them." in capsys.readouterr().err
    )
    assert ObjectStore(sharded_store).list(VERIFICATIONS) == []


def test_blocks_retrained_of_a_sharded_run_replays_the_shards_a_deletion_reached(sharded_store: str, capsys) -> None:
    """A deletion reaching shard 0 only: `verify --run g --blocks retrained` was refused outright ("run g-s1of2
    version 1 has no deletion applied"), so the retrained shard could not be verified by its group's name."""
    url = sharded_store
    args = ["verify", "--store", url, "--run", "g", "--blocks", "retrained", "--no-prefect", "--in-process"]
    assert main(args) == 2  # no shard has a deletion yet: refused, for the group
    said = capsys.readouterr().err
    assert "no shard of g (g-s0of2, g-s1of2) has a deletion applied, so no block was retrained" in said
    assert ObjectStore(url).list(VERIFICATIONS) == []
    spec = RunRegistry(ObjectStore(url)).spec(MEMBERS[0])
    audit = ChainWorker(url).unlearn(MEMBERS[0], {"req-1": [int(spec.train_ids[-1])]})
    assert audit["status"] == "published"
    retrained = list(range(audit["first_affected_block"], 3))
    assert main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    replayed = {r["run_id"]: r["blocks_replayed"] for r in report["shards"]}
    assert replayed == {MEMBERS[0]: retrained, MEMBERS[1]: []} and retrained
    assert f"verify {MEMBERS[0]} v2: passed; {len(retrained)}/{len(retrained)} replayed blocks bit-identical" in (
        captured.err
    )
    assert (
        f"verify {MEMBERS[1]} v1: passed; no deletion applied to this shard, so no block was retrained or replayed"
        in captured.err
    )
    # one shard asked for by its own id is still refused: nothing of it was retrained
    assert main([*args[:4], MEMBERS[1], *args[5:]]) == 2
    assert f"run {MEMBERS[1]} version 1 has no deletion applied" in capsys.readouterr().err
