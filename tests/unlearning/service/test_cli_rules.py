"""The command line's rules for stores, waits and exit codes (in-process; moto S3 for buckets)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows.cli import main
from flows.cli._store import prepare_store
from obliviate.errors import ConfigError
from storage import ObjectStore
from storage.errors import WriteFailed
from storage.ledger import DeletionLedger


def test_one_store_rule_for_a_missing_bucket(moto_endpoint):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    missing = f"s3://missing-{uuid.uuid4().hex[:10]}/x"
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_store(missing, write=False)  # a reader refuses it ...
    assert prepare_store(missing, write=True) == missing  # ... a writer creates it and proves it can write
    assert ObjectStore(missing).container_exists() and ObjectStore(missing).list("") == []
    # A write into a bucket that vanished is a failed write, not a missing object.
    gone = ObjectStore(f"s3://never-{uuid.uuid4().hex[:10]}/x")
    with pytest.raises(WriteFailed, match="could not write"):
        gone.put_json("a.json", {"x": 1})


def test_forget_exit_codes_store_variable_and_cancel(tmp_path, monkeypatch, capsys):
    url = f"file://{tmp_path}/runs"
    monkeypatch.setenv("OBLIVIATE_STORE", url)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    for bad in ("1_000", "+5", "1797", "18446744073709551616"):
        assert main(["forget", "--ids", bad, "--data", "digits"]) == 2
        assert "rule" in capsys.readouterr().err
    assert main(["forget", "--ids", "5", "--data", "digits", "--wait", "-1"]) == 2
    assert "--wait is the most seconds to wait and must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # a refused request creates no store
    ObjectStore(url).ensure_container()  # forget files requests only in a store that exists
    assert main(["forget", "--ids", "5,9", "--data", "digits", "--no-event", "--wait", "0.5"]) == 5
    captured = capsys.readouterr()
    entry = json.loads(captured.out.strip().splitlines()[-1])
    assert entry["status"] == "pending" and not entry["settled"] and "not picked up yet" in captured.err
    assert ObjectStore(url).exists(f"ledger/requests/{entry['request_id']}.json")  # $OBLIVIATE_STORE was used
    assert main(["forget", "--retry", entry["request_id"]]) == 2  # only a failed request can be retried
    assert "only a failed request" in capsys.readouterr().err
    assert main(["forget", "--cancel", entry["request_id"]]) == 0
    assert main(["forget", "--status", entry["request_id"], "--wait", "1"]) == 7
    assert DeletionLedger(ObjectStore(url)).get(entry["request_id"]).status == "cancelled"
    assert main(["forget", "--status", "del-none", "--store", f"file://{tmp_path}/elsewhere"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["forget"]) == 2 and "forget needs --ids" in capsys.readouterr().err
    assert main(["forget", "--status", entry["request_id"], "--ids", "3"]) == 2  # --ids was silently ignored
    assert "they take no --ids. Run them as two commands." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["forget", "--help"])
    assert "0 done, 3 rejected, 4 failed, 5 pending, 6 claimed, 7" in " ".join(capsys.readouterr().out.split())
    from flows.batching import FLUSH_PREFIX

    # no batch waits: it said "the open batch flushes on the next pass" and left a flush request that
    # would have cut short whatever batch opened next
    assert main(["forget", "--now"]) == 0
    assert "no request waits in a batch; nothing to flush" in capsys.readouterr().err
    assert ObjectStore(url).list(FLUSH_PREFIX) == []


def test_a_store_path_that_is_a_file_or_cannot_be_made_is_named_so(tmp_path, capsys):
    """A file as --store was "does not exist" to readers; an uncreatable folder was "no object at ...,
    check the key, or that the write was committed"."""
    (tmp_path / "afile").write_text("x")
    for command in (["store", "check"], ["forget", "--ids", "3", "--no-event"]):
        assert main([*command, "--store", f"file://{tmp_path}/afile"]) == 2
        assert f"store file://{tmp_path}/afile is a file; a store is a folder" in capsys.readouterr().err
    assert main(["store", "check", "--repair", "--store", "file:///proc/obliviate-store"]) == 2
    said = capsys.readouterr().err
    assert "cannot create folder /proc/obliviate-store (No such file or directory)" in said and "no object" not in said


