"""The steal flow end to end on a tiny configuration: CLI -> Prefect -> Ray cells -> report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        (["--budgets", "2500"], "at most the pool size (--pool-size, 2000 here)"),
        (["--budgets", "50,x"], "--budgets takes comma-separated integers"),
        (["--attackers", "basic,nosuch"], "unknown attackers ['nosuch']"),
        (["--selectors", ","], "--selectors needs at least one value"),
        (["--substitute", "vgg"], "unknown substitute 'vgg'"),
        (["--eps", "2"], "must be in (0, 1]; got [2.0]"),
        (["--eps", "0.1,big"], "--eps takes comma-separated numbers"),
        # settings of the attackers: checked in the options' names before a Prefect server starts (they
        # failed inside the flow run, as "batch_size, basic_steps, min_steps, ... must be >= 1")
        (
            ["--attack-steps", "0", "--rounds", "-1"],
            "attack_steps (--attack-steps) must be >= 1; got 0; rounds (--rounds) must be >= 0; got -1.",
        ),
        (["--consistency-steps", "-1"], "consistency_steps (--consistency-steps) must be >= 0; got -1."),
        (["--drmi-starts", "-2"], "drmi_starts (--drmi-starts) must be >= 0 (0: one per image); got -2."),
        (["--timeout", "0"], "timeout_s (--timeout) must be > 0 seconds; got 0.0."),
        (["--num-cpus", "0"], "--num-cpus is the Ray CPUs to start and must be >= 1; got 0."),
        # 300 of mnist5k's 5,000 images trained the target
        (
            ["--test-size", "3000"],
            "must be at most 4700; got 2000 + 3000 = 5000. Lower them (--pool-size, --test-size)",
        ),
    ],
)
def test_cli_steal_refuses_a_grid_that_cannot_run_before_any_work(target_checkpoint, tmp_path, capsys, options, rule):
    from flows.cli import main

    out = tmp_path / "report"
    assert main(["steal", "--target", str(target_checkpoint), "--out", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert rule in err and "Traceback" not in err
    assert not out.exists()  # nothing queried, trained or written


def test_cli_steal_refuses_a_pool_the_target_cannot_read_before_any_work(target_checkpoint, tmp_path, capsys):
    import numpy as np

    from flows.cli import main

    out = tmp_path / "report"
    assert main(["steal", "--target", str(target_checkpoint), "--pool", "digits", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the target takes 28x28 images, but pool 'digits' holds 8x8 images" in err and "--pool mnist5k" in err
    # Same side, other gray levels: 8-bit 8x8 images read by a target of digits' 17 levels (0..16).
    small = tmp_path / "digits-target.pt"
    assert (
        main(["target", "train", "--data", "digits", "--out", str(small), "--train-size", "300", "--steps", "5"]) == 0
    )
    said = capsys.readouterr().out  # the accuracy a user weighs the audit's agreement against
    assert f"target {small}: lenet5 trained on 300 images of digits (5 steps); accuracy " in said
    assert " % on the other 1,497 images" in said and json.loads(said.splitlines()[-1])["accuracy_on_the_rest"] >= 0
    eight_bit = tmp_path / "eight-bit.npz"
    np.savez(eight_bit, images=np.full((50, 8, 8), 200, np.uint8), labels=np.arange(50) % 10)
    assert main(["steal", "--target", str(small), "--pool", str(eight_bit), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the target reads images of 17 gray levels, but pool" in err and "--pool digits" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_cli_steal_fits_its_default_pool_and_test_set_to_the_images_left(capsys):
    """digits has 1,797 images: beside a target trained on 300 the defaults (2,000 + 1,000) cannot
    fit, and `steal --pool digits` ended in a flow run failure; sizes given are kept and checked."""
    from flows.cli._types import Args
    from flows.cli.steal import _split_sizes
    from obliviate.errors import ConfigError

    left = Args(pool="digits", pool_size=None, test_size=None)
    assert _split_sizes(left, available=1497) == (998, 499)
    assert "digits leaves 1497 images outside the target's training set: pool 998, test 499" in capsys.readouterr().err
    assert _split_sizes(left, available=4700) == (2000, 1000)
    assert _split_sizes(left, available=None) == (2000, 1000)  # an HTTP target: the flow checks what it declares
    given = Args(pool="digits", pool_size=1200, test_size=None)
    with pytest.raises(ConfigError, match=r"at most 1497; got 1200 \+ 1000 = 2200\. .* e\.g\. 998 and 499"):
        _split_sizes(given, available=1497)


def test_cli_steal_refuses_a_target_server_that_is_not_there_before_any_work(tmp_path, capsys):
    import socket

    from flows.cli import main

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = tmp_path / "report"
    assert main(["steal", "--target", f"http://127.0.0.1:{port}/predict", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"no server answers at http://127.0.0.1:{port}/predict" in err and "Traceback" not in err
    assert "Starting temporary server" not in err and not out.exists()


def test_cli_steal_refuses_an_unwritable_report_folder_before_any_query(target_checkpoint, tmp_path, capsys):
    from flows.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["steal", "--target", str(target_checkpoint), "--out", str(blocker / "report")]) == 2
    assert "cannot create the report folder" in capsys.readouterr().err


def test_cli_steal_demo_keeps_the_options_given(tmp_path, capsys):
    from flows.cli import main

    # --demo's small grid would have replaced --budgets; the option given wins and is checked before
    # the demo's target is trained.
    out = tmp_path / "demo"
    assert main(["steal", "--demo", "--out", str(out), "--budgets", "50,0"]) == 2
    assert "--budgets must each be >= 1 (queries bought); got 0." in capsys.readouterr().err
    assert not (out / "target.pt").exists()


def test_cli_steal_demo_on_digits_fits_its_target_pool_and_test_set(
    prefect_and_ray, target_checkpoint, tmp_path, capsys
):
    """`steal --demo --pool digits` printed "training ... on 2,000 mnist5k images" and failed: digits has 1,797.
    After a mnist5k demo in the same --out it reused that demo's target.pt and was refused ("pass the
    pool the target was trained on (--pool mnist5k)"): the demo retrains a target that does not fit."""
    import shutil

    from flows.cli import main

    out = tmp_path / "demo"
    out.mkdir()
    shutil.copy(target_checkpoint, out / "target.pt")  # a mnist5k target, as a mnist5k demo leaves it
    small = ["--attackers", "basic", "--selectors", "random", "--budgets", "20", "--steps", "20"]
    assert main(["steal", "--demo", "--pool", "digits", "--out", str(out), *small]) == 0
    said = capsys.readouterr().out
    assert (
        f"{out / 'target.pt'} was trained on 300 images of mnist5k, not the demo's 599 of digits: replacing it" in said
    )
    assert "training a LeNet-5 target on 599 digits images" in said
    report = (out / "steal.md").read_text()
    assert "Pool: 798 images" in report and "accuracy on the 400 test images" in report


