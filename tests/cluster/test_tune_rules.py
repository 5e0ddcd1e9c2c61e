"""`obliviate tune`'s option rules: a value no sweep could use is refused before Ray, a Prefect server or the store."""

from __future__ import annotations

import pytest

from flows.cli import main


def refused(tmp_path, capsys, *argv: str) -> str:
    """Run ``obliviate tune ARGV`` in-process; it must exit 2 with nothing written. Returns stderr."""
    assert main(["tune", *argv, "--store", f"file://{tmp_path}/store"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("obliviate tune: error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())  # no store, no Tune state beside it
    return err


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "", "sweep one", "/abs", ".tmp-x"])
def test_a_sweep_name_that_is_not_one_plain_folder_is_refused(tmp_path, capsys, name) -> None:
    """'../../escape' made Ray write its state outside the store before the store's key check refused it."""
    err = refused(tmp_path, capsys, "reduction", "--data", "digits", "--name", name)
    assert "a sweep name (--name) is letters, digits, '-', '_' and '.', not '.' or '..'" in err
    assert f"got {name!r}" in err


def test_a_plain_sweep_name_passes_the_name_rule(tmp_path, capsys) -> None:
    err = refused(tmp_path, capsys, "reduction", "--data", "digits", "--name", "k-sweep_2.b", "--bins", "1")
    assert "--bins must be in 2..256; got 1" in err  # the name passed; the next rule refused


@pytest.mark.parametrize(
    ("sweep", "option", "value", "rule"),
    [
        # these two failed inside every trial: a Ray traceback, "0 trials, 1 errors", an empty report, exit 1
        (
            "reduction",
            "--steps",
            "0",
            "steps (--steps, the target's and each substitute's gradient steps) must be >= 1",
        ),
        (
            "reduction",
            "--starts",
            "0",
            "num_starts (--starts, seeded DRMI restarts, each from a pool image) must be in",
        ),
        ("reduction", "--starts", "800", "must be in 1..pool_size=718; got 800"),
        ("reduction", "--seed", "-1", "the seed (--seed) must be an integer >= 0"),
        ("unlearning", "--seed", "-1", "the seed (--seed) must be an integer >= 0"),
        (
            "unlearning",
            "--epsilons",
            "inf",
            "every epsilon (--epsilons, the stop rule's threshold) must be finite and > 0; got [inf]",
        ),
        ("unlearning", "--epsilons", "nan", "must be finite and > 0; got [nan]"),
        (
            "unlearning",
            "--local-epochs",
            "0",
            "--local-epochs must be a positive integer; got 0. Pass another --local-epochs (default 1).",
        ),
        ("unlearning", "--workers", "0", "workers (--workers, trials at once, one CPU each) must be >= 1; got 0"),
        ("reduction", "--workers", "-2", "must be >= 1; got -2"),
    ],
)
def test_every_numeric_option_is_checked_before_ray(tmp_path, capsys, sweep, option, value, rule) -> None:
    err = refused(tmp_path, capsys, sweep, "--data", "digits", option, value)
    assert rule in err


@pytest.mark.parametrize(
    ("sweep", "option", "value", "rule"),
    [
        # each ran both trials into one result file: '--blocks 2,2' ran 4 trials and the report kept 2
        ("unlearning", "--blocks", "2,2", "--blocks lists 2 twice; got '2,2'. Give each value once."),
        ("unlearning", "--epsilons", "0.1,0.05,0.1", "--epsilons lists 0.1 twice; got '0.1,0.05,0.1'."),
        ("unlearning", "--epsilons", "0.1,0.1000001", "--epsilons lists 0.1 as 0.1 and 0.1000001, which name the same"),
        ("reduction", "--ks", "5,5", "--ks lists 5 twice; got '5,5'."),
        ("reduction", "--bins", "16,256,16", "--bins lists 16 twice"),
    ],
)
def test_a_value_listed_twice_is_refused(tmp_path, capsys, sweep, option, value, rule) -> None:
    assert rule in refused(tmp_path, capsys, sweep, "--data", "digits", option, value)


def test_more_workers_than_a_local_runtime_has_cpus_is_refused_as_reduce_does(tmp_path, capsys, monkeypatch) -> None:
    """`tune --workers 64` ran on a 2-CPU machine with no note while `reduce --workers 64` was refused."""
    import os

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = os.cpu_count() or 1
    err = refused(tmp_path, capsys, "unlearning", "--data", "digits", "--workers", str(cpus + 1))
    assert (
        f"--workers {cpus + 1} needs {cpus + 1} CPUs (one per trial), but the local Ray runtime this command starts has "
        f"this machine's {cpus}; lower --workers to at most {cpus}, or join a cluster with RAY_ADDRESS."
    ) in err


@pytest.mark.parametrize("sweep", ["unlearning", "reduction"])
def test_help_lists_every_model_a_trial_can_build(capsys, sweep) -> None:
    """The help said 'lenet5 or c3f2' while resnet18 ran and the error listed all three."""
    from flows.cli.tune import MODELS
    from obliviate.models import MODEL_BUILDERS

    assert MODELS == tuple(MODEL_BUILDERS)
    with pytest.raises(SystemExit):
        main(["tune", sweep, "--help"])
    assert "--model {lenet5,c3f2,resnet18}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refusal:
        main(["tune", sweep, "--model", "vgg"])
    assert refusal.value.code == 2
    err = capsys.readouterr().err
    assert "Invalid value for '--model': 'vgg' is not one of " in err and "resnet18" in err


def test_a_name_holding_trials_of_unrecorded_settings_is_refused_before_ray(tmp_path, capsys) -> None:
    """A rerun under a used name mixed the old trials (other B, train size, epochs) into the new report."""
    import ray

    from storage import ObjectStore

    store = ObjectStore(f"file://{tmp_path}/store")
    store.put_json("tune/s1/trials/B2-eps0.1.json", {"num_blocks": 2, "epsilon": 0.1})  # what a sweep left before
    argv = ["tune", "unlearning", "--data", "digits", "--blocks", "3", "--name", "s1", "--store", store.url]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "sweep name 's1' (--name) already holds trials of a sweep whose settings were not recorded, and its report "
        f"would mix them with this one's; choose another --name, or delete {store.uri('tune/s1')} to replace it."
    ) in err
    assert not ray.is_initialized()
    assert store.list("tune/s1") == ["tune/s1/trials/B2-eps0.1.json"]  # nothing recorded, nothing removed


