"""A shard's replay on a node that does not see the driver's store says so, not "train it first".

``verify`` of a sharded run replays each shard in a Ray task (:func:`flows.verify.verify_shards`), which may run
on any node. On a node whose ``file://`` folder at the store's URL is another (or which reaches another S3 endpoint
or bucket) the shard had no version, and the replay said "run 'g.s0' has no published version in ...; train it
first": the user was sent to train a run that is published.
"""

from __future__ import annotations

import uuid

import pytest

from actors.chains import ChainWorker
from flows.train import run_spec
from flows.verify import replay_shard
from obliviate.errors import ConfigError
from storage import ObjectStore
from storage.errors import StoreNotShared
from storage.registry import RunRegistry


def test_a_replay_on_a_node_without_the_drivers_store_says_the_store_is_not_shared(any_store, tiny_run, tmp_path):
    store = ObjectStore(any_store)
    spec = run_spec(run_id="r1", split_seed=0, **tiny_run(blocks=2, train_size=200, heldout_size=100))
    ChainWorker(store.url).train(spec)
    if store.is_local:
        node = ObjectStore(f"file://{tmp_path}/other-node/store")
    else:
        node = ObjectStore(f"s3://node-{uuid.uuid4().hex[:10]}/runs")
        node.ensure_container()

    with pytest.raises(StoreNotShared) as raised:
        replay_shard(node.url, "r1", published=["r1", "r2"], blocks="1")

    said = str(raised.value)
    pointer = node.uri(RunRegistry(node).pointer_key("r1"))
    assert said.startswith(f"the version pointer {pointer} of shard r1 is not in the store as this process"), said
    assert "is not the one the verify command found it published in" in said and "train it first" not in said
    assert ("a folder every node mounts at the same path (NFS, EFS)" if node.is_local else "AWS_ENDPOINT_URL") in said
    assert said.endswith("; the replay of r1 stopped without writing"), said
    assert node.list("") == [] and not (tmp_path / "other-node").exists()  # no report written there
    # On the command's store a shard gone since (its folder deleted by hand) is verify's own refusal, as before.
    with pytest.raises(ConfigError, match="run 'r9' has no published version"):
        replay_shard(store.url, "r9", published=["r1", "r9"], blocks="1")
    # There the same call replays the block and records its verdict.
    report = replay_shard(store.url, "r1", published=["r1"], blocks="1")
    assert report["status"] == "passed", report