def test_forget_status_and_now_speak_of_the_open_batch(tmp_path, capsys):
    """`forget --status` on a batched request said "not picked up yet: is serve running?" next to a JSON
    that said it was batched; `forget --now` did not say what it would flush."""
    from flows.batching import FLUSH_PREFIX, batch_gate, save_policy
    from obliviate.unlearning.batching import BatchPolicy

    url = f"file://{tmp_path}/runs"
    ObjectStore(url).ensure_container()
    assert (
        main(["forget", "--store", url, "--ids", "5,9", "--data", "digits", "--no-event", "--request-id", "b-1"]) == 0
    )
    store = ObjectStore(url)
    save_policy(store, BatchPolicy(window_s=3600.0))
    gate = batch_gate(store, DeletionLedger(store).due_entries(lease_s=60.0))
    assert not gate["flush"] and gate["requests"] == ["b-1"]
    capsys.readouterr()
    assert main(["forget", "--store", url, "--status", "b-1"]) == 0
    said = capsys.readouterr().err
    assert said.startswith("request b-1: pending, batched until 20") and " UTC (window rule; deadline 20" in said
    assert "not picked up yet" not in said
    # --wait blamed a missing serve for a request waiting in its batch, even one already rolled back
    from storage.serving import record_forgotten

    record_forgotten(store, ["b-1"], runs={"a": {"serve_block": 1, "version": 3, "published": True}})
    assert main(["forget", "--store", url, "--status", "b-1", "--wait", "0.5"]) == 5
    said = capsys.readouterr().err
    assert said.startswith("request b-1: pending, batched until 20") and "not picked up yet" not in said
    assert "; forgotten already since 20" in said and "never saw the ids" in said
    assert main(["forget", "--store", url, "--now"]) == 0
    assert "1 request(s) waiting in the open batch will flush on the next pass" in capsys.readouterr().err
    # it said "list them with the Python API", which no command does
    assert main(["forget", "--store", url, "--status", "b-2"]) == 2
    assert "no request 'b-2' in the ledger of" in (said := capsys.readouterr().err) and "it holds 1 (e.g. b-1)" in said
    ObjectStore(f"file://{tmp_path}/typo").ensure_container()
    assert main(["forget", "--store", f"file://{tmp_path}/typo", "--status", "b-1"]) == 2
    assert "this store has no requests at all: check --store" in capsys.readouterr().err
    assert len(store.list(FLUSH_PREFIX)) == 1


def test_serve_refuses_a_floor_outside_0_to_100_before_touching_the_store(tmp_path, capsys):
    url = f"file://{tmp_path}/runs"
    for bad in ("-1", "150"):
        assert main(["serve", "--store", url, "--rollback", "--floor-points", bad]) == 2
        err = capsys.readouterr().err
        assert "--floor-points" in err and "0..100" in err and bad in err
    assert not (tmp_path / "runs").exists()  # no policy or rollback setting was written


def test_serve_refuses_a_store_a_live_serve_already_serves(tmp_path, capsys):
    import time

    from flows import unlearn
    from flows.batching import POLICY_KEY

    store = ObjectStore(f"file://{tmp_path}/s")
    # what a running serve keeps in its store: its announcement and a fresh heartbeat, its policy
    store.put_json(unlearn.ENDPOINT_KEY, {"api_url": "http://127.0.0.1:1/api", "pid": 4242, "started_at": time.time()})
    store.put_json(unlearn.HEARTBEAT_KEY, {"pid": 4242, "heartbeat_at": time.time()})
    store.put_json(POLICY_KEY, {"window_s": 86400.0})
    assert main(["serve", "--store", store.url, "--batch-window", "1h"]) == 2
    err = capsys.readouterr().err
    assert "is already served by a live `obliviate serve` (announced through http://127.0.0.1:1/api)" in err
    assert store.get_json(POLICY_KEY) == {"window_s": 86400.0}  # the running serve's settings stay
    assert store.get_json(unlearn.ENDPOINT_KEY)["pid"] == 4242


def test_the_watchdog_withdraws_the_same_announcement_forget_reads(tmp_path):
    from flows import unlearn, watchdog

    assert watchdog.ENDPOINT_KEY == unlearn.ENDPOINT_KEY
    store = ObjectStore(f"file://{tmp_path}/s")
    store.put_json(unlearn.ENDPOINT_KEY, {"api_url": "http://127.0.0.1:1/api", "pid": 4242, "started_at": 0.0})
    assert unlearn.served_endpoint(store)[0] is None  # no heartbeat for 30 s: stale
    assert not watchdog.withdraw_endpoint(store, pid=4243) and watchdog.withdraw_endpoint(store, pid=4242)
    assert "stopped" in unlearn.served_endpoint(store)[1]


