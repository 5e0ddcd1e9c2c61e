"""The README's by-hand reconcile recipe leaves no Prefect server behind when its python is killed outright.

The recipe called ``reconcile_flow`` bare: Prefect then started its own temporary server (``uvicorn
prefect.server...``), which a ``kill -9`` of the python left running, reparented to PID 1, for good.
The recipe now runs the flow inside ``flows.runtime.prefect_api()``, whose server dies with its process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def by_hand_recipe() -> str:
    section = (ROOT / "README.md").read_text().split("### Reconciling by hand", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```text\n(.*?)```", section, flags=re.DOTALL)
    assert block, "the section shows its recipe in a text block"
    lines = block.group(1).splitlines()
    if lines[0].startswith("python - <<"):  # a here-document: the python between it and its end mark
        return "\n".join(lines[1 : lines.index("EOF")])
    return re.fullmatch(r'python -c "(.*)"', lines[0]).group(1)  # the recipe of old


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:  # a zombie its new parent has not reaped yet (a container's init may never) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_by_hand_reconcile_recipe_leaves_no_server_when_killed(tmp_path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    code = by_hand_recipe().replace("file://./runs", f"file://{store}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    recipe = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not (servers := _children(recipe.pid)) and recipe.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert servers, "the recipe started no server process"
        time.sleep(2)  # the server under way
        servers += [pid for server in servers for pid in _children(server)]  # and any process it started
        recipe.kill()
        recipe.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [pid for pid in servers if _alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"the recipe's server {left} outlived its killed python by 30 s"
    finally:
        recipe.kill()
