"""Commands that start Ray print no Ray noise; a Ctrl-C'd `train` says only its own sentence (probe 107).

Every such command began with Ray 2.60's "WARNING ... Token authentication is enabled for this Ray cluster. Set
RAY_AUTH_MODE=disabled to opt out" and "INFO ... Started a local Ray instance.", and a `train` stopped by Ctrl-C
printed "(raylet) Task ChainWorker.train failed. There are 2 retries remaining, so the task will be retried. Error:
The actor is dead because it was killed by `ray.kill`." before "obliviate train: interrupted. ...". A real
`obliviate train` runs in a subprocess here, with a fresh HOME (so Ray also makes its token, which it still says).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
NOISE = (
    "Token authentication is enabled for this Ray cluster",
    "Started a local Ray instance",
    "(raylet)",
    "will be retried",
)


def _train(url: str, run_id: str, tiny_run, **changes) -> list[str]:
    options = tiny_run(blocks=2, train_size=200, heldout_size=100, **changes)
    words = ["train", "--store", url, "--run-id", run_id]
    for name in ("data", "model", "blocks", "epochs", "batch_size", "train_size", "heldout_size", "seed"):
        words += [f"--{name.replace('_', '-')}", str(options[name])]
    return [sys.executable, "-m", "flows.cli", *words]


def _env(prefect_api_url: str, home: Path) -> dict[str, str]:
    # a fresh local runtime, as a user's command starts one (RAY_ADDRESS of other tests would join theirs)
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    home.mkdir(exist_ok=True)
    return env | {"PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_api_url, "HOME": str(home)}


def _noise(said: str) -> list[str]:
    return [line for line in said.splitlines() if any(words in line for words in NOISE)]


def test_train_prints_no_ray_start_noise(tmp_path, prefect_api_url, tiny_run) -> None:
    done = subprocess.run(
        _train(f"file://{tmp_path}/store", "quiet", tiny_run),
        cwd=REPO,
        env=_env(prefect_api_url, tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-3000:]
    assert "run quiet: version 1" in said, said[-3000:]
    assert _noise(said) == [], said[-3000:]
    # what is not noise still shows: Ray made this HOME's token and says where it put it
    assert "Generated new authentication token" in said, said[-3000:]


def test_a_train_stopped_by_ctrl_c_says_only_its_own_sentence(tmp_path, prefect_api_url, tiny_run) -> None:
    store = tmp_path / "store"
    process = subprocess.Popen(
        _train(f"file://{store}", "stopped", tiny_run, epochs=600),  # blocks of seconds: SIGINT lands in block 1
        cwd=REPO,
        env=_env(prefect_api_url, tmp_path / "home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # Ray printed its line on stdout
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(store.glob("runs/stopped/chains/*/ckpt-0000.pt")):  # M_0 stored: block 1 is training
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no checkpoint 0 of run stopped: {process.communicate(timeout=60)[0][-3000:]}")
            time.sleep(0.2)
        time.sleep(2.0)
        process.send_signal(signal.SIGINT)
        said, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, said[-3000:]
    assert "obliviate train: interrupted." in said, said[-3000:]
    assert _noise(said) == [], said[-3000:]