def test_store_check_command_on_an_empty_store(tmp_path, capsys):
    url = f"file://{tmp_path}/s"
    assert main(["store", "check", "--store", url]) == 2  # nothing to check: refused as a missing store
    assert main(["store", "check", "--store", url, "--repair"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["healthy"] and report["objects_checked"] == 0
    # an empty store (on S3, any mistyped prefix of an existing bucket) read as plainly healthy
    assert f"note: the store holds nothing; check --store if you expected data at {url}" in captured.err
    # `--store "$UNSET_VARIABLE"` fell back to $OBLIVIATE_STORE / ./runs without a word
    assert main(["store", "check", "--store", ""]) == 2
    err = capsys.readouterr().err
    assert "--store is empty; give file://PATH or s3://bucket/prefix" in err
    assert err.startswith("obliviate store check: error: "), err  # it said "obliviate store: error"


@pytest.mark.parametrize(
    ("option", "value", "rule"),
    [
        ("--workers", "-1", "--workers is the Ray workers of one fan-out and must be >= 1"),
        ("--reconcile-cron", "nonsense", "--reconcile-cron must be a five-field cron expression"),
        ("--audit-cron", "61 * * * *", "--audit-cron must be a five-field cron expression"),
        ("--batch-max", "0", "--batch-max is the most requests one batch holds, so it must be >= 1"),
        ("--deadline", "30m", "--deadline must exceed the 1 h kept back before each deadline"),
        # each duration's refusal names its option (it said only "a duration is ...", leaving the user to guess which)
        ("--batch-window", "1x", "--batch-window: a duration is a number with an optional unit"),
        ("--batch-window", "9" * 400, "--batch-window: a duration must be a finite number of seconds"),
        ("--deadline", "2x", "--deadline: a duration is a number with an optional unit"),
        ("--deadline", "9" * 400 + "d", "--deadline: a duration must be a finite number of seconds"),
        # said "need --lease >= 2 s and --max-attempts >= 1; got 0.0 and 3.": no default, no fix; nan was taken
        ("--lease", "0", "must be a finite number >= 2 (seconds); got 0. The default is 20: leave --lease out for it"),
        ("--lease", "nan", "must be a finite number >= 2 (seconds); got nan. The default is 20"),
        ("--max-attempts", "0", "so it must be >= 1; got 0. The default is 3: leave --max-attempts out for it"),
        # a window past the default 30d deadline was taken without a word, though the deadline always flushes first
        ("--batch-window", "40d", "a window must be shorter than the deadline less 1 h: a longer one never closes"),
        ("--batch-window", "30d", "Got --batch-window '30d' with --deadline '30d' (default 30d). Give a shorter"),
    ],
)
def test_serve_refuses_bad_workers_schedules_or_batching_before_touching_the_store(
    tmp_path, capsys, option, value, rule
):
    assert main(["serve", "--store", f"file://{tmp_path}/runs", option, value]) == 2
    err = capsys.readouterr().err
    assert rule in err and repr(value).strip("'") in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        (["--epsilon", "0.2"], "--epsilon is DeepObliviate's stop threshold, so it needs --policy deepobliviate"),
        (["--policy", "deepobliviate", "--epsilon", "0"], "a finite number > 0 (default 0.05); got 0"),
        (["--policy", "deepobliviate", "--epsilon=-1"], "a finite number > 0 (default 0.05); got -1"),
        (["--policy", "deepobliviate", "--epsilon", "nan"], "a finite number > 0 (default 0.05); got nan"),
    ],
)
def test_serve_refuses_an_epsilon_it_cannot_use_before_touching_the_store(tmp_path, capsys, options, rule):
    assert main(["serve", "--store", f"file://{tmp_path}/runs", *options]) == 2
    err = capsys.readouterr().err
    assert rule in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_serve_hands_its_epsilon_to_every_unlearning(ray_address, prefect_api_url, store_url, tiny_run):
    """`serve --policy deepobliviate --epsilon E` reaches the workers (it once ran every request at 0.05)."""
    from actors.chains import ChainWorker
    from flows.deployments import ServiceOptions, build_deployments, flow_parameters
    from flows.reconcile import reconcile_flow
    from flows.train import run_spec
    from flows.unlearn import submit_deletion

    spec = run_spec(run_id="eps", split_seed=0, **tiny_run(blocks=4))
    ObjectStore(store_url).ensure_container()
    ChainWorker(store_url).train(spec)
    request = submit_deletion(store_url, spec["train_ids"][-1:], dataset="digits", emit=False)["request_id"]
    options = ServiceOptions(store=store_url, policy="deepobliviate", epsilon=0.37, workers=1, audit_cron=None)
    unlearn, reconcile = build_deployments(options)  # runner dispatch; warm dispatch uses flow_parameters
    assert unlearn.parameters["epsilon"] == reconcile.parameters["epsilon"] == flow_parameters(options)["epsilon"]
    assert reconcile_flow(**reconcile.parameters)["settled"] == {request: "done"}
    audit = DeletionLedger(ObjectStore(store_url)).get(request).details["runs"]["eps"]
    assert audit["policy"] == "deepobliviate" and audit["epsilon"] == 0.37, audit


