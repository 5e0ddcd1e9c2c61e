"""No row whose erasure is requested is held out of a run planned after the request.

A run's held-out set is used for as long as it serves (block accuracies, the interim judge, verification), but
``plan_run`` drew it from every row of the dataset: a training started after a deletion request left the request's
ids out of its blocks, yet held out the ones the draw put there and kept evaluating on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from flows.train import planning_erasures, run_spec
from flows.unlearn import submit_deletion
from obliviate.data import load_dataset
from obliviate.errors import ConfigError
from obliviate.unlearning.service import RunSpec
from storage import ObjectStore
from storage.registry import RunRegistry

REPO = Path(__file__).resolve().parents[3]


def _plan(tiny_run, erased=(), **changes) -> RunSpec:
    return RunSpec.from_dict(run_spec(run_id="r", erased_ids=erased, **tiny_run(split_seed=3, **changes)))


def test_erased_held_out_rows_change_places_with_training_rows_of_their_class(tiny_run) -> None:
    plain = _plan(tiny_run)
    erased = [plain.heldout_ids[i] for i in (0, 7, 50)] + [plain.train_ids[i] for i in (2, 9)] + [1790]
    labels = load_dataset("digits").labels

    planned = _plan(tiny_run, erased)

    assert not set(planned.heldout_ids) & set(erased)
    assert len(planned.heldout_ids) == len(plain.heldout_ids) and len(planned.train_ids) == len(plain.train_ids)
    assert set(planned.train_ids) | set(planned.heldout_ids) == set(plain.train_ids) | set(plain.heldout_ids)
    assert Counter(labels[list(planned.heldout_ids)]) == Counter(labels[list(plain.heldout_ids)])
    kept = [i for i, was in zip(planned.heldout_ids, plain.heldout_ids, strict=True) if was not in erased]
    assert kept == [i for i in plain.heldout_ids if i not in erased]  # the rows not erased keep their places
    # ids outside the run (1790 was drawn in neither part) are not its business
    assert 1790 not in set(plain.train_ids) | set(plain.heldout_ids)
    assert planned.erased_at_planning == tuple(sorted(set(erased) - {1790}))
    assert _plan(tiny_run, erased) == planned  # the swap is seeded: planning again draws the same
    assert RunSpec.from_dict(planned.to_dict()) == planned
    assert "erased_at_planning" not in plain.to_dict()  # a spec stored before the field compares equal


def test_too_few_rows_not_erased_to_fill_the_held_out_set_is_refused_in_words(tiny_run) -> None:
    plain = _plan(tiny_run, train_size=20, heldout_size=20, blocks=2)
    erased = list(plain.train_ids) + list(plain.heldout_ids[:3])
    with pytest.raises(ConfigError, match=r"3 of the 20 held-out rows drawn are erased.*Lower --heldout-size"):
        _plan(tiny_run, erased, train_size=20, heldout_size=20, blocks=2)
    with pytest.raises(ConfigError, match="held-out set holds no row whose erasure was requested"):
        RunSpec.from_dict({**plain.to_dict(), "erased_at_planning": [plain.heldout_ids[0]]})


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, check=False, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_train_after_a_request_holds_none_of_its_ids_out_and_resumes_after_another(
    tmp_path: Path, tiny_run, prefect_api_url: str, ray_address: str
) -> None:
    url = f"file://{tmp_path}/runs"
    store = ObjectStore(url)
    store.ensure_container()
    options = {"blocks": 2, "train_size": 300, "heldout_size": 100, "split_seed": 0}
    plain = RunSpec.from_dict(run_spec(run_id="a", **tiny_run(**options)))
    erased = [plain.heldout_ids[i] for i in (1, 4, 20, 60)] + [plain.train_ids[i] for i in (5, 6)]
    first = submit_deletion(url, erased, dataset="digits", emit=False)["request_id"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "RAY_ADDRESS": ray_address}
    argv = ["train", "--store", url, "--run-id", "a", "--data", "digits", "--epochs", "1"]
    argv += ["--blocks", "2", "--train-size", "300", "--heldout-size", "100", "--split-seed", "0"]

    trained = _cli(*argv, env=env)

    assert trained.returncode == 0, trained.stderr[-3000:]
    spec = RunRegistry(store).spec("a")
    assert not set(spec.heldout_ids) & set(erased), sorted(set(spec.heldout_ids) & set(erased))
    assert spec.erased_at_planning == tuple(sorted(erased))
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["left_out_for_requests"] == [first] and summary["left_out_ids"] == len(erased), summary

    # a request on rows the run holds out now: the run stays the one it was planned as, and the same options
    # resume (return) it instead of being refused as another split
    later = [spec.heldout_ids[i] for i in (0, 2)]
    submit_deletion(url, later, dataset="digits", emit=False)
    assert planning_erasures(store, run_id="a", data="digits", shards=1) == frozenset(erased)
    again = _cli(*argv, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "another dataset split" not in again.stderr
    assert RunRegistry(store).spec("a") == spec
    # a run planned now leaves out both requests' rows
    assert planning_erasures(store, run_id="b", data="digits", shards=1) == frozenset(erased + later)