def test_cli_steal_writes_json_markdown_png_and_an_artifact(prefect_and_ray, target_checkpoint, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "report"
    code = main(
        [
            "steal",
            "--target",
            str(target_checkpoint),
            "--pool",
            "mnist5k",
            "--budgets",
            "20,40",
            "--attackers",
            "basic,semi_supervised",
            "--selectors",
            "drmi,random,jacobian,adaptive",
            "--seeds",
            "1",
            "--out",
            str(out),
            "--pool-size",
            "120",
            "--test-size",
            "100",
            "--steps",
            "15",
            "--attack-steps",
            "20",
            "--rounds",
            "1",
            "--round-steps",
            "10",
            "--consistency-steps",
            "10",
            "--eps",
            "0.1,0.3",
            "--drmi-starts",
            "4",
        ]
    )
    assert code == 0
    said = capsys.readouterr()
    assert str(out / "steal.md") in said.out
    # the shared server (`obliviate ui` browses its runs), not a temporary one whose runs no command shows
    assert f"Prefect API: {os.environ['PREFECT_API_URL']}" in said.err and "temporary server" not in said.err
    doc = json.loads((out / "steal.json").read_text())
    assert len(doc["cells"]) == 2 * 4 * 2 * 1
    assert {c["attacker"] for c in doc["cells"]} == {"basic", "semi_supervised"}
    for cell in doc["cells"]:
        assert cell["queries_used"] == cell["budget"] == sum(cell["class_histogram"])
        assert set(cell["transfer"]) == {"0.1", "0.3"}
    jac = [c for c in doc["cells"] if c["selector"] == "jacobian"]
    assert all(c["synthetic"] > 0 for c in jac)
    assert doc["overlap_warning"] is None  # the checkpoint's training indices were excluded
    assert doc["split"].startswith("draw_split(seed=0, train_size=300)")  # the bench's split 0
    adaptive = [c for c in doc["cells"] if c["selector"] == "adaptive"]
    assert all(c["query_calls"] > 1 and c["synthetic"] == 0 for c in adaptive)  # rounds, pool images only
    md = (out / "steal.md").read_text()
    assert md.splitlines()[2].startswith(
        "Queries to steal: against the target (the fewest queries over the 8 attacker / selector pairs measured), "
    )
    assert set(doc["queries_to_agreement"]) == {"0.9", "0.95"}
    assert {q["pairs"] for q in doc["queries_to_agreement"].values()} == {8}
    # One seed per cell: its rates stand alone (they read "63.67 ± 0.00", a spread one seed cannot measure).
    assert "±" not in md.split("(MNIST, LeNet-5) beside them.", 1)[1], md
    assert "Rates are percent, from one seed per cell (no spread: `--seeds N` measures a mean ± std)" in md
    assert (doc["strongest"]["attacker"], doc["strongest"]["selector"]) in {
        (c["attacker"], c["selector"]) for c in doc["cells"]
    }
    assert "| basic | drmi | 20 | 1 |" in md and "| pool | 120 |" in md and "Threat model:" in md
    assert "DRMI restarts: 4." in md
    assert (out / "steal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the three files carry one run id, so a report mixed from two runs is visible
    from PIL import Image

    assert len(doc["run_id"]) == 12 and f"Run id: `{doc['run_id']}`" in md
    assert Image.open(out / "steal.png").info["Description"] == f"run id {doc['run_id']}"
    assert sorted(p.name for p in out.iterdir()) == ["steal.json", "steal.md", "steal.png"]  # no partial left

    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def latest():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["steal-audit"]))
            )

    artifacts = asyncio.run(latest())
    assert artifacts and artifacts[0].type == "table"


