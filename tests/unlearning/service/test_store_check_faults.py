"""`store check` on a store a fault left behind (fast; a local store, faults made by hand or by a
file-size limit in a child process): write checks and failed writes leave nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from storage import ObjectStore
from storage.errors import WriteFailed

REPO = Path(__file__).resolve().parents[3]


def _root(store_url: str) -> Path:
    return Path(store_url.removeprefix("file://"))


def _with_file_size_limit(store_url: str, limit: int, call: str) -> str:
    """Run ``call`` (``store``: the store) in a child process that cannot write past ``limit`` bytes per file.

    A real failed write, as on a full disk (EFBIG instead of ENOSPC), without root.
    """
    code = (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))\n"
        "from storage.objects import ObjectStore\n"
        "from storage.ledger import DeletionLedger\n"
        f"store = ObjectStore({store_url!r})\n"
        "try:\n"
        f"    {call}\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ----- write checks and failed writes leave nothing (probe defect 6a) ---------------------------


def test_a_failed_write_check_leaves_nothing(store_url):
    """A write check that failed (a full disk) left an empty `.tmp-write-check-<hex>` at the store's
    root (forget, verify and store check --repair each left one); now nothing is left, nor does a
    pointer version whose write fails leave its temporary file."""
    store = ObjectStore(store_url)
    store.ensure_container()
    said = _with_file_size_limit(store_url, 0, "store.check_writable()")
    assert said.startswith(WriteFailed.__name__), said
    assert os.listdir(_root(store_url)) == []

    said = _with_file_size_limit(store_url, 40, "store.swap_pointer('p', {'x': 'y' * 100}, expected_version=0)")
    assert said.startswith(WriteFailed.__name__), said
    assert [name for name in store.stored_names("") if ".tmp-" in name] == []  # the pointer's temporary file
