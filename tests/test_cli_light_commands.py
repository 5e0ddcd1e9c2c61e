"""``forget --status``, ``forget --cancel`` and ``store check`` run without torch (nor numba, scipy, sklearn, ray or
prefect): they only read (and, for --cancel, write) the ledger and the store's objects.

They used to import torch all the same (663-727 MB max RSS, seconds before the first line): the ledger and the
registry imported :mod:`obliviate.unlearning.service`, whose package ``__init__`` imported every module (torch
among them), ``service`` and ``config`` imported torch through ``chain`` and ``models``, and the handlers' other
helpers (``flows.rollback``, ``flows.repair``, ``storage.serving``, ``storage.tiles``) imported torch or numba at
their top. The package now loads a name's module on first use, and torch is imported where a model or a
checkpoint is made or loaded.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numba", "scipy", "sklearn", "ray", "prefect")

_PROBE = """
import contextlib, io, json, sys
from flows.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main({argv!r})
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
print(json.dumps({{"rc": rc, "out": out.getvalue(), "err": err.getvalue(), "heavy": heavy}}))
"""


def _run(argv: list[str]) -> dict:
    code = _PROBE.format(argv=argv, heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory) -> Path:
    """A store with one tiny trained run (digits, 2 blocks of 1 epoch; about 2 s), copied by each test."""
    from actors.chains import ChainWorker
    from flows.train import run_spec

    folder = tmp_path_factory.mktemp("light") / "store"
    spec = run_spec(
        run_id="r1",
        split_seed=0,
        data="digits",
        model="lenet5",
        blocks=2,
        epochs=1,
        batch_size=32,
        learning_rate=0.01,
        schedule="constant",
        train_size=100,
        heldout_size=50,
        seed=0,
    )
    ChainWorker(f"file://{folder}").train(spec)
    return folder


@pytest.fixture
def store(trained_store: Path, tmp_path: Path) -> str:
    """A copy of the trained store with one pending request, ``req-1``."""
    from storage.ledger import DeletionLedger
    from storage.objects import ObjectStore

    folder = tmp_path / "store"
    shutil.copytree(trained_store, folder)
    url = f"file://{folder}"
    DeletionLedger(ObjectStore(url)).append(request_id="req-1", ids=[3, 5], dataset="digits", reason="asked")
    return url


def test_forget_status_imports_no_torch(store: str) -> None:
    result = _run(["forget", "--status", "req-1", "--store", store])
    assert result["rc"] == 0, result["err"]
    shown = json.loads(result["out"])
    assert shown["request_id"] == "req-1" and shown["status"] == "pending" and shown["ids"] == [3, 5]
    assert [h["status"] for h in shown["history"]] == ["pending"] and shown["batch"] is None
    assert "request req-1: pending (not picked up yet" in result["err"]
    assert result["heavy"] == []


def test_forget_cancel_imports_no_torch(store: str) -> None:
    result = _run(["forget", "--cancel", "req-1", "--store", store])
    assert result["rc"] == 0, result["err"]
    assert result["err"].strip() == "request req-1: cancelled (withdrawn while pending)"
    assert result["heavy"] == []

    from storage.ledger import DeletionLedger
    from storage.objects import ObjectStore

    assert DeletionLedger(ObjectStore(store)).get("req-1").status == "cancelled"


def test_store_check_imports_no_torch(store: str) -> None:
    result = _run(["store", "check", "--store", store])
    assert result["rc"] == 0, result["err"]
    report = json.loads(result["out"])
    assert report["healthy"] is True and report["corrupt"] == [] and report["lineage"] == []
    assert report["objects_checked"] >= 10  # the run's spec, plan, checkpoints and manifest, and the request
    assert "0 damaged, 0 lineage problem(s), 0 orphan(s)" in result["err"]
    assert result["heavy"] == []


def test_the_unlearning_package_loads_a_names_module_on_first_use() -> None:
    code = (
        "import sys; import obliviate.unlearning as u; before = 'torch' in sys.modules; "
        "from obliviate.unlearning import RunSpec, check_name; after_service = 'torch' in sys.modules; "
        "from obliviate.unlearning import Checkpoint; "
        "print(before, after_service, 'torch' in sys.modules, Checkpoint.__module__, RunSpec.__module__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "False",
        "False",
        "True",
        "obliviate.unlearning.chain",
        "obliviate.unlearning.service",
    ]


def test_the_packages_lazy_table_matches_its_typed_imports_and_all() -> None:
    import obliviate.unlearning as package

    tree = ast.parse(Path(package.__file__).read_text())
    typed: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("obliviate.unlearning."):
            typed.update({alias.name: node.module.rsplit(".", 1)[1] for alias in node.names})
    assert typed == package._HOME
    assert sorted(package._HOME) == sorted(package.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = package.nope
    assert "RunSpec" in dir(package)


@pytest.fixture(scope="module")
def held_store(tmp_path_factory) -> Path:
    """A run an interim rollback holds for two requests: req-3 (block 3; serves M_2), then req-1 (block 2; serves M_1)."""
    from actors.chains import ChainWorker
    from flows.batching import batch_gate, save_policy
    from flows.rollback import save_rollback
    from flows.train import run_spec
    from obliviate.unlearning.batching import DAY_S, BatchPolicy
    from obliviate.unlearning.plan import BlockPlan
    from storage.ledger import DeletionLedger
    from storage.objects import ObjectStore

    folder = tmp_path_factory.mktemp("held") / "store"
    url = f"file://{folder}"
    store = ObjectStore(url)
    store.ensure_container()
    spec = run_spec(
        run_id="r1",
        split_seed=0,
        data="digits",
        model="lenet5",
        blocks=3,
        epochs=1,
        batch_size=32,
        learning_rate=0.01,
        schedule="constant",
        train_size=150,
        heldout_size=50,
        seed=0,
    )
    ChainWorker(url).train(spec)
    save_policy(store, BatchPolicy(window_s=DAY_S))
    save_rollback(store, enabled=True, floor_points=100.0)
    plan = BlockPlan.from_dict(store.get_json("runs/r1/plan.json"))
    ledger = DeletionLedger(store)
    for request_id, block in (("req-3", 3), ("req-1", 2)):  # one pass each: each publishes its own interim
        ids = [int(spec["train_ids"][p]) for p in plan.block_ids(block)[:2]]
        ledger.append(request_id=request_id, ids=ids, dataset="digits", reason=None)
        assert batch_gate(store, ledger.open_entries(stale_after_s=600.0))["interim"]["runs"]["r1"]["published"]
    return folder


def _judge_verdict(url: str, block: int, floor_points: float) -> bool:
    """What the held-out judge (models loaded, torch) says of serving ``block`` of r1 now."""
    from flows.rollback import heldout_judge
    from storage.objects import ObjectStore
    from storage.registry import RunRegistry
    from storage.serving import run_state

    registry = RunRegistry(ObjectStore(url))
    state = run_state(registry, "r1")
    assert state is not None
    return heldout_judge(registry, [state]).meets_floor({0: block}, floor_points=floor_points)


@pytest.mark.parametrize("floor", ["accepting", "refusing"])
def test_forget_cancel_of_a_request_a_rollback_holds_imports_no_torch(held_store: Path, tmp_path: Path, floor) -> None:
    """It loaded torch, scipy and sklearn (863 MB, 6.8 s) to judge the block to serve again and to write the
    release's lineage; both come from what the interims recorded, and decide as the judge does."""
    from flows.rollback import save_rollback
    from storage.objects import ObjectStore
    from storage.registry import RunRegistry
    from storage.serving import pointer_target

    folder = tmp_path / "store"
    shutil.copytree(held_store, folder)
    url = f"file://{folder}"
    store = ObjectStore(url)
    if floor == "refusing":  # a floor block 2 no longer meets (its recorded figures: accuracy, reference, margin)
        meta = store.read_manifest("runs/r1/manifests/v000002-interim-000001-2.json").metadata
        accuracy = meta["chain"]["checkpoints"][2]["heldout_accuracy"]
        floor_points = 100 * (meta["reference_accuracy"] + meta["interim_margin_points"] / 100 - accuracy) - 1
        assert 0 <= floor_points <= 100
        save_rollback(store, enabled=True, floor_points=floor_points)
    else:
        floor_points = 100.0
    expected = 2 if _judge_verdict(url, 2, floor_points) else 1  # else the block served now stays
    assert expected == (2 if floor == "accepting" else 1)

    result = _run(["forget", "--cancel", "req-1", "--store", url])
    assert result["rc"] == 0, result["err"]
    assert "run r1: released the rollback held for ['req-1']" in result["err"]
    assert result["heavy"] == []

    registry = RunRegistry(store)
    current, target = pointer_target(registry, "r1")
    assert target["holds"] == {"req-3": 3} and target["serve_block"] == expected
    # the release's lineage is what lineage_manifest computes for M_0..M_s on this machine, where the run trained
    from obliviate.unlearning.config import BlockTrainingConfig
    from obliviate.unlearning.lineage import lineage_manifest
    from obliviate.unlearning.plan import BlockPlan

    manifest = registry.manifest(current)
    chain = manifest.metadata["chain"]
    assert manifest.metadata["lineage"] == lineage_manifest(
        config=BlockTrainingConfig.from_dict(chain["config"]),
        plan=BlockPlan.from_dict(chain["plan"]),
        deleted_ids=frozenset(chain["deleted_ids"]),
        checkpoint_sha256={int(k): info.sha256 for k, info in manifest.members.items()},
        through_block=expected,
    )