def test_a_failed_audit_leaves_no_empty_report_folder(prefect_and_ray, tmp_path):
    """The flow created --out before it opened the target: a failed audit left an empty folder."""
    import socket

    from flows.audit import steal_flow
    from obliviate.errors import ObliviateError

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = tmp_path / "report"
    with pytest.raises(ObliviateError, match="no server answers"):
        steal_flow(
            target=f"http://127.0.0.1:{port}/predict", budgets=[15], selectors=["random"], out=str(out), target_wait_s=0
        )
    assert not out.exists()


def test_a_blank_target_key_is_refused_before_the_target_is_opened(prefect_and_ray, tmp_path):
    """``target_key`` names the audit's target for a rerun's kept cells; a blank one would name every target alike."""
    from flows.audit import steal_flow
    from obliviate.errors import ConfigError

    out = tmp_path / "report"
    for blank in ("", "  "):
        with pytest.raises(ConfigError, match=r"target_key must be a non-empty text naming the target.*got '\s*'"):
            steal_flow(target="http://127.0.0.1:9/predict", target_key=blank, budgets=[15], out=str(out))
    assert not out.exists()


#: One basic/random cell of 15 queries per seed on a small pool: an audit an HTTP target answers in seconds.
TINY_HTTP_AUDIT = {
    "budgets": [15],
    "selectors": ["random"],
    "attackers": ["basic"],
    "pool_size": 100,
    "test_size": 80,
    "steps": 10,
    "eps": [0.3],
}


