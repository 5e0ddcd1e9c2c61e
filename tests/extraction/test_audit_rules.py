"""Rules of the extraction audit's CLI and report, checked without running an audit: the split a target
declares, the grid's options, the headline, the pool's labels, the report's files (and its artifact, on the
module's Prefect test server)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from obliviate.data import load_dataset
from obliviate.extraction.audit import draw_split
from tests.prefect_artifacts import artifacts_mentioning


def test_target_train_on_mnist5k_keeps_the_benchs_split_and_only_it_is_called_so(tmp_path, capsys):
    """`target train --data mnist5k` trained on 1,666 images (a third of 5,000) while steal.md said
    "(the bench's split)", whose target trains on 2,000: the default now draws the bench's split."""
    from flows.audit import _pool_and_test
    from flows.cli import main
    from obliviate.extraction.target import load_checkpoint

    checkpoint = tmp_path / "t.pt"
    assert main(["target", "train", "--data", "mnist5k", "--out", str(checkpoint), "--steps", "1", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["train_size"] == 2000
    meta = load_checkpoint(str(checkpoint))[1]
    data = load_dataset("mnist5k")
    bench = draw_split(data.labels, train_size=2000, pool_size=2000, test_size=1000, seed=3)  # bench/extraction.py
    assert meta["train_indices"] == sorted(bench[0].tolist())
    pool, test, said = _pool_and_test(
        data, meta, exclude=meta["train_indices"], pool_size=2000, test_size=1000, split_seed=None
    )
    assert np.array_equal(pool, bench[1]) and np.array_equal(test, bench[2])
    assert said == "draw_split(seed=3, train_size=2000) (the bench's split 3)"
    # The same draw with a smaller pool and test set is the target's split, not the bench's.
    _, _, said = _pool_and_test(
        data, meta, exclude=meta["train_indices"], pool_size=200, test_size=100, split_seed=None
    )
    assert said == "draw_split(seed=3, train_size=2000)"


def _setup(levels: int = 256):
    from flows.audit import AuditSetup
    from obliviate.extraction.selectors import Pool

    images = np.zeros((4, 28, 28), np.uint8)
    return AuditSetup(
        target="t.pt",
        target_meta={"arch": "lenet5"},
        pool=Pool(images, levels=levels),
        pool_indices=np.arange(4),
        test_images=images,
        test_labels=np.zeros(4, np.int64),
        oracle_test_labels=np.zeros(4, np.int64),
        pool_histogram=[4] + [0] * 9,
        pool_entropy=0.0,
        target_accuracy=1.0,
        overlap_warning=None,
        split="audit_split(seed=0)",
    )


def _cells(*rows: tuple[str, str, int, int, float]) -> list[dict]:
    return [
        {
            "attacker": attacker,
            "selector": selector,
            "budget": budget,
            "seed": seed,
            "queries": budget,
            "accuracy": agreement,
            "agreement": agreement,
            "transfer": {"0.3": 0.5},
            "class_histogram": [budget] + [0] * 9,
            "mean_entropy": 1.0,
            "synthetic": 0,
            "seconds": 1.0,
            "substitute": "lenet5",
        }
        for attacker, selector, budget, seed, agreement in rows
    ]


def _report_in_a_flow_run(cells: list[dict], *, out: Path, config: dict) -> dict:
    """``write_report`` as the audit runs it, inside a flow run: its table artifact belongs to that run."""
    from prefect import flow

    from flows.audit import write_report

    @flow(name="report-rules")
    def report() -> dict:
        return write_report(_setup(), cells, out=str(out), config=config)

    return report()


def _config(**changes) -> dict:
    return {
        "attackers": ["basic"],
        "selectors": ["random"],
        "substitute": "lenet5",
        "iterative": False,
        "drmi_starts": 32,
        "seeds": 1,
        "eps": [0.3],
    } | changes


def test_a_report_that_fails_to_render_replaces_none_of_the_previous_runs_files(tmp_path):
    """The report's files were replaced one by one, the plot rendered last: a Ctrl-C (or any failure)
    while it rendered left steal.json and steal.md of the new run beside steal.png of the old one."""
    from flows.audit import write_report

    old = {name: f"old {name}".encode() for name in ("steal.json", "steal.md", "steal.png")}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    cells = _cells(("basic", "random", 20, 0, 0.5))
    # A radius the cells were not measured at: the plot fails after the table and the JSON are rendered.
    with pytest.raises(KeyError):
        write_report.fn(_setup(), cells, out=str(tmp_path), config=_config(eps=[0.3, 0.7]))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # nothing replaced, no partial file left


def test_the_too_small_warning_is_said_of_the_mean_over_seeds_and_names_a_seed_that_reached_90(
    tmp_path, prefect_server
):
    """steal.md said flatly "no attacker reached 90 % agreement within 100 queries" when the mean over the seeds
    (88.9 %) did not but seed 1 did (90.0 % at 100 queries): a security audit understated the threat."""
    pair = ("augmented", "cluster_centers")
    cells = _cells((*pair, 50, 0, 0.80), (*pair, 50, 1, 0.82), (*pair, 100, 0, 0.878), (*pair, 100, 1, 0.90))
    config = _config(attackers=["augmented"], selectors=["cluster_centers"], seeds=2)
    md = Path(_report_in_a_flow_run(cells, out=tmp_path / "two", config=config)["markdown"]).read_text()
    assert (
        "**The budgets were too small to show the threat:** on the mean over seeds, no attacker reached 90 % "
        "agreement within 100 queries, so a thief's cost is not measured; a single seed did: `augmented` (queries "
        "chosen by `cluster_centers`) seed 1 at 100 queries. Rerun with larger --budgets"
    ) in md
    # the report's table artifact says it too, where the Prefect UI shows the run's outcome
    said = "a single seed did: `augmented` (queries chosen by `cluster_centers`) seed 1"
    assert [a.type for a in artifacts_mentioning(key="steal-audit", text=said)] == ["table"]
    # one seed: its curve is the mean, and nothing reached 90 %
    one = [c for c in cells if c["seed"] == 0]
    md = Path(_report_in_a_flow_run(one, out=tmp_path / "one", config=config)["markdown"]).read_text()
    assert (
        "**The budgets were too small to show the threat:** no attacker reached 90 % agreement within 100 queries, "
        "so a thief's cost is not measured. Rerun with larger --budgets"
    ) in md


def test_the_unreached_note_names_the_fewest_single_seeds_first_and_counts_the_rest():
    from obliviate.extraction.headline import unreached_note

    cells = _cells(
        ("basic", "random", 50, 0, 0.91),
        ("basic", "random", 50, 1, 0.70),
        ("basic", "random", 50, 2, 0.70),
        ("augmented", "drmi", 50, 0, 0.60),
        ("augmented", "drmi", 50, 1, 0.95),
        ("augmented", "drmi", 50, 2, 0.60),
    )
    assert unreached_note(cells, shown=1) == (
        "on the mean over seeds, no attacker reached 90 % agreement within 50 queries, so a thief's cost is not "
        "measured; single seeds did: `augmented` (queries chosen by `drmi`) seed 1 at 50 queries, and 1 more"
    )
    assert unreached_note(_cells(("basic", "random", 50, 0, 0.92))) is None  # the mean reaches it: cost measured


def test_the_plot_marks_the_headlines_levels_and_spans_the_audits_budgets(tmp_path, monkeypatch, prefect_server):
    """steal.png's agreement panel had no 90 % / 95 % lines though the headline is about them, and with budgets
    50,100 the budget axis ran to 600 for the seed's DRMI curve, leaving the panels mostly empty; steal.md's
    "seed DRMI transfer %" column did not say at which ε the seed measured it."""
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    savefig = Figure.savefig

    def keep(figure, *args, **kwargs):  # matplotlib's own savefig, the figure kept to read its axes
        drawn.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    cells = _cells(("basic", "random", 50, 0, 0.7), ("basic", "random", 100, 0, 0.8))
    paths = _report_in_a_flow_run(cells, out=tmp_path, config=_config())
    accuracy, agreement, transfer = drawn[-1].axes
    levels = {line.get_ydata()[0] for line in agreement.get_lines() if len(set(line.get_ydata())) == 1}
    assert {90, 95} <= levels
    assert 45 <= agreement.get_xlim()[0] < 50 and 100 < agreement.get_xlim()[1] <= 110
    assert accuracy.get_xlim() == agreement.get_xlim() == transfer.get_xlim()
    # the seed's curve goes on past the axis: its legend says so
    said = [t.get_text() for t in accuracy.get_legend().get_texts()]
    assert "seed's DRMI (50-600 queries, cut at this axis)" in said, said
    assert {t.get_text() for t in agreement.get_legend().get_texts()} == {"90 % agreement", "95 % agreement"}
    md = Path(paths["markdown"]).read_text()
    assert "| seed DRMI acc % | seed DRMI transfer ε=0.3 % |" in md


def test_sigint_inside_the_rename_window_waits_for_its_end():
    import os
    import signal

    from flows.audit import sigint_deferred

    # as in the `obliviate` process; earlier tests in this one (Ray Tune's) may have left another handler
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with pytest.raises(KeyboardInterrupt), sigint_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")
        assert done == ["after the signal"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_an_interrupted_steal_or_target_train_says_what_it_left_and_that_a_rerun_starts_over():
    """Both said "rerunning the same command resumes from whatever it had stored", but they store
    nothing to resume from; target train was named `obliviate target`."""
    from flows.cli import interrupted_message, parse_args

    steal = interrupted_message(parse_args(["steal", "--demo"]))
    assert steal.startswith("obliviate steal: interrupted. The report's files in --out are replaced together")
    assert "starts it over" in steal and "resumes" not in steal
    train = interrupted_message(parse_args(["target", "train"]))
    assert train.startswith("obliviate target train: interrupted. The checkpoint (--out) is written whole")
    assert "starts it over" in train and "resumes" not in train


@pytest.mark.parametrize(
    ("option", "value", "rule"),
    [
        # `--attackers basic,basic --selectors random,random --budgets 40,20,40` ran 12 cells instead of 2 and
        # reported copies of one cell as 4 runs with std 0
        ("--attackers", "basic,basic", "--attackers lists basic twice; got 'basic,basic'. Give each value once."),
        ("--selectors", "random, random", "--selectors lists random twice; got 'random, random'."),
        ("--budgets", "40,20,40", "--budgets lists 40 twice; got '40,20,40'. Give each value once."),
        ("--eps", "0.1,0.1000001", "--eps lists 0.1 as 0.1 and 0.1000001, which name the same transferability column"),
        ("--budgets", "50,x", "--budgets takes comma-separated integers; got '50,x'."),
        ("--eps", "0.1,big", "--eps takes comma-separated numbers like 0.1,0.2; got '0.1,big'."),
        ("--selectors", ",", "--selectors needs at least one value; got ','."),
    ],
)
def test_steal_refuses_a_value_listed_twice_before_any_work(tmp_path, capsys, option, value, rule):
    from flows.cli import main

    out = tmp_path / "report"
    assert main(["steal", "--target", str(tmp_path / "none.pt"), "--out", str(out), option, value]) == 2
    err = capsys.readouterr().err
    assert rule in err and "Traceback" not in err
    assert not out.exists()


def test_the_audit_flow_refuses_duplicates_in_its_own_names():
    from flows.audit import check_audit_grid
    from obliviate.errors import ConfigError

    grid = {"selectors": ["random"], "attackers": ["basic"], "seeds": 1, "pool_size": 100, "substitute": "lenet5"}
    with pytest.raises(ConfigError, match=r"budgets \(--budgets\) lists 40 twice; got \[40, 20, 40\]"):
        check_audit_grid(budgets=[40, 20, 40], eps=[0.3], **grid)
    with pytest.raises(ConfigError, match=r"eps \(--eps\) lists 0.3 twice"):
        check_audit_grid(budgets=[40], eps=[0.3, 0.3], **grid)


def test_the_headline_gives_the_fewest_queries_over_every_pair_measured_and_names_it():
    """The headline read "queries to 90 %" off the pair with the highest mean agreement only: with
    basic reaching 90 % at 50 and semi_supervised (higher on average) only at 150, it said 150."""
    from obliviate.extraction.headline import fewest_queries, headline_sentence, strongest

    cells = _cells(
        ("basic", "random", 50, 0, 0.91),
        ("basic", "random", 150, 0, 0.92),
        ("semi_supervised", "auto", 50, 0, 0.88),
        ("semi_supervised", "auto", 150, 0, 0.97),
    )
    assert strongest(cells) == ("semi_supervised", "auto")  # the pair the headline used to read
    at90, at95 = fewest_queries(cells, level=0.9), fewest_queries(cells, level=0.95)
    assert (at90.attacker, at90.selector, at90.mean) == ("basic", "random", 50)
    assert (at95.attacker, at95.selector, at95.mean) == ("semi_supervised", "auto", 150)
    line = headline_sentence(at90=at90, at95=at95)
    assert "fewest queries over the 2 attacker / selector pairs measured" in line
    assert "`basic` (queries chosen by `random`) reaches **90 % agreement at 50 queries** (seeds: 50)" in line
    assert "`semi_supervised` (queries chosen by `auto`) reaches **95 % agreement at 150 queries**" in line
    # A level no pair reaches is said of the closest pair (the highest mean agreement at a budget), with its spread.
    at99 = fewest_queries(cells, level=0.99)
    assert (at99.attacker, at99.mean) == ("semi_supervised", None)
    assert (
        "`semi_supervised` (queries chosen by `auto`) comes closest to **99 % agreement**, which no pair reaches "
        "within 150 queries (seeds: >150)" in headline_sentence(at90=at90, at95=at99)
    )


def test_the_headline_names_a_pair_once_and_says_plainly_what_no_pair_reaches():
    """The same pair at both levels, one level unreached, read "... and it, the closest, does not reach **95 %
    agreement within 150 queries**"."""
    from obliviate.extraction.headline import fewest_queries, headline_sentence

    cells = _cells(
        ("basic", "random", 50, 0, 0.81),
        ("basic", "random", 150, 0, 0.85),
        ("semi_supervised", "auto", 50, 0, 0.79),
        ("semi_supervised", "auto", 150, 0, 0.93),
    )
    at90, at95 = fewest_queries(cells, level=0.9), fewest_queries(cells, level=0.95)
    line = headline_sentence(at90=at90, at95=at95)
    assert line == (
        "Queries to steal: against the target (the fewest queries over the 2 attacker / selector pairs measured), "
        "`semi_supervised` (queries chosen by `auto`) reaches **90 % agreement at 150 queries** (seeds: 150) and "
        "comes closest to **95 % agreement**, which no pair reaches within 150 queries (seeds: >150); "
        "on the budget grid 50, 150."
    )
    at80 = fewest_queries(cells, level=0.8)
    assert "`basic` (queries chosen by `random`) reaches **80 % agreement at 50 queries** (seeds: 50); " in (
        headline_sentence(at90=at80, at95=at95)
    )
    at97, at99 = fewest_queries(cells, level=0.97), fewest_queries(cells, level=0.99)
    assert (
        "`semi_supervised` (queries chosen by `auto`) comes closest to **97 % agreement** (seeds: >150) and to **99 % "
        "agreement** (seeds: >150), which no pair reaches within 150 queries; on the budget grid 50, 150."
    ) in headline_sentence(at90=at97, at95=at99)
    one = [c for c in cells if c["attacker"] == "semi_supervised"]
    assert (
        "(the one attacker / selector pair measured), `semi_supervised` (queries chosen by `auto`) reaches **90 % "
        "agreement at 150 queries** (seeds: 150) and does not reach **95 % agreement within 150 queries** (seeds: >150)"
    ) in headline_sentence(at90=fewest_queries(one, level=0.9), at95=fewest_queries(one, level=0.95))


@pytest.fixture(scope="module")
def small_target(train_target):
    """A 5-step target: each of its tests is refused before any query, so how well it learned does not matter."""
    return train_target(steps=5)


def test_steal_refuses_a_pool_whose_labels_the_target_cannot_answer_before_any_work(small_target, tmp_path, capsys):
    """mnist5k's images with labels + 100 were audited: exit 0, accuracy 0.00 %, nan transfer columns,
    a 110-bin class histogram and `RuntimeWarning: Mean of empty slice`."""
    from flows.cli import main
    from obliviate.errors import ConfigError
    from obliviate.extraction.audit import check_pool_fits_target
    from obliviate.extraction.target import load_checkpoint

    data = load_dataset("mnist5k")
    shifted = tmp_path / "badlab.npz"
    np.savez(shifted, images=data.images, labels=data.labels + 100)
    with pytest.raises(ConfigError, match=r"labels 100\.\.109"):
        check_pool_fits_target(pool=load_dataset(shifted), target_meta=load_checkpoint(str(small_target))[1])
    out = tmp_path / "report"
    tiny = ["--attackers", "basic", "--selectors", "random", "--budgets", "20", "--seeds", "1", "--steps", "5"]
    assert main(["steal", "--target", str(small_target), "--pool", str(shifted), "--out", str(out), *tiny]) == 2
    err = capsys.readouterr().err
    assert "the target answers classes 0..9, but pool " in err and "badlab.npz' has labels 100..109 (5000 of" in err
    assert "--pool mnist5k" in err and "Traceback" not in err
    assert not out.exists()


def test_steal_refuses_fewer_test_images_than_the_scheduled_audit_accepts(small_target, tmp_path, capsys):
    """`steal --test-size 1` ran (agreement 0 or 100 % on one image) while the scheduled audit skips a
    run with fewer than 30 test images: one rule for both now."""
    from flows.audit import MIN_AUDIT_TEST_IMAGES
    from flows.cli import main

    out = tmp_path / "report"
    tiny = ["--attackers", "basic", "--selectors", "random", "--budgets", "20", "--seeds", "1", "--steps", "5"]
    assert main(["steal", "--target", str(small_target), "--out", str(out), "--test-size", "29", *tiny]) == 2
    err = capsys.readouterr().err
    assert f"test_size (--test-size) must be >= {MIN_AUDIT_TEST_IMAGES}" in err and "got 29" in err
    assert "one test image moves agreement by" in err and not out.exists()


def test_a_seed_beyond_what_numpy_and_torch_take_is_refused_by_the_parser(tmp_path, capsys):
    """`target train --seed 99999999999999999999` (also 2**64) ended in a traceback from torch.manual_seed:
    `ValueError: Overflow when unpacking long long`."""
    from flows.cli import main

    out = tmp_path / "t.pt"
    for big in ("99999999999999999999", str(2**64), str(2**63)):
        with pytest.raises(SystemExit) as stopped:
            main(["target", "train", "--out", str(out), "--seed", big])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert (
            f"Invalid value for '--seed': a seed is an integer in 0..{2**63 - 1} (what numpy and torch both take); got {big}"
            in err
        )
        assert "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["steal", "--split-seed", str(2**64)])
    assert "Invalid value for '--split-seed': a seed is an integer in 0..9223372036854775807" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        # said "need budgets >= 1 and seeds >= 1; got budgets=[0], seeds=2." (no flag, no fix)
        (["--budgets", "0,50"], "--budgets must each be >= 1 (queries bought); got 0. Give budgets like 50,150,300."),
        (["--seeds", "0"], "--seeds must be >= 1 (seeds per budget); got 0. Give 1 or more."),
        # named pool_size=2000, the flow's argument, instead of the flag
        (
            ["--budgets", "50,2001"],
            (
                "a budget buys that many images of the pool, so it can be at most the pool size (--pool-size, "
                "2000 here); got 2001. Lower --budgets or raise --pool-size."
            ),
        ),
    ],
)
def test_steal_grid_errors_name_the_flag_and_the_fix(small_target, tmp_path, capsys, options, rule):
    from flows.cli import main

    out = tmp_path / "report"
    assert main(["steal", "--target", str(small_target), "--out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert rule in err and "Traceback" not in err
    assert not out.exists()


def test_an_out_that_is_a_file_or_under_one_is_called_so(small_target, tmp_path, capsys):
    """`steal --out /etc/passwd` said "cannot create the report folder (--out) '/etc/passwd' (File exists)"."""
    from flows.cli import main

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["steal", "--target", str(small_target), "--out", str(a_file)]) == 2
    assert f"the report folder (--out) {str(a_file)!r} is a file; give a folder path" in capsys.readouterr().err
    assert main(["steal", "--target", str(small_target), "--out", str(a_file / "report")]) == 2
    err = capsys.readouterr().err
    assert f"cannot create the report folder (--out) {str(a_file / 'report')!r}: {str(a_file)!r} is a file" in err
    assert main(["target", "train", "--out", str(a_file / "x.pt")]) == 2
    assert f"cannot create the folder of --out {str(a_file)!r}: it is a file" in capsys.readouterr().err
    assert a_file.read_text() == "x"


def test_target_train_checks_every_option_before_creating_anything(tmp_path, capsys):
    """`--train-size 0` left an empty runs/ folder (created before the check); `--steps 0` said "need steps >=
    1, batch_size >= 1, lr > 0; got 0, 64, 0.001." (no flag); `--data ''` trained on the current folder."""
    from flows.cli import main

    out = tmp_path / "runs" / "t.pt"
    assert main(["target", "train", "--out", str(out), "--train-size", "0"]) == 2
    assert "--train-size must leave images" in capsys.readouterr().err
    assert main(["target", "train", "--out", str(out), "--steps", "0"]) == 2
    assert "--steps must be >= 1 (Adam steps); got 0." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["target", "train", "--out", str(out), "--data", ""])
    assert "Invalid value for '--data': a dataset is needed (mnist5k, digits, an .npz file or a folder); got ''" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["steal", "--demo", "--pool", " "])
    assert "Invalid value for '--pool': a dataset is needed" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_target_train_says_what_it_trains_before_it_starts(tmp_path, capsys):
    """`target train` printed nothing for the 15-25 s it trained."""
    from flows.cli import main

    out = tmp_path / "t.pt"
    assert main(["target", "train", "--out", str(out), "--train-size", "300", "--steps", "5"]) == 0
    said = capsys.readouterr().err
    assert (
        "target train: training lenet5 on 300 images of mnist5k, 5 Adam steps (1,500 took 9 s end to end on an idle 2-core machine; "
        in said
    )


def test_a_split_that_excludes_nothing_does_not_claim_to_avoid_the_targets_training_set():
    """With a fingerprint mismatch the log warned that no training image was excluded, then said the pool
    was drawn from "the images outside the target's training set"."""
    from flows.audit import _pool_and_test
    from obliviate.data import load_dataset

    data = load_dataset("digits")
    _, _, said = _pool_and_test(data, {}, exclude=[], pool_size=100, test_size=50, split_seed=None)
    assert said == "audit_split(seed=0) of all images (none excluded)"
    _, _, said = _pool_and_test(data, {}, exclude=[0, 1, 2], pool_size=100, test_size=50, split_seed=1)
    assert said == "audit_split(seed=1) of the images outside the target's training set"