def test_the_sizes_not_given_follow_the_helps_rule_for_the_dataset(tmp_path, capsys) -> None:
    """Giving one size put the others back to 2,000/500/1,000, which digits' 1,797 images cannot hold."""
    assert main(["tune", "reduction", "--data", "digits", "--pool-size", "100", "--store", f"file://{tmp_path}/s"]) == 2
    said = capsys.readouterr()
    assert "does not fit" not in said.err  # it was: target_size 2000 + pool_size 100 + test_size 1000 = 3100
    assert (
        "every k (--ks) must satisfy 2 <= k < pool_size=100; got [150, 300]" in said.err
    )  # sizes passed; the ks did not
    assert "target size 718, test size 359 (--target-size, --test-size choose others)" in said.out
    assert not list(tmp_path.iterdir())
    err = refused(tmp_path, capsys, "unlearning", "--data", "digits", "--train-size", "1400", "--deleted", "1400")
    assert "does not fit" not in err  # it was: train_size 1400 + heldout_size 500 = 1900 (1/5 of digits is 359)
    assert "the samples deleted per trial (--deleted) must be in 1..train_size-1=1399; got 1400" in err


def test_a_trial_slower_than_naive_retraining_is_called_slower() -> None:
    """The front read '0.84x faster than naive retraining' for a trial that took longer than retraining."""
    from flows.tune import SweepReport, describe

    trial = {"num_blocks": 4, "epsilon": 0.1, "speedup": 0.84, "consistency": 0.99, "noise_floor_consistency": 0.9}
    trial.update(accuracy=0.9, naive_accuracy=0.9, chance_accuracy=0.1)
    faster = {**trial, "num_blocks": 8, "speedup": 1.5}
    text = describe(SweepReport("s", [trial, faster], [0, 1], "r", "t", "p", errors=0))
    assert "B=4, ε=0.1: 1.19x slower than naive retraining, consistency 0.990" in text
    assert "B=8, ε=0.1: 1.50x faster than naive retraining" in text
    assert "0.84x faster" not in text


def test_a_reduction_sweep_whose_target_is_near_chance_is_flagged() -> None:
    """'agreement 100.0 %' against a target at chance (10 %) came with no warning."""
    from flows.tune import SweepReport, describe

    chance = {"k": 5, "queries": 5, "bins": 256, "accuracy": 0.1, "agreement": 1.0, "mean_entropy": 1.0}
    chance.update(target_accuracy=0.1, chance_accuracy=0.1)
    trained = {**chance, "k": 10, "queries": 10, "accuracy": 0.7, "agreement": 0.75, "target_accuracy": 0.9}
    text = describe(SweepReport("small", [chance, trained], [0, 1], "r", "t", "p", errors=0))
    assert "k=5, 256 bins: substitute accuracy 10.0 %, agreement 100.0 % (target 10.0 %)" in text
    assert (
        "warning: 1 of 2 trials trained a target near chance (test accuracy 10.0 %; chance 10 %): a substitute agrees "
        "with its noise, so their agreement says nothing. Raise --steps or --target-size."
    ) in text
    assert "warning" not in describe(SweepReport("ok", [trained], [0], "r", "t", "p", errors=0))