def test_a_cell_that_fails_in_ray_fails_the_flow_in_its_own_words(prefect_and_ray, target_checkpoint, tmp_path):
    """The flow run's state message (the dashboard's reason) held Ray's coloured remote traceback."""
    from flows.audit import steal_flow
    from flows.model_server import TargetServer
    from obliviate.extraction.target import LocalTorchBackend, TargetUnavailable, load_checkpoint

    model, meta = load_checkpoint(target_checkpoint)

    class FailsAfterTheTestLabels(LocalTorchBackend):
        """Answers the audit's one oracle call for the test labels, then fails like a broken server."""

        calls = 0

        def predict(self, images, *, output):
            FailsAfterTheTestLabels.calls += 1
            if FailsAfterTheTestLabels.calls > 1:
                raise RuntimeError("the model server broke")
            return super().predict(images, output=output)

    backend = FailsAfterTheTestLabels(model, levels=256)
    with TargetServer(backend=backend, info=meta) as server, pytest.raises(TargetUnavailable) as failed:
        steal_flow(target=server.url, seeds=1, out=str(tmp_path), retries=0, **TINY_HTTP_AUDIT)
    assert type(failed.value) is TargetUnavailable, type(failed.value)  # not Ray's wrapper of it
    assert "ray::" not in str(failed.value) and "\x1b[" not in str(failed.value), str(failed.value)
    assert "failed once (HTTP 500); transient errors are not retried (--retries 0)" in str(failed.value)
    # The error counts the finished cells (none: nothing is kept).
    assert str(failed.value).endswith("The audit stops: 0 of its 1 cells had finished."), str(failed.value)
    assert not list(tmp_path.glob(".cells-*"))


def test_an_audit_stopped_by_its_target_keeps_its_finished_cells_and_its_rerun_runs_only_the_others(
    prefect_and_ray, target_checkpoint, tmp_path
):
    """A target that went away for good in an audit's last cell lost every finished cell with it (minutes each):
    "they are discarded ... a rerun starts over". Here the target refuses every batch of 16 images once the k=15 cell
    has finished (the two cells run side by side: refused at once, the k=16 cell's error could come first, as in one
    CI run; until then it answers 503, which the cell retries), so the k=16 cell fails; the same audit again, against
    the mended target, runs only the k=16 cell."""
    from flows.audit import steal_flow
    from flows.model_server import TargetServer
    from obliviate.errors import ConfigError
    from obliviate.extraction.target import LocalTorchBackend, TargetUnavailable, load_checkpoint

    model, meta = load_checkpoint(target_checkpoint)

    class RefusesBatchesOf16(LocalTorchBackend):
        broken = True
        sizes: ClassVar[list[int]] = []

        def predict(self, images, *, output):
            RefusesBatchesOf16.sizes.append(len(images))
            if RefusesBatchesOf16.broken and len(images) == 16:
                # Not waited for here: the server answers one batch at a time, and the k=15 cell's later queries
                # must get through. A 503 is retried by the cell (--target-wait) until the k=15 cell is kept.
                if not list(out.glob(".cells-*/basic-random-k15-*.json")):
                    raise ConfigError("the model server is restarting")
                raise RuntimeError("the model server broke")
            return super().predict(images, output=output)

    audit = TINY_HTTP_AUDIT | {"budgets": [15, 16]}
    out = tmp_path / "report"
    with TargetServer(backend=RefusesBatchesOf16(model, levels=256), info=meta) as server:
        with pytest.raises(TargetUnavailable) as failed:
            steal_flow(target=server.url, seeds=1, out=str(out), retries=0, **audit)
        kept = list(out.glob(".cells-*/*.json"))
        assert [path.name for path in kept] == ["basic-random-k15-seed0.json"], kept
        said = str(failed.value)
        assert said.startswith("basic/random k=16 seed=0: "), said
        assert said.endswith(
            f"The audit stops: 1 of its 2 cells had finished; they are kept in {kept[0].parent}, and the same command "
            "again runs only the other 1."
        ), said
        assert not (out / "steal.json").exists()  # no report of half an audit
        first = json.loads(kept[0].read_text())

        RefusesBatchesOf16.broken, RefusesBatchesOf16.sizes = False, []
        paths = steal_flow(target=server.url, seeds=1, out=str(out), retries=0, **audit)
        # The kept cell spent no query again: no batch of its 15 images, and its figures are the first run's.
        assert 16 in RefusesBatchesOf16.sizes and 15 not in RefusesBatchesOf16.sizes, RefusesBatchesOf16.sizes
        doc = json.loads(Path(paths["json"]).read_text())
        assert [(c["budget"], c["queries_used"]) for c in doc["cells"]] == [(15, 15), (16, 16)]
        assert doc["cells"][0]["agreement"] == first["agreement"] and doc["cells"][0]["queries"] == first["queries"]
        assert not list(out.glob(".cells-*")), list(out.iterdir())  # the report written, nothing is kept any more

        # An audit with other settings does not take another's kept cells: its cells are its own.
        RefusesBatchesOf16.broken = True
        with pytest.raises(TargetUnavailable):
            steal_flow(target=server.url, seeds=1, out=str(out), retries=0, **audit)
        RefusesBatchesOf16.broken, RefusesBatchesOf16.sizes = False, []
        steal_flow(target=server.url, seeds=1, out=str(out), retries=0, **audit | {"steps": 11})
        assert 15 in RefusesBatchesOf16.sizes and 16 in RefusesBatchesOf16.sizes, RefusesBatchesOf16.sizes