@pytest.fixture
def run_on_npz(tmp_path, tiny_run):
    """A published run trained (in-process, as the flows' worker does) on an .npz copy of digits."""
    import numpy as np
    from sklearn.datasets import load_digits

    from actors.chains import ChainWorker
    from flows.train import run_spec

    digits = load_digits()
    npz = tmp_path / "pool.npz"
    np.savez(npz, images=(digits.images * 255 / 16).astype(np.uint8), labels=digits.target)
    url = f"file://{tmp_path}/store"
    ObjectStore(url).ensure_container()
    ChainWorker(url).train(run_spec(run_id="npz-run", **tiny_run(data=str(npz), blocks=2, split_seed=0)))
    return url, npz


def test_verify_answers_a_wrong_run_version_or_block_before_any_flow_runs(run_on_npz, monkeypatch, capsys, caplog):
    url, _ = run_on_npz
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: no server is started
    caplog.set_level("INFO")
    for argv, rule in [
        (["--run", "nosuch"], "run 'nosuch' has no published version"),
        (["--run", "npz-run", "--version", "3"], "--version must be in 1..1 for run 'npz-run'; got 3."),
        (["--run", "npz-run", "--blocks", "7"], "--blocks must be all, retrained or a block number 1..2; got '7'."),
        (["--run", "../x"], "run id"),
    ]:
        assert main(["verify", "--store", url, *argv]) == 2
        err = capsys.readouterr().err
        assert "obliviate verify: error: " in err and rule in err, err
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("prefect")]  # no flow run began
    monkeypatch.setenv("OBLIVIATE_STORE", url.replace("/store", "/nowhere"))
    assert main(["verify", "--run", "npz-run"]) == 2  # $OBLIVIATE_STORE is the store when --store is absent
    assert "does not exist" in capsys.readouterr().err
    assert not os.path.exists(url.removeprefix("file://").replace("/store", "/nowhere"))  # a reader creates nothing


def test_an_own_error_inside_a_flow_prints_its_rule_without_a_traceback(run_on_npz, prefect_api_url):
    # The run's data moved after training: only the verify flow, replaying, finds out. A foreseeable
    # failure, so the user sees the run's state line and the rule, once each, and no logged traceback.
    url, npz = run_on_npz
    npz.rename(npz.with_name("moved.npz"))
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "verify", "--store", url, "--run", "npz-run"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    said = [line for line in done.stderr.splitlines() if str(npz) in line]
    # said by the run's state line and by the command; Prefect's "Encountered exception" line said it a third time
    assert len(said) == 2, done.stderr
    assert "Finished in state Failed(" in said[0] and said[1].startswith("obliviate verify: error: "), said
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("tracebacks_quieted_first", [False, True], ids=["alone", "after-runtime-filter"])
@pytest.mark.parametrize("raised", ["own", "foreign"])
def test_an_own_error_of_a_task_is_said_by_its_flow_not_by_the_task_too(
    raised, tracebacks_quieted_first, prefect_api_url
):
    # Under a command, a task's own error was said three times: by the task run's "Finished in state Failed(...)" line,
    # by its flow run's, and by the command. The task's line goes once its error, ours, was dropped; the flow's stays.
    # A foreign error (a bug) keeps every line. flows.runtime's filter, which an earlier command in the process leaves
    # on prefect.flow_runs, takes an own error's traceback off first: the flow's record must still be seen as ours.
    import contextlib
    import logging

    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows._logging_filter import logger_filter
    from flows.cli import _RUN_LOGGERS, _OwnErrorsSaidOnce
    from flows.runtime import _ForeseenFailureFilter

    rule = f"the rule of this test, and its fix ({uuid.uuid4().hex[:8]})"

    @task(name="fails")
    def fails() -> None:
        raise ConfigError(rule) if raised == "own" else ValueError(rule)

    @flow(name="calls-a-failing-task")
    def calls() -> None:
        fails()

    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keep = Keep()
    loggers = [logging.getLogger(name) for name in _RUN_LOGGERS]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: prefect_api_url}),
            logger_filter(["prefect.flow_runs"], _ForeseenFailureFilter())
            if tracebacks_quieted_first
            else contextlib.nullcontext(),
            logger_filter(_RUN_LOGGERS, _OwnErrorsSaidOnce()),
            pytest.raises(ConfigError if raised == "own" else ValueError),
        ):
            calls()
    finally:
        for logger in loggers:
            logger.removeHandler(keep)
    said = [
        (r.name, r.getMessage()) for r in seen if rule in r.getMessage() or (r.exc_info and rule in str(r.exc_info[1]))
    ]
    flow_state = [m for name, m in said if name == "prefect.flow_runs" and m.startswith("Finished in state Failed(")]
    task_state = [m for name, m in said if name == "prefect.task_runs" and m.startswith("Finished in state Failed(")]
    assert len(flow_state) == 1, said  # the flow run's state line says it in every case
    if raised == "own":
        assert not task_state and len(said) == 1, said
    else:
        assert len(task_state) == 1 and len(said) == 4, said  # and each run's traceback record


