"""Small Ray Tune sweeps complete with every trial's result in storage (issue 7)."""

from __future__ import annotations

import pytest

from flows.tune import SweepReport, describe, run_sweep, untrained_trials
from obliviate.errors import ConfigError
from obliviate.sweeps import pareto_front
from storage import ObjectStore


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_unlearning_sweep_stores_every_trial_and_a_report(local_ray, tmp_path) -> None:
    store_url = f"file://{tmp_path}"
    report = run_sweep(
        "unlearning",
        store_url=store_url,
        grid={"num_blocks": [6, 8], "epsilon": [0.1]},
        constants={
            "data": "digits",
            "model": "lenet5",
            "seed": 0,
            "num_deleted": 3,
            "train_size": 600,
            "heldout_size": 150,
            "local_epochs": 3,
            "schedule": "cosine",
        },
        workers=2,
        name="tiny-unlearning",
    )
    assert report.errors == 0
    store = ObjectStore(store_url)
    trials = store.list("tune/tiny-unlearning/trials")
    assert len(trials) == 2 and len(report.trials) == 2
    assert {t["num_blocks"] for t in report.trials} == {6, 8}
    for trial in report.trials:
        assert trial["speedup"] > 0 and 0.0 <= trial["consistency"] <= 1.0
        assert 0.0 <= trial["noise_floor_consistency"] <= 1.0
    assert report.front and all(0 <= i < 2 for i in report.front)
    assert store.get_bytes("tune/tiny-unlearning/plot.png").startswith(b"\x89PNG")
    assert "| B | ε |" in store.get_bytes("tune/tiny-unlearning/table.md").decode()
    assert all(t["chance_accuracy"] == pytest.approx(0.1) for t in report.trials)  # digits: 10 classes
    # Trials train with `obliviate train`'s recipe: the bare SGD defaults left them at chance here.
    assert all(t["naive_accuracy"] > 0.5 for t in report.trials), [t["naive_accuracy"] for t in report.trials]
    assert not untrained_trials(report.trials) and "warning" not in describe(report)


def test_a_sweep_whose_settings_do_not_train_is_flagged() -> None:
    trials = [
        {"num_blocks": 4, "naive_accuracy": 0.1, "chance_accuracy": 0.1},
        {
            "num_blocks": 8,
            "epsilon": 0.05,
            "speedup": 1.5,
            "consistency": 0.98,
            "noise_floor_consistency": 0.97,
            "accuracy": 0.9,
            "naive_accuracy": 0.91,
            "chance_accuracy": 0.1,
        },
        {"num_blocks": 4, "naive_accuracy": None, "chance_accuracy": 0.1},  # an errored trial
    ]
    assert untrained_trials(trials) == trials[:1]
    report = SweepReport("s", trials, [1], "file:///r", "file:///t", "file:///p", errors=1)
    text = describe(report)
    assert "warning: 1 of 3 trials trained a naive model near chance (held-out accuracy 10.0 %; chance 10 %)" in text
    assert "Raise --local-epochs or --train-size" in text
    # the front in words (it was a JSON dump cut at 400 characters)
    assert (
        "Pareto front (no trial does better on both):\n  B=8, ε=0.05: 1.50x faster than naive retraining, consistency "
        "0.980 (noise floor 0.970), held-out accuracy 90.0 %"
    ) in text
    assert "warning" not in describe(SweepReport("s", trials[1:2], [0], "r", "t", "p", errors=0))


@pytest.mark.slow
def test_reduction_sweep_reports_accuracy_against_queries(local_ray, tmp_path) -> None:
    report = run_sweep(
        "reduction",
        store_url=f"file://{tmp_path}",
        grid={"k": [20, 40], "bins": [256]},
        constants={
            "data": "digits",
            "model": "lenet5",
            "seed": 0,
            "target_size": 600,
            "pool_size": 400,
            "test_size": 300,
            "steps": 60,
            "num_starts": 5,
        },
        workers=2,
        name="tiny-reduction",
    )
    assert report.errors == 0
    assert sorted(t["queries"] for t in report.trials) == [20, 40]
    for trial in report.trials:
        assert 0.0 <= trial["accuracy"] <= 1.0 and sum(trial["class_histogram"]) == trial["queries"]
        # the target's own test accuracy is recorded, so a target near chance can be flagged
        assert 0.0 <= trial["target_accuracy"] <= 1.0 and trial["chance_accuracy"] == pytest.approx(0.1)
    assert len(ObjectStore(f"file://{tmp_path}").list("tune/tiny-reduction/trials")) == 2


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [{"a": 1, "b": 5}, {"a": 2, "b": 4}, {"a": 1, "b": 4}, {"a": 3, "b": 1}, {"a": 2, "b": 4}]
    assert pareto_front(points, maximize=("a", "b")) == [0, 1, 3, 4]


