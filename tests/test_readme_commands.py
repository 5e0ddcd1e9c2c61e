"""The README's two commands are the ones CI and users run (issue 2, set-up)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_two_commands_demo_then_test() -> None:
    assert readme_commands() == ["make demo", "make test"]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = readme_commands()[1]
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ci_lines[-1] == test_command
    assert "set -euo pipefail" in ci_lines  # a failing test fails CI


def test_make_test_runs_pytest_which_fails_on_no_tests(tmp_path) -> None:
    dry_run = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert re.search(r"\.venv/bin/python -m pytest\s*$", dry_run.stdout, flags=re.MULTILINE), dry_run.stdout
    # pytest exits 5 when it collects nothing; make and .ci/run (set -e) turn that into a failure.
    (tmp_path / "test_none.py").write_text("")
    empty = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(tmp_path)], check=False, capture_output=True, text=True
    )
    assert empty.returncode == 5


@pytest.mark.slow
def test_make_demo_tells_the_whole_story(tmp_path) -> None:
    demo = readme_commands()[0]
    completed = subprocess.run(
        demo.split() + [f"DEMO_ARGS=--quick --out {tmp_path}"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = completed.stdout
    assert re.search(r"^H = [0-9.]+ nats over 40 restarts", out, flags=re.MULTILINE), out[-3000:]
    for step in ("reduce (DRMI)", "extraction audit", "train + forget + unlearn"):
        assert re.search(rf"^\| {re.escape(step)} \| ok \|", out, flags=re.MULTILINE), out[-3000:]
    assert re.search(r"^\| story-a \| 1 → 2 \|.*\| yes \|$", out, flags=re.MULTILINE), out[-3000:]
    # issue 11: a batch of requests, forgotten at once by rollback, exact after one retrain, its cost per request
    assert re.search(
        r"^batch of 3 deletion requests .* (batched until \d|flushed at once by the \w+ rule)", out, flags=re.MULTILINE
    ), out[-3000:]
    # the rollback named is the one the run served first (it once named a version the retrain published later)
    for run, version, block in re.findall(
        r"^  rolled back at once: (story-\w) v(\d+) serves M_(\d+),", out, re.MULTILINE
    ):
        assert re.search(rf"^  {run} served while the batch retrained: v{version} M_{block} ", out, re.MULTILINE), out[
            -3000:
        ]
    assert (
        len(re.findall(r"^\| del-\w+ \| \[\d+\] \| done \| [0-9.]+ s \| [0-9.]+ s \| no \|$", out, re.MULTILINE)) == 3
    )
    assert re.search(
        r"^batch cost: .* per request vs naive retraining [0-9.]+ block-trainings", out, flags=re.MULTILINE
    ), out[-3000:]
    # every run is accounted for in the batch: what it served while retraining, or why nothing changed
    runs = re.findall(r"^\| (story-\w) \| \d+ → \d+ \|", out, flags=re.MULTILINE)
    assert runs, out[-3000:]
    for run in runs:
        served = rf"^  {run}(: none of the batch's ids is in its training data| served while the batch retrained: v\d)"
        assert re.search(served, out, flags=re.MULTILINE), out[-3000:]
    assert len(list(tmp_path.glob("reduce-*/subset.npy"))) == 1
    reduce_report = re.search(r"^\| reduce \(DRMI\) \| ok \| \d+ \| (\S+) \|$", out, flags=re.MULTILINE)
    assert reduce_report and Path(reduce_report.group(1)).is_file(), out[-3000:]  # the report itself, not a pattern
    assert Path(reduce_report.group(1)).name == "subset.png"  # the picture a person reads, not summary.json
    assert (tmp_path / "steal" / "steal.md").exists()
    # step 2 prints the audit's answer, the line steal.md leads with, not only where the report lies
    assert (tmp_path / "steal" / "steal.md").read_text().splitlines()[2] in out.splitlines(), out[-3000:]
    assert "`make ui` (or `.venv/bin/obliviate ui`), then open http://127.0.0.1:4200" in out  # issue 15


def test_cli_reports_bad_input_without_a_traceback(capsys) -> None:
    assert main(["reduce", "--data", "mnist6k", "--k", "5"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset name 'mnist6k'" in err and "Traceback" not in err
    assert main(["reduce", "--data", "digits", "--k", "1"]) == 2
    assert "k must satisfy 2 <= k < n=1797; got k=1" in capsys.readouterr().err


def test_demo_refuses_an_out_it_cannot_write_before_starting_a_server(tmp_path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["demo", "--quick", "--out", str(blocker / "demo")]) == 2
    err = capsys.readouterr().err
    assert "cannot create the demo's folder (--out)" in err and "Not a directory" in err


def test_cli_reduce_on_digits_writes_subset(tmp_path, capsys) -> None:
    assert main(["reduce", "--data", "digits", "--k", "20", "--starts", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "over 30 restarts" in out
    assert len(list(tmp_path.glob("reduce-*/subset.npy"))) == 1


def test_cli_reduce_says_the_unit_of_its_objective(tmp_path, capsys) -> None:
    # it said "H = 4.4769 over 1 restarts": no unit, and a plural for one
    assert (
        main(["reduce", "--data", "digits", "--k", "5", "--starts", "1", "--workers", "0", "--out", str(tmp_path)]) == 0
    )
    assert re.search(r"^H = [0-9.]+ nats over 1 restart \(best start \d+\)$", capsys.readouterr().out, re.MULTILINE)
    options = ["--starts", "2", "--normalize", "--workers", "0", "--out", str(tmp_path)]
    assert main(["reduce", "--data", "digits", "--k", "5", *options]) == 0
    assert "(normalised MI, no unit) over 2 restarts" in capsys.readouterr().out


def test_demo_batch_accounts_for_a_run_the_batch_does_not_touch(capsys) -> None:
    from flows.cli.demo import _print_batch

    batch = {
        "requests": [
            {"request_id": "del-1", "ids": [7], "status": "done", "forget_s": 1.0, "exact_s": 2.0, "late": False}
        ],
        "window_s": 3600.0,
        "batched_until": 0.0,
        "batched_rule": "window",
        "floor_points": 25.0,
        "interim": {},
        "served": {
            "run-a": [{"version": 3, "serve_block": "final", "retrained": False, "heldout_accuracy": 0.9}],
            "run-b": [],
        },
        "runs_retrained": ["run-a"],
        "block_trainings": 1,
        "retrain_seconds": 0.1,
        "per_request_block_trainings": 1.0,
        "per_request_seconds": 0.1,
        "naive_per_request_block_trainings": 4.0,
        "naive_per_request_seconds": 0.3,
    }
    _print_batch(batch)
    out = capsys.readouterr().out
    assert "  run-a served while the batch retrained: v3 full (90.0 %)" in out
    assert "  run-b: none of the batch's ids is in its training data, so it keeps what it served" in out
    assert "one exact retrain of 1 block-training (0.10 s)" in out


def test_ctrl_c_stops_a_command_with_a_sentence_and_no_half_written_file(tmp_path) -> None:
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "flows.cli", "steal", "--demo", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    first = process.stdout.readline()  # printed once the target's training starts
    assert first.startswith("training a LeNet-5 target"), first
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "obliviate steal: interrupted" in err and "Traceback" not in err
    # no torn checkpoint left behind (the folder itself is made only when something is written into it)
    assert not out.exists() or not [p.name for p in out.iterdir() if "partial" in p.name]


def test_sigterm_stops_a_command_with_a_sentence_like_ctrl_c(tmp_path) -> None:
    # SIGTERM killed it with no word (exit -15), or inside a flow printed two tracebacks (exit 1)
    command = [sys.executable, "-m", "flows.cli", "steal", "--demo", "--out", str(tmp_path / "demo")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().startswith("training a LeNet-5 target")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "obliviate steal: stopped by SIGTERM." in err and "Traceback" not in err


@pytest.mark.slow
def test_sigterm_during_a_training_flow_stops_it_with_a_sentence(tmp_path) -> None:
    import os
    import time

    store = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    command = [
        sys.executable, "-m", "flows.cli", "train", "--store", f"file://{store}", "--run-id", "t", "--data",
        "digits", "--blocks", "8", "--epochs", "300",
    ]  # fmt: skip
    # 300 epochs: about 4 s a block here. At 20 epochs (0.25 s a block) the whole training ended before the
    # signal on a loaded CI machine, and the command exited 0 with a completed run.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    while not list(store.glob("runs/t/chains/*/ckpt-0002.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "obliviate train: stopped by SIGTERM." in err and "Traceback" not in err


def test_the_quick_demo_keeps_apart_from_the_full_one_unless_told() -> None:
    from flows.cli import parse_args as parse
    from flows.cli.demo import demo_folder

    assert demo_folder(parse(["demo"])) == "runs/demo"
    assert demo_folder(parse(["demo", "--quick"])) == "runs/demo-quick"
    assert demo_folder(parse(["demo", "--quick", "--out", "x"])) == "x"