def test_an_own_error_from_a_ray_worker_is_reported_in_its_own_words(ray_address, store_url, tiny_run):
    import ray

    from flows.cli import error_message
    from flows.train import remote_worker, run_spec
    from obliviate.errors import ObliviateError

    spec = run_spec(run_id="too-small", split_seed=0, **tiny_run())
    spec["train_ids"] = spec["train_ids"][:2]  # a stored spec with fewer samples than its 4 blocks
    worker = remote_worker(store_url, name=f"cli-rules/{uuid.uuid4().hex[:8]}")
    try:
        with pytest.raises(ObliviateError) as caught:
            ray.get(worker.train.remote(spec))
    finally:
        ray.kill(worker, no_restart=True)
    assert "ray::ChainWorker.train()" in str(caught.value)  # Ray's text: the worker, then its stack
    message = error_message(caught.value)
    assert message.startswith("num_blocks must be in 1..n=2") and "ray::" not in message and "File " not in message


def test_an_option_value_that_starts_with_a_dash_is_read_as_the_value(tmp_path, capsys):
    """`serve --batch-window -1h` got argparse's bare "expected one argument": -1h read as an option. The parser
    (click's) takes the word after an option as its value, so both spellings reach the option's own rule."""
    for given in (["--batch-window", "-1h"], ["--batch-window=-1h"]):
        assert main(["serve", "--store", f"file://{tmp_path}", *given]) == 2
        assert "a duration is a number with an optional unit" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--run-id", "b", "--seed", "-1"],
        ["train", "--run-id", "b", "--split-seed=-2"],
        ["reduce", "--data", "digits", "--k", "5", "--seed", "-1"],
        ["target", "train", "--seed", "-1"],
        ["steal", "--target", "t.pt", "--split-seed", "-1"],
    ],
)
def test_a_negative_seed_is_refused_before_anything_is_stored(tmp_path, capsys, command):
    # `train --seed -1` once stored the run's spec, then failed in numpy on the worker: the run id
    # could not be trained again with any options
    with pytest.raises(SystemExit) as exited:
        main([*command, "--store" if command[0] in ("train", "reduce") else "--out", str(tmp_path / "out")])
    assert exited.value.code == 2
    assert "a seed is an integer >= 0; got -" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_training_recipe_and_the_split_refuse_a_negative_seed(tiny_run):
    from flows.train import run_spec

    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        run_spec(run_id="r", split_seed=0, **tiny_run(seed=-1))
    with pytest.raises(ConfigError, match=r"split_seed \(--split-seed\) must be an integer >= 0"):
        run_spec(run_id="r", split_seed=-1, **tiny_run())


def test_store_check_refuses_a_negative_orphan_age(tmp_path, capsys):
    # a negative age would make every orphan, even one an attempt is writing now, old enough to collect
    assert main(["store", "check", "--store", f"file://{tmp_path}", "--repair", "--orphan-age", "-5"]) == 2
    assert "--orphan-age is the least age (seconds) of an orphan to collect and must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        (["--blocks", "0"], "--blocks (num_blocks) must be a positive integer; got 0"),
        (["--lr", "nan"], "--lr (learning_rate) must be > 0; got nan"),
        (["--shards", "300"], "leave 4 per shard, fewer than --blocks 6"),
        (["--run-id", "a/b"], "rule: a run id is 1-64 characters"),
        (["--heldout-size", "1797"], "got train_size=0, heldout_size=1797. Sizes that fit: e.g. heldout_size=359"),
    ],
)
def test_train_refuses_a_bad_option_before_a_server_starts_or_the_store_is_made(tmp_path, capsys, options, rule):
    assert main(["train", "--store", f"file://{tmp_path}/runs", "--run-id", "r", "--data", "digits", *options]) == 2
    err = capsys.readouterr().err
    assert rule in err and "Prefect API" not in err
    assert not (tmp_path / "runs").exists()


def test_a_small_dataset_is_planned_with_a_fifth_held_out(tmp_path):
    """A 60-image .npz failed `train` with its defaults: "got train_size=-240, heldout_size=300"."""
    import numpy as np
    from sklearn.datasets import load_digits

    from flows.train import run_spec

    digits, source = load_digits(), str(tmp_path / "small.npz")
    options = {"run_id": "r", "data": source, "model": "lenet5", "blocks": 6, "epochs": 1, "batch_size": 16}
    options |= {"learning_rate": 0.01, "schedule": "constant", "seed": 0, "split_seed": 0}
    np.savez(source, images=digits.images[:60].astype(np.uint8), labels=digits.target[:60])
    spec = run_spec(**options, train_size=None, heldout_size=None)
    assert (len(spec["train_ids"]), len(spec["heldout_ids"])) == (48, 12)
    np.savez(source, images=digits.images[:4].astype(np.uint8), labels=digits.target[:4])
    with pytest.raises(ConfigError, match="this dataset is too small for 6 blocks: use fewer blocks or more data"):
        run_spec(**options, train_size=None, heldout_size=None)