@pytest.fixture(scope="module")
def held_in_one_pass(tmp_path_factory) -> Path:
    """A run one interim holds for two requests accepted in one pass: req-3 (block 3) and req-1 (block 2); it serves
    M_1, so no interim was ever published at M_2, the block to serve again once req-1 is cancelled."""
    from actors.chains import ChainWorker
    from flows.batching import batch_gate, save_policy
    from flows.rollback import save_rollback
    from flows.train import run_spec
    from obliviate.unlearning.batching import DAY_S, BatchPolicy
    from obliviate.unlearning.plan import BlockPlan
    from storage.ledger import DeletionLedger
    from storage.objects import ObjectStore

    folder = tmp_path_factory.mktemp("one-pass") / "store"
    url = f"file://{folder}"
    store = ObjectStore(url)
    store.ensure_container()
    spec = run_spec(
        run_id="r1",
        split_seed=0,
        data="digits",
        model="lenet5",
        blocks=3,
        epochs=1,
        batch_size=32,
        learning_rate=0.01,
        schedule="constant",
        train_size=150,
        heldout_size=50,
        seed=0,
    )
    ChainWorker(url).train(spec)
    save_policy(store, BatchPolicy(window_s=DAY_S))
    save_rollback(store, enabled=True, floor_points=100.0)
    plan = BlockPlan.from_dict(store.get_json("runs/r1/plan.json"))
    ledger = DeletionLedger(store)
    for request_id, block in (("req-3", 3), ("req-1", 2)):
        ids = [int(spec["train_ids"][p]) for p in plan.block_ids(block)[:2]]
        ledger.append(request_id=request_id, ids=ids, dataset="digits", reason=None)
    interim = batch_gate(store, ledger.open_entries(stale_after_s=600.0))["interim"]["runs"]["r1"]
    assert interim["published"] and interim["serve_block"] == 1
    return folder