def test_unknown_sweep_kind_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="sweep kind must be one of unlearning, reduction; got 'speed'"):
        run_sweep("speed", store_url=f"file://{tmp_path}", grid={}, constants={}, workers=1)


@pytest.mark.parametrize(
    ("sweep", "option", "value", "rule"),
    [
        (
            "unlearning",
            "--blocks",
            "10,0",
            "--blocks (num_blocks) must be a positive integer; got 0. Pass another --blocks (default 10,20,40).",
        ),
        (
            "unlearning",
            "--blocks",
            "10,5000",
            (
                "every B (--blocks) must be at most the trial's training samples, train_size=2000 (a sample per "
                "block); got 5000. Lower --blocks or raise --train-size."
            ),
        ),
        (
            "unlearning",
            "--epsilons",
            "0.1,-1",
            "every epsilon (--epsilons, the stop rule's threshold) must be finite and > 0; got [-1.0]",
        ),
        ("unlearning", "--deleted", "0", "the samples deleted per trial (--deleted) must be in 1..train_size-1"),
        ("reduction", "--ks", "50,2000", "every k (--ks) must satisfy 2 <= k < pool_size=2000; got [2000]"),
        ("reduction", "--bins", "1", "--bins must be in 2..256; got 1."),
        # sizes given that do not fit mnist5k's 5,000 images with the others' defaults
        (
            "reduction",
            "--test-size",
            "1500",
            (
                "a trial splits the 5000 images of mnist5k into disjoint parts, so target_size 2000 + pool_size 2000 "
                "+ test_size 1500 = 5500 does not fit; lower them (--target-size, --pool-size, --test-size), e.g. in "
                "the same proportions: --target-size 1818 --pool-size 1818 --test-size 1363."
            ),
        ),
        ("unlearning", "--train-size", "4600", "train_size 4600 + heldout_size 500 = 5100 does not fit"),
        ("unlearning", "--heldout-size", "0", "must hold at least 1 image; got heldout_size 0"),
        ("unlearning", "--data", "nosuch", "nosuch"),
    ],
)
def test_a_grid_no_trial_could_run_is_refused_before_the_store_or_ray(tmp_path, capsys, sweep, option, value, rule):
    from flows.cli import main

    # these ran every trial into the same error and wrote an empty report (exit code 1)
    assert main(["tune", sweep, option, value, "--store", f"file://{tmp_path}/store"]) == 2
    assert rule in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_an_unknown_schedule_is_a_usage_error_of_its_option(tmp_path, capsys) -> None:
    """It was refused by the trial config, in its words: "schedule must be one of [...]; got 'linear'."."""
    from flows.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["tune", "unlearning", "--schedule", "linear", "--store", f"file://{tmp_path}/store"])
    assert stopped.value.code == 2
    assert "Invalid value for '--schedule': 'linear' is not one of 'constant', 'step'" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


def test_a_dataset_too_small_for_the_default_split_gets_it_scaled_down(tmp_path, capsys):
    """`tune unlearning --data digits` was refused with its defaults (2,000 + 500 of 1,797 images)."""
    from flows.cli import main

    assert main(["tune", "unlearning", "--data", "digits", "--deleted", "1437", "--store", f"file://{tmp_path}/s"]) == 2
    said = capsys.readouterr()
    assert (
        "digits holds 1,797 images, fewer than the default split's 2,500: train size 1,437, heldout size 359"
        in said.out
    )
    assert (
        "the samples deleted per trial (--deleted) must be in 1..train_size-1=1436" in said.err
    )  # the scaled sizes were used
    assert main(["tune", "reduction", "--data", "digits", "--ks", "718", "--store", f"file://{tmp_path}/s"]) == 2
    said = capsys.readouterr()
    assert (
        "target size 718, pool size 718, test size 359 (--target-size, --pool-size, --test-size choose others)"
        in said.out
    )
    assert "every k (--ks) must satisfy 2 <= k < pool_size=718; got [718]" in said.err