@pytest.mark.parametrize(
    "command",
    [["train", "--run-id", "r", "--data", "digits"], ["serve"], ["reduce", "--data", "digits", "--k", "20"]],
)
def test_a_ray_address_nothing_answers_at_is_refused_at_once(tmp_path, capsys, monkeypatch, command):
    """`train --ray-address 127.0.0.1:1` waited on Ray's GCS connection until killed (5 min seen)."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main([*command, "--store", f"file://{tmp_path}/runs", "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in err and "Prefect API" not in err
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("RAY_ADDRESS", "not-an-address")
    assert main([*command, "--store", f"file://{tmp_path}/runs"]) == 2
    assert "a Ray address is HOST:PORT" in capsys.readouterr().err
    # "auto" was let through: the command started Prefect and prepared the store before ray.init failed
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # `ray start` records its cluster in $RAY_TMPDIR/ray
    assert main([*command, "--store", f"file://{tmp_path}/runs", "--ray-address", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--ray-address auto (or RAY_ADDRESS=auto) joins the cluster `ray start --head` last started" in err
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")  # a head since stopped
    assert main([*command, "--store", f"file://{tmp_path}/runs", "--ray-address", "auto"]) == 2
    err = capsys.readouterr().err
    assert f"no Ray cluster answers at 127.0.0.1:{port} (the cluster 'auto' found, recorded by `ray start`)" in err
    assert "Prefect API" not in err and not (tmp_path / "runs").exists()


@pytest.fixture
def listener_that_is_not_ray():
    """A web server and a listener that never speaks, on 127.0.0.1; yields their addresses."""
    import http.server
    import socket
    import threading

    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes the handshake; nobody reads
    try:
        yield f"127.0.0.1:{web.server_address[1]}", f"127.0.0.1:{silent.getsockname()[1]}"
    finally:
        web.shutdown()
        web.server_close()
        silent.close()


def test_a_ray_address_where_another_server_listens_is_refused(tmp_path, capsys, listener_that_is_not_ray):
    """`train --ray-address` at a web server's port passed the TCP check, then Ray waited on it (2 min seen)."""
    from flows.runtime import check_ray_address

    web, silent = listener_that_is_not_ray
    assert (
        main(["train", "--run-id", "r", "--data", "digits", "--store", f"file://{tmp_path}/runs", "--ray-address", web])
        == 2
    )
    err = capsys.readouterr().err
    assert f"a server listens at {web} but it is not a Ray cluster (it answered '<!DOCTYPE', not gRPC)" in err
    assert "`ray start --head` prints" in err and "Prefect API" not in err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(
        ConfigError, match=rf"a server listens at {silent} but it is not a Ray cluster \(it said nothing"
    ):
        check_ray_address(silent, timeout_s=1)


def test_a_ray_address_where_a_ray_head_listens_passes_the_check(ray_address, tmp_path, monkeypatch):
    from flows.runtime import check_ray_address

    check_ray_address(ray_address)  # Ray's GCS answers the HTTP/2 preface: no error
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(ray_address)  # as `ray start --head` records it
    check_ray_address("auto")