@pytest.mark.parametrize("floor", ["accepting", "refusing"])
def test_forget_cancel_of_a_hold_placed_in_the_same_pass_as_another_imports_no_torch(
    held_in_one_pass: Path, tmp_path: Path, floor
) -> None:
    """The block to serve again (M_2) was never judged by an interim, so the release loaded torch, scipy and sklearn
    to judge it. The interim now records the judgement of every block a release of its holds could serve, and the
    release decides from it as the judge does."""
    from flows.rollback import heldout_judge, save_rollback
    from storage.objects import ObjectStore
    from storage.registry import RunRegistry
    from storage.serving import RELEASE_JUDGEMENTS, pointer_target, run_state

    folder = tmp_path / "store"
    shutil.copytree(held_in_one_pass, folder)
    url = f"file://{folder}"
    store = ObjectStore(url)
    registry = RunRegistry(store)
    state = run_state(registry, "r1")
    assert state is not None and state.holds == {"req-3": 3, "req-1": 2} and state.served_block == 1
    judge = heldout_judge(registry, [state])  # what the release loaded; the interim recorded its figures for M_2
    recorded = [
        (r["block"], r["accuracy"], r["reference_accuracy"], r["margin_points"])
        for r in state.manifest.metadata[RELEASE_JUDGEMENTS]
    ]
    assert recorded == [(2, judge.accuracy({0: 2}), judge.reference_accuracy, judge.margin({0: 2}))]
    if floor == "refusing":  # a floor M_2 does not meet by the judge's own figures
        short = judge.reference_accuracy + judge.margin({0: 2}) / 100 - judge.accuracy({0: 2})
        floor_points = 100 * short - 1
        assert 0 <= floor_points <= 100
        save_rollback(store, enabled=True, floor_points=floor_points)
    else:
        floor_points = 100.0
    expected = 2 if _judge_verdict(url, 2, floor_points) else 1  # else the block served now stays
    assert expected == (2 if floor == "accepting" else 1)

    result = _run(["forget", "--cancel", "req-1", "--store", url])
    assert result["rc"] == 0, result["err"]
    assert "run r1: released the rollback held for ['req-1']" in result["err"]
    assert result["heavy"] == []
    _, target = pointer_target(registry, "r1")
    assert target["holds"] == {"req-3": 3} and target["serve_block"] == expected
