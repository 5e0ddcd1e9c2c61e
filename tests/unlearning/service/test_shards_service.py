"""`train --shards S` plans S ordinary runs on disjoint stratified shards (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest

from flows.train import run_spec, shard_run_ids
from obliviate.data import load_dataset
from obliviate.errors import ConfigError


def test_shards_are_disjoint_stratified_cover_the_split_and_share_the_heldout_set(tiny_run) -> None:
    whole = run_spec(run_id="g", **tiny_run(split_seed=0))
    parts = [run_spec(run_id="g", shards=2, shard=k, **tiny_run(split_seed=0)) for k in range(2)]
    assert [p["run_id"] for p in parts] == shard_run_ids("g", 2) == ["g-s0of2", "g-s1of2"]
    assert not set(parts[0]["train_ids"]) & set(parts[1]["train_ids"])
    assert sorted(parts[0]["train_ids"] + parts[1]["train_ids"]) == sorted(whole["train_ids"])
    assert parts[0]["heldout_ids"] == parts[1]["heldout_ids"] == whole["heldout_ids"]
    labels = load_dataset("digits").labels
    counts = [np.bincount(labels[p["train_ids"]], minlength=10) for p in parts]
    assert np.abs(counts[0] - counts[1]).max() <= 1


def test_a_shard_count_that_cannot_train_is_refused_before_any_actor_starts(tiny_run) -> None:
    with pytest.raises(ConfigError, match="must be >= 1; got 0"):
        run_spec(run_id="g", shards=0, **tiny_run(split_seed=0))  # was trained as one unsharded chain
    # 400 samples in 150 shards leave 2 or 3 per shard, fewer than the 4 blocks each shard chain has
    with pytest.raises(ConfigError, match="leave 2 per shard, fewer than --blocks 4"):
        run_spec(run_id="g", shards=150, shard=0, **tiny_run(split_seed=0))
    assert len(run_spec(run_id="g", shards=100, shard=99, **tiny_run(split_seed=0))["train_ids"]) == 4


def test_more_shards_than_cluster_cpus_train_and_a_run_id_keeps_its_shape(
    tmp_path, tiny_run, prefect_api_url, ray_address
) -> None:
    from flows.train import accuracy_text, train_flow
    from storage import ObjectStore
    from storage.registry import RunRegistry

    url = f"file://{tmp_path}/store"
    options = tiny_run(split_seed=0)
    options.pop("split_seed")
    from flows.progress import progress_to

    events: list[tuple[str, int, int]] = []
    # 3 shards on the session's 2-CPU Ray: one actor per shard used to wait forever for a third CPU
    with progress_to(lambda stage, done, total: events.append((stage, done, total))):
        summary = train_flow(store=url, run_id="g3", shards=3, split_seed=0, **options)
    # progress in blocks committed, over every shard (train said nothing until the end)
    assert events[-1] == ("blocks", 12, 12) and all(total == 12 for _, _, total in events)
    assert [done for _, done, _ in events] == sorted(done for _, done, _ in events)
    assert summary["group"]["members"] == ["g3-s0of3", "g3-s1of3", "g3-s2of3"]
    registry = RunRegistry(ObjectStore(url))
    assert all(registry.current(m).version == 1 for m in summary["group"]["members"])
    assert summary["version"] == [1, 1, 1] and summary["status"] == "trained"
    assert summary["trained_blocks"] == 3 * options["blocks"] == sum(s["trained_blocks"] for s in summary["shards"])
    assert (
        accuracy_text(summary["heldout_accuracy"])
        == "per shard " + " / ".join(f"{100 * s['heldout_accuracy']:.1f}" for s in summary["shards"]) + " %"
    )
    assert accuracy_text(0.8766) == "87.7 %" and accuracy_text(None) == "unknown"
    # the JSON said one shard's num_train, and nothing said what the shards score as the one model served
    assert summary["num_train"] == options["train_size"] == sum(s["num_train"] for s in summary["shards"])
    # and shard 0's timings as the group's
    assert summary["train_seconds"] == pytest.approx(sum(s["train_seconds"] for s in summary["shards"]))
    assert summary["wall_seconds"] == max(s["wall_seconds"] for s in summary["shards"])
    from flows.model_server import RunBackend
    from obliviate.data import load_dataset
    from obliviate.extraction.target import OutputMode

    heldout = list(registry.spec("g3-s0of3").heldout_ids)
    digits = load_dataset("digits")
    served = RunBackend(url, "g3").predict(digits.images[heldout], output=OutputMode.LABELS)
    assert summary["served_heldout_accuracy"] == pytest.approx(float((served == digits.labels[heldout]).mean()))
    with pytest.raises(
        ConfigError, match=r"already trained as 3 shards \(g3-s0of3, g3-s1of3, g3-s2of3\); this asks for 2"
    ):
        train_flow(store=url, run_id="g3", shards=2, split_seed=0, **options)
    with pytest.raises(ConfigError, match="this asks for a single chain"):
        train_flow(store=url, run_id="g3", split_seed=0, **options)
    train_flow(store=url, run_id="one", split_seed=0, **options)
    with pytest.raises(ConfigError, match="'one' is already trained as a single chain; this asks for 2 shards"):
        train_flow(store=url, run_id="one", shards=2, split_seed=0, **options)
    assert not ObjectStore(url).exists("groups/one.json") and registry.current("one-s0of2") is None


def test_a_sharded_runs_summary_counts_the_deletions_of_every_shard(
    tmp_path, tiny_run, prefect_api_url, ray_address
) -> None:
    from flows.train import train_flow
    from flows.unlearn import submit_deletion
    from storage import ObjectStore

    url = f"file://{tmp_path}/store"
    ObjectStore(url).ensure_container()
    options = tiny_run(split_seed=0)
    shard_ids = [run_spec(run_id="g", shards=2, shard=k, **options)["train_ids"] for k in range(2)]
    only_0 = submit_deletion(url, [shard_ids[0][5]], dataset="digits", emit=False)["request_id"]
    only_1 = submit_deletion(url, [shard_ids[1][7], shard_ids[1][9]], dataset="digits", emit=False)["request_id"]
    both = submit_deletion(url, [shard_ids[0][11], shard_ids[1][13]], dataset="digits", emit=False)["request_id"]
    options.pop("split_seed")
    summary = train_flow(store=url, run_id="g", shards=2, split_seed=0, **options)
    first, second = summary["shards"]
    assert (first["left_out_ids"], second["left_out_ids"]) == (2, 3)
    assert first["left_out_for_requests"] == sorted([only_0, both])
    # the run's summary said shard 0's 2 ids for 2 requests: only_1 looked ignored
    assert summary["left_out_ids"] == 5
    assert summary["left_out_for_requests"] == sorted([only_0, only_1, both])
    assert summary["late_requests"] == []


def test_a_sharded_runs_summary_says_each_shards_version_not_shard_0s_as_the_runs() -> None:
    from flows.train import group_summary, version_text

    unlearned = {  # shard 0 retrained by a deletion: its accuracy before that is its own
        "run_id": "g-s0of2",
        "version": 2,
        "status": "already_trained",
        "heldout_accuracy": 0.207,
        "previous_heldout_accuracy": 0.21,
        "unlearn_seconds": 0.08,
        "num_blocks": 3,
        "num_train": 749,
        "train_seconds": 0.09,
    }
    untouched = {"run_id": "g-s1of2", "version": 1, "status": "already_trained", "heldout_accuracy": 0.42}
    untouched |= {"num_blocks": 3, "num_train": 748, "train_seconds": 0.1, "sharp_drops": []}
    summary = group_summary("g", [unlearned, untouched])
    # train's line said "run g: version 2" and the JSON held shard 0's accuracy before unlearning as the run's
    assert summary["version"] == [2, 1] and version_text(summary["version"]) == "versions per shard 2 / 1"
    assert "previous_heldout_accuracy" not in summary and "unlearn_seconds" not in summary
    assert summary["shards"] == [unlearned, untouched] and summary["heldout_accuracy"] == [0.207, 0.42]
    assert summary["status"] == "already_trained" and summary["num_train"] == 1497
    resumed = {**untouched, "status": "trained", "trained_blocks": 2, "resumed_blocks": 1}
    assert group_summary("g", [unlearned, resumed])["status"] == "trained"  # this command trained shard 1
    assert version_text(3) == "version 3" and version_text([None, 1]) == "versions per shard ? / 1"


def test_sharp_drops_and_late_requests_of_every_shard_reach_the_runs_summary_naming_their_shard() -> None:
    from flows.train import deletions_over_shards

    drop = "block 2: held-out accuracy 22.7 % is 6.3 points below the best before it (29.0 %); ..."
    shards = [
        {"run_id": "g-s0of2", "left_out_ids": 0, "left_out_for_requests": [], "late_requests": ["r2"]},
        {
            "run_id": "g-s1of2",
            "left_out_ids": 1,
            "left_out_for_requests": ["r1"],
            "late_requests": ["r2", "r0"],
            "sharp_drops": [drop],
        },
    ]
    assert deletions_over_shards(shards) == {
        "left_out_ids": 1,
        "left_out_for_requests": ["r1"],
        "late_requests": ["r0", "r2"],
        "sharp_drops": [f"shard 1 (g-s1of2): {drop}"],
    }
    # shards resumed as already trained report no ids left out: none is invented
    assert deletions_over_shards([{"run_id": "g-s0of2", "sharp_drops": []}]) == {"sharp_drops": []}