def test_a_ray_cluster_that_wants_a_token_this_process_lacks_is_named_without_a_traceback(tmp_path, ray_address):
    """A home without Ray's auth token (another user, a fresh container) joining a cluster was a traceback.

    With the cluster's token in ~/.ray/auth_token and RAY_AUTH_MODE unset, the message said to put the token
    there; the fix is `export RAY_AUTH_MODE=token` (Ray sends no token to an explicit address otherwise).
    """
    token = (Path.home() / ".ray" / "auth_token").read_text()  # the fixture's runtime wants this one

    def join(home: str, *, token_file: str | None, mode: str | None) -> str:
        (tmp_path / home / ".ray").mkdir(parents=True)
        if token_file is not None:
            (tmp_path / home / ".ray" / "auth_token").write_text(token_file)
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")}
        env |= {
            "HOME": str(tmp_path / home),
            "RAY_ADDRESS": ray_address,
            "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
        }
        if mode is not None:
            env["RAY_AUTH_MODE"] = mode
        env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # never reached: Ray is joined first
        command = [sys.executable, "-m", "flows.cli", "train", "--run-id", "r", "--data", "digits"]
        done = subprocess.run(
            [*command, "--store", f"file://{tmp_path}/{home}/runs"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        prefix = f"obliviate train: error: the Ray cluster at {ray_address} "
        assert prefix in done.stderr, done.stderr[-2000:]
        return done.stderr.split(prefix, 1)[1]

    homes = {
        "unset-right-file": (token, None),
        "unset-no-file": (None, None),
        "disabled": (token, "disabled"),
        "token-wrong-file": ("0" * len(token.strip()), "token"),
        "token-no-file": (None, "token"),
    }
    # Each process mostly waits for the cluster's refusal: side by side, not one after another (about 100 s).
    with ThreadPoolExecutor(max_workers=len(homes)) as pool:
        told = dict(
            zip(homes, pool.map(lambda h: join(h, token_file=homes[h][0], mode=homes[h][1]), homes), strict=True)
        )
    said = told["unset-right-file"]
    assert "this process sent none: RAY_AUTH_MODE is not set" in said
    assert "Run `export RAY_AUTH_MODE=token`" in said and "the token in ~/.ray/auth_token" in said
    assert "put it there" not in said
    said = told["unset-no-file"]
    assert "RAY_AUTH_MODE is not set" in said and "`export RAY_AUTH_MODE=token`" in said and "put it there" in said
    said = told["disabled"]
    assert "this process sent none: RAY_AUTH_MODE=disabled" in said and "`export RAY_AUTH_MODE=token`" in said
    said = told["token-wrong-file"]
    assert "refused the authentication token of this process (from ~/.ray/auth_token): it is not the cluster's" in said
    assert "export RAY_AUTH_MODE" not in said
    said = told["token-no-file"]
    assert "has none: RAY_AUTH_MODE=token, but ~/.ray/auth_token" in said and "Put the cluster's token there" in said


def test_submit_names_the_ray_auth_mode_it_has(monkeypatch, tmp_path):
    """submit said "(RAY_AUTH_MODE=disabled)" when the variable was not set at all."""
    from flows.cli.submit import _refused_message

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    said = _refused_message("http://h:8265")
    assert "RAY_AUTH_MODE is not set" in said and "disabled" not in said and "`export RAY_AUTH_MODE=token`" in said
    assert said.endswith("Nothing was sent to the cluster.")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert "this shell's Jobs client sent none: RAY_AUTH_MODE=disabled" in _refused_message("http://h:8265")


def test_submit_refuses_a_job_that_is_not_an_obliviate_command_before_contacting_a_cluster(tmp_path, capsys):
    # no cluster runs at this address: a refusal naming the job proves the check came first
    nowhere = ["submit", "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path)]
    for job, said in (
        (["nosuch"], "No such command 'nosuch'"),
        (["train", "--blocks", "x"], "'x' is not a valid integer"),
    ):
        assert main([*nowhere, "--", *job]) == 2
        err = capsys.readouterr().err
        assert said in err and "the job after '--' must be an obliviate command line" in err
        assert "no Ray cluster answers" not in err
    assert main([*nowhere, "--timeout", "0", "--", "train", "--run-id", "a"]) == 2
    assert "--timeout is the most seconds to wait for the job and must be > 0" in capsys.readouterr().err
    assert main(["submit", "--working-dir", str(tmp_path / "nope"), "--", "train", "--run-id", "a"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_a_local_ray_runtime_that_fails_to_start_is_named_without_a_traceback(tmp_path):
    """Under load, Ray's fixed 30 s node registration ran out and `tune` ended in Ray's raw traceback.

    Here Ray's own start-up fails for real, at once: the folder it keeps its sessions under is a file.
    """
    not_a_folder = tmp_path / "ray-tmp"
    not_a_folder.write_text("")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a local runtime, started here
    env |= {
        "RAY_TMPDIR": str(not_a_folder),
        "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
        "PREFECT_API_URL": "http://127.0.0.1:9/api",  # nothing listens: never reached, Ray fails first
    }
    command = [sys.executable, "-m", "flows.cli", "train", "--run-id", "r", "--data", "digits"]
    done = subprocess.run(
        [*command, "--store", f"file://{tmp_path}/runs"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    [said] = [line for line in done.stderr.splitlines() if line.startswith("obliviate train: error: ")]
    assert said.startswith("obliviate train: error: could not start a local Ray runtime: ")
    assert str(not_a_folder) in said  # Ray's own reason, passed on
    assert "load average" in said and "run the command again" in said and "--ray-address / RAY_ADDRESS" in said
    # the fix fits the cause: a session folder Ray cannot write, not a busy machine
    assert f"under {not_a_folder} (RAY_TMPDIR, default /tmp): make it a writable folder" in said
    assert "less busy" not in said
    assert "Traceback" not in done.stderr


def test_what_mends_a_failed_local_ray_start_follows_ray_s_error():
    from flows.runtime import _local_start_fix

    assert "less busy" in _local_start_fix(Exception("The current node timed out during startup."))
    assert "RAY_TMPDIR" in _local_start_fix(NotADirectoryError(20, "Not a directory"))
    assert "less busy" not in _local_start_fix(RuntimeError("port 6379 is taken"))
    assert "mend what Ray's reason above names" in _local_start_fix(RuntimeError("port 6379 is taken"))


def test_ctrl_c_stops_serve_with_one_sentence(tmp_path, prefect_api_url, ray_address):
    """Ctrl-C is how serve is stopped (as `obliviate ui`): exit 0 and a sentence; it printed nothing."""
    import signal
    import time

    url = f"file://{tmp_path}/store"
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "RAY_ADDRESS": ray_address}
    command = [sys.executable, "-m", "flows.cli", "serve", "--store", url, "--audit-cron", "off"]
    serve = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "store" / "service" / "endpoint.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # past the announcement: the runner is serving
        serve.send_signal(signal.SIGINT)
        code = serve.wait(timeout=60)
    finally:
        serve.kill()
    err = serve.stderr.read()
    assert code == 0 and f"obliviate serve: stopped; {url} is no longer served" in err, err[-3000:]
    assert "Traceback" not in err


def test_train_refuses_a_run_id_trained_with_other_options_before_a_server_starts(
    tmp_path, tiny_run, monkeypatch, capsys, caplog
):
    """It was refused by the worker, after Prefect and Ray had started, with a failed flow run left behind."""
    from actors.chains import ChainWorker
    from flows.train import run_spec

    url = f"file://{tmp_path}/store"
    ObjectStore(url).ensure_container()
    ChainWorker(url).train(run_spec(run_id="r", split_seed=0, **tiny_run(blocks=2)))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: no server may be needed
    caplog.set_level("INFO")
    options = ["--train-size", "400", "--heldout-size", "200", "--epochs", "1", "--batch-size", "32"]
    options += ["--lr", "0.01", "--schedule", "constant"]
    assert main(["train", "--store", url, "--run-id", "r", "--data", "digits", "--blocks", "3", *options]) == 2
    err = capsys.readouterr().err
    assert "run 'r' already exists" in err and "config.num_blocks: 2 stored, 3 asked" in err, err
    assert main(["train", "--store", url, "--run-id", "r", "--data", "digits", "--shards", "2", *options]) == 2
    assert "run 'r' is already trained as a single chain; this asks for 2 shards" in capsys.readouterr().err
    assert "Prefect API" not in err and not [r for r in caplog.records if r.name.startswith("prefect")]


def test_the_write_check_leaves_nothing_behind(tmp_path, moto_endpoint):
    local = tmp_path / "fresh"
    assert prepare_store(f"file://{local}", write=True) == f"file://{local}"
    assert list(local.iterdir()) == []  # no service/ folder, no probe object: the store is as created
    import s3fs

    bucket = f"fresh-{uuid.uuid4().hex[:10]}"
    prepare_store(f"s3://{bucket}/runs", write=True)
    s3fs.S3FileSystem.clear_instance_cache()
    assert s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_endpoint}).find(bucket) == []


def test_a_forget_whose_ledger_write_fails_names_the_request_to_look_up_or_repeat(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    store = tmp_path / "store"
    (store / "ledger").mkdir(parents=True)
    (store / "ledger" / "requests").write_text("")  # a file where the ledger's folder goes: every write fails
    args = ["forget", "--store", f"file://{store}", "--ids", "3", "--data", "digits", "--no-event"]
    assert main(args) == 2
    err = capsys.readouterr().err
    request = re.search(r"Request (del-[0-9a-f]{16}) may or may not be recorded", err)
    assert request is not None, err
    assert f"--request-id {request.group(1)} is safe" in err and f"forget --status {request.group(1)}" in err
    assert main([*args, "--request-id", "ticket-77"]) == 2
    assert "Request ticket-77 may or may not be recorded" in capsys.readouterr().err


def test_a_failed_job_whose_python_lacks_a_dependency_is_said_so():
    """submit -- ... on a cluster whose python lacks typer ended in 'job ...: FAILED' after the traceback only."""
    from flows.cli.submit import _MISSING_DEPENDENCIES, _missing_import

    traceback = 'Traceback (most recent call last):\n  File "<frozen runpy>", line 198\n'
    assert _missing_import(traceback + "ModuleNotFoundError: No module named 'typer'\n")
    assert _missing_import(traceback + "ImportError: cannot import name 'x' from 'torch'\n")
    assert not _missing_import(traceback + "ModuleNotFoundError: No module named 'flows'\n")  # the upload's own
    assert not _missing_import("obliviate reduce: error: --k must be >= 1\n")
    assert "lacks obliviate's dependencies" in _MISSING_DEPENDENCIES and "py_executable" in _MISSING_DEPENDENCIES
    assert "setup_commands" in _MISSING_DEPENDENCIES
