"""The HTTP model server serves what a run serves now: sharded runs (mean of probabilities) and
interim versions the moment they are published (issue 11)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from actors.chains import ChainWorker
from flows.batching import batch_gate, save_policy
from flows.model_server import RunBackend, TargetServer
from flows.rollback import save_rollback
from flows.train import run_spec
from flows.verify import chain_of
from obliviate.data import load_dataset
from obliviate.extraction.target import HttpBackend, OutputMode
from obliviate.models import images_to_tensor
from obliviate.unlearning.batching import DAY_S, BatchPolicy
from obliviate.unlearning.plan import BlockPlan
from obliviate.unlearning.shards import predict_shards
from storage import ObjectStore
from storage.ledger import DeletionLedger

pytestmark = pytest.mark.slow


def test_a_sharded_run_is_served_as_the_mean_of_its_shards_and_follows_each_rollback(tmp_path, tiny_run) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = ObjectStore(url)
    store.ensure_container()
    specs = [run_spec(run_id="g", shards=2, shard=k, **tiny_run(blocks=3, split_seed=0)) for k in range(2)]
    for spec in specs:
        ChainWorker(url).train(spec)
    store.put_json("groups/g.json", {"run_id": "g", "members": ["g-s0of2", "g-s1of2"], "rule": "mean_probability"})
    save_policy(store, BatchPolicy(window_s=DAY_S))
    save_rollback(store, enabled=True, floor_points=100.0)
    chains = [chain_of(url, s["run_id"]) for s in specs]
    data = load_dataset("digits")
    images = data.images[list(specs[0]["heldout_ids"])[:60]]
    x = images_to_tensor(images, levels=data.levels)

    def ids_in(shard: int, block: int) -> list[int]:
        plan = BlockPlan.from_dict(store.get_json(f"runs/{specs[shard]['run_id']}/plan.json"))
        return [int(specs[shard]["train_ids"][p]) for p in plan.block_ids(block)[:2]]

    ledger = DeletionLedger(store)
    with TargetServer(backend=RunBackend(url, "g", refresh_s=0.0), info={"run": "g"}) as server:
        remote = HttpBackend(server.url, timeout_s=30, retries=0)
        labels = remote.predict(images, output=OutputMode.LABELS)
        np.testing.assert_array_equal(labels, predict_shards([c.model() for c in chains], x=x).numpy())
        # shard 0 rolls back to M_1 (ids in its block 2): served at once, shard 1 unchanged
        ledger.append(request_id="r0", ids=ids_in(0, 2), dataset="digits", reason=None)
        batch_gate(store, ledger.open_entries(stale_after_s=600.0))
        labels = remote.predict(images, output=OutputMode.LABELS)
        np.testing.assert_array_equal(labels, predict_shards([chains[0].model(1), chains[1].model()], x=x).numpy())
        # shard 1 pauses (ids in its block 1): it leaves the vote
        ledger.append(request_id="r1", ids=ids_in(1, 1), dataset="digits", reason=None)
        batch_gate(store, ledger.open_entries(stale_after_s=600.0))
        labels = remote.predict(images, output=OutputMode.LABELS)
        np.testing.assert_array_equal(labels, predict_shards([chains[0].model(1)], x=x).numpy())
        with urllib.request.urlopen(server.url.replace("/predict", "/info"), timeout=10) as reply:
            served = json.loads(reply.read())["served"]
        assert served["g-s0of2"]["in_vote"] and not served["g-s1of2"]["in_vote"]
        # which checkpoint each shard serves: shard 0 rolled back to M_1, shard 1 paused (it was not said)
        assert served["g-s0of2"]["serve_block"] == 1 and served["g-s1of2"]["serve_block"] is None
        # shard 0 would have to pause too: no shard would vote, so that interim is not publishable (issue 11:
        # the group is judged as one model); nothing is published, the batch flushes now and r2 waits for it.
        # Both shards are hit in their block 1, so the reason is that no earlier model exists, not the floor
        ledger.append(request_id="r2", ids=ids_in(0, 1), dataset="digits", reason=None)
        gate = batch_gate(store, ledger.open_entries(stale_after_s=600.0))
        assert gate["flush"] and gate["reason"] == "rollback_no_earlier_model"
        assert not store.exists("ledger/forgotten/r2.json") and store.exists("ledger/forgotten/r1.json")
        labels = remote.predict(images, output=OutputMode.LABELS)
        np.testing.assert_array_equal(labels, predict_shards([chains[0].model(1)], x=x).numpy())
        # the retrain of shard 1 lands: it votes again, next to shard 0's M_1
        ChainWorker(url).unlearn("g-s1of2", {"r1": ids_in(1, 1)})
        labels = remote.predict(images, output=OutputMode.LABELS)
        expected = predict_shards([chains[0].model(1), chain_of(url, "g-s1of2").model()], x=x).numpy()
        np.testing.assert_array_equal(labels, expected)
        # /info listed the forgotten ids as training data long after the retrain forgot them
        with urllib.request.urlopen(server.url.replace("/predict", "/info"), timeout=10) as reply:
            info = json.loads(reply.read())
        assert info["forgotten_ids"] == 2 and not set(ids_in(1, 1)) & set(info["train_indices"])
        assert info["served"]["g-s1of2"]["serve_block"] == "final"  # its exact retrain landed
        assert set(ids_in(0, 3)) <= set(info["train_indices"])


def test_an_empty_batch_gets_an_empty_answer_under_the_same_key_from_a_run_server(tmp_path, tiny_run) -> None:
    """A batching client's empty batch is valid input: 200 and no answers, whatever its (H, W), with no model call.

    [0, 0, 0] (an empty array built without the image size) got HTTP 400 'the target takes 8x8 images; got 0x0'.
    """
    import base64

    url = f"file://{tmp_path / 'store'}"
    ObjectStore(url).ensure_container()
    ChainWorker(url).train(run_spec(run_id="r", **tiny_run(blocks=2, split_seed=0)))
    backend = RunBackend(url, "r", refresh_s=0.0)

    def post(server: TargetServer, shape: list[int], output: str) -> tuple[int, dict]:
        raw = bytes(int(np.prod(shape)))
        body = {"shape": shape, "dtype": "uint8", "data": base64.b64encode(raw).decode(), "output": output}
        request = urllib.request.Request(server.url, data=json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    # as `obliviate target serve --run r --probabilities` starts it
    with TargetServer(backend=backend, info=backend.spec_info, allow_probabilities=True) as server:
        assert server.image_size == 8
        for output in ("labels", "probabilities"):
            code, full = post(server, [2, 8, 8], output)
            assert code == 200 and len(full[output]) == 2
            answered = server.requests
            for shape in ([0, 8, 8], [0, 0, 0], [0, 28, 28]):
                code, empty = post(server, shape, output)
                assert (code, empty) == (200, {output: []}), (shape, output)
                assert set(empty) == set(full)  # the keys of a non-empty answer
            assert server.requests == answered  # no model call for no images
        code, reply = post(server, [0], "labels")  # not (n, H, W): still malformed
        assert code == 400 and "shape (n, H, W)" in reply["error"]
        code, reply = post(server, [1, 28, 28], "labels")  # a real image of the wrong size: still refused
        assert code == 400 and "the target takes 8x8 images; got 28x28" in reply["error"]
        labels = HttpBackend(server.url, timeout_s=30, retries=0).predict(
            np.zeros((0, 8, 8), np.uint8), output=OutputMode.LABELS
        )
        assert labels.shape == (0,)
        # GET /info declares the run's classes, so an empty batch's probabilities are (0, C) like a full batch's
        client = HttpBackend(server.url, timeout_s=30, retries=0)
        full = client.predict(np.zeros((2, 8, 8), np.uint8), output=OutputMode.PROBABILITIES)
        empty = client.predict(np.zeros((0, 8, 8), np.uint8), output=OutputMode.PROBABILITIES)
        assert empty.shape == (0, full.shape[1]) == (0, backend.spec_info["num_classes"])
        assert empty.dtype == full.dtype