def test_a_reduction_sweep_recorded_before_gray_and_aggregate_runs_again_under_its_name(tmp_path) -> None:
    """A name recorded without gray and aggregate ran at luma and sum: the same command still matches it."""
    from flows.tune import _claim_name
    from obliviate.errors import ConfigError
    from storage import ObjectStore

    store = ObjectStore(f"file://{tmp_path}/store")
    constants = {"data": "digits", "seed": 0}
    store.put_json("tune/old/sweep.json", {"kind": "reduction", "grid": {"k": [5]}, "constants": constants})
    now = {"kind": "reduction", "grid": {"k": [5], "gray": ["luma"], "aggregate": ["sum"]}, "constants": constants}
    _claim_name(store, "tune/old", "old", now)  # not refused
    with pytest.raises(ConfigError, match=r"other settings \(aggregate \['sum'\] -> \['max'\]\)"):
        _claim_name(store, "tune/old", "old", {**now, "grid": {**now["grid"], "aggregate": ["max"]}})


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_cluster_that_does_not_answer_is_refused_before_the_store_is_touched(tmp_path, capsys, monkeypatch) -> None:
    """RAY_ADDRESS where nothing answered: exit 2, yet tune/<name>/sweep.json was written and locked the name."""
    import ray

    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    err = refused(tmp_path, capsys, "reduction", "--data", "digits", "--ks", "5", "--bins", "256", "--name", "zz")
    assert f"no Ray cluster answers at {address}" in err
    assert not ray.is_initialized()


def test_a_sweep_refused_by_ray_records_nothing_under_its_name(tmp_path, monkeypatch) -> None:
    """run_sweep recorded the name's settings before it joined Ray: the retry with other values was refused."""
    import ray

    from flows.tune import run_sweep
    from obliviate.errors import ConfigError
    from storage import ObjectStore

    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    store = ObjectStore(f"file://{tmp_path}/store")
    store.ensure_container()
    constants = {"data": "digits", "model": "lenet5", "seed": 0, "target_size": 100, "pool_size": 100}
    constants.update(test_size=50, steps=5, num_starts=1)
    with pytest.raises(ConfigError, match="no Ray cluster answers at"):
        run_sweep(
            "reduction", store_url=store.url, grid={"k": [5], "bins": [256]}, constants=constants, workers=1, name="zz"
        )
    assert store.list("tune") == []  # the name is free for the retry, with any values


@pytest.mark.parametrize("kind", ["reduction", "unlearning"])
def test_a_trial_on_a_node_without_the_sweeps_store_stops_before_its_work_and_says_why(tmp_path, kind) -> None:
    """A trial on a node whose folder at the store's URL is another one ran its whole trial and wrote its result
    there, where the sweep never reads it; the sweep then reported without it."""
    from flows.tune import reduction_trainable, unlearning_trainable
    from storage import ObjectStore
    from storage.errors import StoreNotShared

    node = ObjectStore(f"file://{tmp_path}/other-node/store")  # the sweep recorded tune/s1/sweep.json in its own
    config = {"store_url": node.url, "prefix": "tune/s1", "data": "digits", "model": "lenet5", "seed": 0}
    if kind == "reduction":
        config.update(k=5, bins=256, target_size=100, pool_size=100, test_size=50, steps=5, num_starts=1)
        trainable, label = reduction_trainable, "k5-bins256"
    else:
        config.update(num_blocks=2, epsilon=0.1, local_epochs=1, schedule="constant", num_deleted=1)
        config.update(train_size=100, heldout_size=50)
        trainable, label = unlearning_trainable, "B2-eps0.1"

    with pytest.raises(StoreNotShared) as raised:
        trainable(config)

    said = str(raised.value)
    assert said.startswith(f"the sweep's settings {node.uri('tune/s1/sweep.json')} is not in the store as this"), said
    assert "a folder every node mounts at the same path (NFS, EFS)" in said, said
    assert said.endswith(f"; trial {label} stopped without writing"), said
    assert not (tmp_path / "other-node").exists()  # nothing written there
