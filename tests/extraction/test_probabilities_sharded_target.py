"""A sharded run (``train --shards S``) served as one model and audited with ``--target-output probabilities``.

The served model's rule is stated in :mod:`obliviate.unlearning.shards` and ``flows.model_server.RunBackend``: its
prediction is the argmax of the mean of the shards' softmax probabilities, so the probabilities it answers are that
mean. The thief must be sold those rows (not one shard's, not a vote's one-hot), each query logged as bought in
that mode, and ``obliviate steal`` must complete against it.

The server's backend is the real :class:`RunBackend`, subclassed only to keep a copy of what it answered.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BUDGET = 20
SHARDS = 2


@pytest.fixture(scope="module")
def sharded_store(prefect_and_ray, tmp_path_factory) -> str:
    """A store holding run ``g``: 2 shards of a tiny digits run (LeNet-5, 3 blocks of 1 epoch), trained by train_flow."""
    from flows.train import train_flow

    url = (tmp_path_factory.mktemp("store")).as_uri()
    train_flow(
        store=url,
        run_id="g",
        shards=SHARDS,
        data="digits",
        model="lenet5",
        blocks=3,
        epochs=1,
        batch_size=32,
        learning_rate=0.01,
        schedule="constant",
        train_size=400,
        heldout_size=200,
        seed=0,
        split_seed=0,
    )
    return url


def _shard_probabilities(store_url: str, images: np.ndarray) -> list[np.ndarray]:
    """Each shard's softmax rows (float64) for ``images``, computed from the shards' served checkpoints."""
    from obliviate.models import images_to_tensor
    from storage import ObjectStore
    from storage.registry import RunRegistry
    from storage.serving import group_members, served_model

    store = ObjectStore(store_url)
    registry = RunRegistry(store)
    members = group_members(store, "g")
    assert members is not None and len(members) == SHARDS
    levels = int(registry.spec(members[0]).config.levels)
    x = images_to_tensor(images, levels=levels)
    rows = []
    for member in members:
        model = served_model(registry, member)
        assert model is not None
        with torch.no_grad():
            rows.append(torch.softmax(model.eval()(x).double(), dim=1).numpy())
    return rows


def _digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


@pytest.fixture
def served(sharded_store):
    """Run ``g`` served as one model (what ``obliviate target serve --run g --probabilities`` starts), recording."""
    from flows.model_server import RunBackend, TargetServer
    from obliviate.extraction.target import OutputMode

    class RecordingRunBackend(RunBackend):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.answered: list[tuple[np.ndarray, OutputMode, np.ndarray]] = []

        def predict(self, images: np.ndarray, *, output: OutputMode) -> np.ndarray:
            answer = super().predict(images, output=output)
            self.answered.append((np.array(images, copy=True), OutputMode(output), np.array(answer, copy=True)))
            return answer

    backend = RecordingRunBackend(sharded_store, "g")
    with TargetServer(backend=backend, info=backend.spec_info, allow_probabilities=True) as server:
        yield server, backend


def test_a_sharded_target_answers_the_mean_of_its_shards_probabilities(sharded_store, served):
    from obliviate.data import load_dataset
    from obliviate.extraction.target import Target, open_backend

    server, backend = served
    assert backend.rule == "mean_probability" and len(backend.members) == SHARDS
    images = load_dataset("digits").images[:64]
    http, info = open_backend(server.url, retries=0, wait_s=0, output="probabilities")
    assert info["rule"] == "mean_probability"
    rows = Target(http, budget=64, output="probabilities", num_classes=10).query(images)
    labels = Target(http, budget=64, num_classes=10).query(images)

    shards = _shard_probabilities(sharded_store, images)
    mean = np.mean(shards, axis=0)
    assert rows.shape == (64, 10) and rows.dtype == np.float32
    np.testing.assert_allclose(rows, mean, atol=1e-6)
    # not one shard's rows: the shards disagree enough that either alone is far from what was answered
    assert min(np.abs(rows - shard).max() for shard in shards) > 1e-2
    # the served labels are the argmax of the same mean, so a label-only and a probabilities audit see one model
    assert np.array_equal(labels, mean.argmax(axis=1))


def test_steal_with_probabilities_completes_against_a_sharded_target_sold_its_mean_rows(
    sharded_store, served, tmp_path, capsys
):
    from flows.cli import main
    from obliviate.extraction.target import OutputMode

    server, backend = served
    out = tmp_path / "report"
    command = ["steal", "--target", server.url, "--target-output", "probabilities", "--out", str(out)]
    grid = ["--budgets", str(BUDGET), "--attackers", "basic", "--selectors", "random", "--seeds", "1"]
    sizes = ["--pool", "digits", "--pool-size", "120", "--test-size", "100", "--steps", "15", "--eps", "0.3"]
    assert main([*command, *grid, *sizes]) == 0, capsys.readouterr().err[-3000:]

    doc = json.loads((out / "steal.json").read_text())
    assert doc["config"]["target_output"] == "probabilities"
    assert doc["target_meta"]["rule"] == "mean_probability" and len(doc["target_meta"]["members"]) == SHARDS
    (cell,) = doc["cells"]
    assert cell["target_output"] == "probabilities" and cell["queries_used"] == BUDGET
    assert sum(cell["class_histogram"]) == BUDGET
    bought = [q for q in cell["queries"] if not q["refused"]]
    assert {q["output"] for q in cell["queries"]} == {"probabilities"}
    assert sum(q["size"] for q in bought) == BUDGET

    # What the server sold for those queries: each batch the log names, answered with the shards' mean rows.
    sold = [(images, answer) for images, mode, answer in backend.answered if mode is OutputMode.PROBABILITIES]
    by_digest = {_digest(images): (images, answer) for images, answer in sold}
    assert all(q["digest"] in by_digest for q in bought), (bought, list(by_digest))
    for q in bought:
        images, answer = by_digest[q["digest"]]
        assert answer.shape == (q["size"], 10)
        np.testing.assert_allclose(answer, np.mean(_shard_probabilities(sharded_store, images), axis=0), atol=1e-6)