def test_flow_against_an_http_target_from_ray_workers(prefect_and_ray, target_checkpoint, tmp_path):
    from flows.audit import steal_flow
    from flows.model_server import TargetServer
    from obliviate.extraction.target import load_checkpoint

    model, meta = load_checkpoint(target_checkpoint)
    with TargetServer(model, info=meta, allow_probabilities=False) as server:
        paths = steal_flow(target=server.url, seeds=2, out=str(tmp_path), **TINY_HTTP_AUDIT)
        requests = server.requests
    doc = json.loads(Path(paths["json"]).read_text())
    assert [c["queries_used"] for c in doc["cells"]] == [15, 15]
    md = Path(paths["markdown"]).read_text()
    # no DRMI selector ran (the report said "DRMI restarts: 32" all the same); 15 queries never reach 90 %
    assert "DRMI restarts" not in md
    # two seeds: the warning is about their mean (a single seed that reached 90 % would be named)
    assert (
        "**The budgets were too small to show the threat:** on the mean over seeds, no attacker reached 90 % "
        "agreement within 15"
    ) in md
    assert "Rerun with larger --budgets" in md
    assert "Rates are percent, mean ± std over seeds" in md
    table = [line for line in md.splitlines() if line.startswith("| basic | random | 15 | 2 | ")]
    assert len(table) == 1 and table[0].count(" ± ") == 2 + len(doc["config"]["eps"]), table
    assert doc["overlap_warning"] is None  # /info told the auditor which images trained the target
    # 1 request for the test labels, then per cell: 1 query + 2 oracle calls for the transfer metric.
    assert requests == 1 + 2 * 3


def test_cli_steal_off_a_terminal_logs_the_cells_running_and_prints_the_headline(
    prefect_and_ray, target_checkpoint, tmp_path
):
    """Off a terminal (a CI log, cron, `| tee`) the log said nothing from the set-up until the first cell ended
    (a cell takes minutes), and stdout held only the report's path: the answer was only in steal.md. The
    command runs as a user's does, its stdout and stderr pipes (the Prefect server is the session's)."""
    import re
    import subprocess
    import sys

    out = tmp_path / "report"
    grid = ["--budgets", "20,40", "--attackers", "basic", "--selectors", "random", "--seeds", "1", "--eps", "0.3"]
    sizes = ["--pool-size", "120", "--test-size", "100", "--steps", "15", "--num-cpus", "2"]
    command = ["steal", "--target", str(target_checkpoint), "--out", str(out), *grid, *sizes, "--progress-every", "0.2"]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *command], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # While both cells ran (2 CPUs), before either ended: what is done, what runs, for how long.
    running = re.search(r"cells 0/2 done \(\d+\.\d s\); running (.*)", done.stderr)
    assert running, done.stderr[-3000:]
    assert "basic/random k=20 seed=0 (for " in running[1] and "basic/random k=40 seed=0 (for " in running[1]
    # The answer, as steal.md leads with it, then where the report lies.
    headline = (out / "steal.md").read_text().splitlines()[2]
    assert headline.startswith("Queries to steal: against the target (the one attacker / selector pair measured), ")
    assert done.stdout.splitlines() == [
        headline,
        f"audit report: {out / 'steal.md'} (also {out / 'steal.json'}, {out / 'steal.png'})",
    ], done.stdout