@pytest.mark.slow
def test_ctrl_c_stops_the_sweep_with_exit_130_and_no_report(tmp_path) -> None:
    """Tune catches SIGINT itself: the CLI exited 0 and wrote the 2 trials done as the whole sweep's report."""
    import glob
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "OBLIVIATE_STORE")}
    command = [sys.executable, "-m", "flows.cli", "tune", "unlearning", "--data", "digits", "--blocks", "2,20"]
    command += ["--epsilons", "0.1", "--train-size", "200", "--heldout-size", "50", "--deleted", "2", "--workers", "1"]
    command += ["--store", f"file://{tmp_path}/store", "--name", "stopped"]
    sweep = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not glob.glob(f"{tmp_path}/store/tune/stopped/trials/*.json") and sweep.poll() is None:
            assert time.monotonic() < deadline, "no trial finished in 240 s"
            time.sleep(0.2)
        os.killpg(sweep.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 130, err.decode()[-2000:]
    said = err.decode()
    assert "sweep stopped was interrupted after 1 of 2 trials; no report was written" in said
    assert "obliviate tune: interrupted." in said
    # Tune's own advice contradicted obliviate's (rerun the same command), and its FileNotFoundError read as a fault.
    assert "Resume experiment with" not in said and "Tuner.restore" not in said, said
    assert "Could not fetch metrics" not in said and "Failed to fetch metrics" not in said, said
    assert "trials, 0 errors" not in out.decode()
    for part in ("results.json", "table.md", "plot.png"):
        assert not (tmp_path / "store/tune/stopped" / part).exists(), part


@pytest.mark.slow
def test_a_name_keeps_its_settings_a_rerun_with_others_is_refused(local_ray, tmp_path, capsys) -> None:
    """A rerun of a name with other settings reported the old trials with the new grid."""
    from flows.cli import main

    store = ObjectStore(f"file://{tmp_path}/store")
    tiny = ["--data", "digits", "--target-size", "100", "--pool-size", "100", "--test-size", "50", "--steps", "5"]
    tiny += ["--starts", "1", "--bins", "256", "--workers", "1", "--name", "r", "--store", store.url]
    assert main(["tune", "reduction", "--ks", "5", *tiny]) == 0
    assert main(["tune", "reduction", "--ks", "6", *tiny[:9], "20", *tiny[10:]]) == 2
    err = capsys.readouterr().err
    assert "sweep name 'r' (--name) already holds a sweep with other settings (k [5] -> [6]; steps 5 -> 20)" in err
    assert [t["k"] for t in store.get_json("tune/r/results.json")["trials"]] == [5]  # the first report stands
    assert main(["tune", "reduction", "--ks", "5", *tiny]) == 0  # the same settings: the sweep runs again
    assert [t["k"] for t in store.get_json("tune/r/results.json")["trials"]] == [5]


def test_reduction_sweep_sweeps_gray_and_aggregate_as_reduce_offers_them(local_ray, tmp_path, capsys) -> None:
    """`tune reduction` had no --gray nor --aggregate: a sweep could neither vary nor fix what `reduce` offers."""
    import numpy as np

    from flows.cli import main
    from obliviate.data import load_dataset
    from obliviate.extraction.audit import audit_split, draw_split
    from obliviate.reduction.drmi import drmi_reduce
    from obliviate.reduction.mi import mi_matrix

    digits = load_dataset("digits")
    rng = np.random.default_rng(0)
    levels = digits.images[:300].astype(np.int64) * 15  # 0..240
    # colour whose luma and channel mean differ, so the gray mode changes the pool's MI
    colour = np.stack([levels, 255 - levels, rng.integers(0, 256, size=levels.shape)], axis=-1).astype(np.uint8)
    np.savez(tmp_path / "colour.npz", images=colour, labels=digits.labels[:300])
    data = str(tmp_path / "colour.npz")
    store = ObjectStore(f"file://{tmp_path}/store")
    sizes = ["--target-size", "100", "--pool-size", "60", "--test-size", "40", "--steps", "5", "--starts", "2"]
    argv = ["tune", "reduction", "--data", data, "--ks", "5", "--bins", "256", *sizes, "--workers", "1"]
    argv += ["--gray", "luma,mean", "--aggregate", "sum,max", "--name", "gs", "--store", store.url]
    assert main(argv) == 0
    out = capsys.readouterr().out

    def expected_h(gray: str, aggregate: str) -> float:
        """H of the trial's reduction, computed here with reduce's functions on the same pool."""
        images = load_dataset(data, gray=gray)
        train_idx, _, _ = draw_split(images.labels, train_size=100, pool_size=0, test_size=0, seed=0)
        pool_idx, _ = audit_split(images, exclude=train_idx.tolist(), pool_size=60, test_size=40, seed=0)
        matrix = mi_matrix(images.images[pool_idx], levels=images.levels, bins=256)
        return drmi_reduce(matrix, k=5, num_starts=2, rng=np.random.default_rng(0), aggregate=aggregate).h

    results = store.get_json("tune/gs/results.json")
    assert results["grid"]["gray"] == ["luma", "mean"] and results["grid"]["aggregate"] == ["sum", "max"]
    trials = {(t["gray"], t["aggregate"]): t for t in results["trials"]}
    assert sorted(trials) == [("luma", "max"), ("luma", "sum"), ("mean", "max"), ("mean", "sum")]
    for (gray, aggregate), trial in trials.items():
        assert trial["h"] == pytest.approx(expected_h(gray, aggregate), rel=1e-6), (gray, aggregate)
    assert expected_h("luma", "sum") != pytest.approx(
        expected_h("mean", "sum"), rel=1e-6
    )  # the test can tell them apart
    # each trial under its own name; luma/sum keeps the name it had before the switches existed
    assert sorted(store.list("tune/gs/trials")) == sorted(
        f"tune/gs/trials/k5-bins256{suffix}.json" for suffix in ("", "-gmax", "-graymean", "-graymean-gmax")
    )
    table = store.get_bytes("tune/gs/table.md").decode()
    assert "| k (queries) | bins | gray | aggregate |" in table and "| 5 | 256 | mean | max |" in table
    assert "k=5, 256 bins, gray" in out and ", aggregate " in out  # the front names both
    # Tune's hint named a Ray session folder the command deletes, for a TensorBoard this project does not install
    assert "TensorBoard" not in out, out
    logs = {path.name for path in (tmp_path / "store/tune-state/gs").glob("*/*")}
    assert {"progress.csv", "result.json"} <= logs and not [name for name in logs if "tfevents" in name], logs


def test_a_bad_gray_or_aggregate_is_refused_as_reduce_refuses_it(tmp_path, capsys) -> None:
    from flows.cli import main

    for option, value, shown in (("--gray", "luma,foo", "'foo'"), ("--aggregate", "max,avg", "'avg'")):
        rule = f"Invalid value for '{option}': {shown} is not one of "
        with pytest.raises(SystemExit) as refusal:
            main(["reduce", "--data", "digits", option, value.split(",")[1], "--store", f"file://{tmp_path}/r"])
        assert refusal.value.code == 2 and rule in capsys.readouterr().err  # what reduce says
        with pytest.raises(SystemExit) as refusal:
            main(["tune", "reduction", "--data", "digits", option, value, "--store", f"file://{tmp_path}/s"])
        assert refusal.value.code == 2 and rule in capsys.readouterr().err
    assert (
        main(["tune", "reduction", "--data", "digits", "--aggregate", "sum,sum", "--store", f"file://{tmp_path}/s"])
        == 2
    )
    assert "--aggregate lists sum twice; got 'sum,sum'. Give each value once." in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    # the Python API holds a grid to the same rule before the store or Ray
    constants = {"data": "digits", "model": "lenet5", "seed": 0, "target_size": 100, "pool_size": 60}
    constants.update(test_size=40, steps=5, num_starts=2)
    with pytest.raises(ConfigError, match=r"gray \(--gray\) must be one of \['luma', 'mean'\] .*; got 'foo'"):
        run_sweep(
            "reduction",
            store_url=f"file://{tmp_path}/s",
            grid={"k": [5], "bins": [256], "gray": ["foo"]},
            constants=constants,
            workers=1,
        )
    with pytest.raises(ConfigError, match=r"aggregate \(--aggregate\) must be one of \['sum', 'max'\] .*; got 'avg'"):
        run_sweep(
            "reduction",
            store_url=f"file://{tmp_path}/s",
            grid={"k": [5], "bins": [256]},
            constants={**constants, "aggregate": "avg"},
            workers=1,
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_sweep_whose_every_trial_failed_writes_no_report(local_ray, tmp_path, capsys) -> None:
    """All trials errored, yet results.json, table.md and plot.png were written as a finished sweep's report."""
    store = ObjectStore(f"file://{tmp_path}/store")
    grid = {"k": [5, 6], "bins": [256], "gray": ["luma"], "aggregate": ["sum"]}
    constants = {"data": "digits", "model": "lenet5", "seed": 0, "target_size": 100, "pool_size": 100}
    constants.update(test_size=50, steps=5, num_starts=1)
    store.put_json("tune/dead/sweep.json", {"kind": "reduction", "grid": grid, "constants": constants})
    store.put_bytes("tune/dead/trials", b"")  # a file where each trial's folder goes: every trial fails to store
    try:
        run_sweep("reduction", store_url=store.url, grid=grid, constants=constants, workers=1, name="dead")
        outcome: BaseException | None = None
    except Exception as failed:  # noqa: BLE001 -- the old code raised nothing; its report is what this checks first
        outcome = failed
    assert sorted(store.list("tune/dead")) == ["tune/dead/sweep.json", "tune/dead/trials"]  # no report
    assert type(outcome).__name__ == "SweepFailed", outcome
    said = str(outcome)
    assert said.startswith("sweep dead: all 2 trials failed, so no report was written") and "Error" in said, said
