"""A full disk under a command's local outputs (target train's checkpoint, steal's report) is one line, not a traceback.

The fault is real and needs no root: the file a writer writes first (``.NAME.partial-PID`` beside the
final name) is made a symlink to ``/dev/full``, where every write fails with ENOSPC.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from obliviate.extraction.target import save_checkpoint
from obliviate.files import OutputWriteFailed

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def _full_disk_under(final: Path) -> Path:
    """The partial file of ``final`` (this process's) made a way to a full disk."""
    partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
    partial.symlink_to("/dev/full")
    return partial


def test_a_checkpoint_on_a_full_disk_is_refused_in_words_and_the_previous_one_kept(tmp_path):
    path = tmp_path / "target.pt"
    model = torch.nn.Linear(3, 2)
    save_checkpoint(path, model=model, arch="lenet5", meta={"version": 1})
    before = path.read_bytes()
    partial = _full_disk_under(path)
    # torch.save itself says only "RuntimeError: [enforce fail at inline_container.cc] unexpected pos ..."
    with pytest.raises(OutputWriteFailed) as caught:
        save_checkpoint(path, model=model, arch="lenet5", meta={"version": 2})
    said = str(caught.value)
    assert said.startswith(f"could not write {path}: the disk is full ([Errno 28] No space left on device)"), said
    assert "free space on that disk, or choose another path (--out)" in said
    assert "The model was not saved anywhere else" in said
    assert isinstance(caught.value, OSError)
    assert path.read_bytes() == before
    assert not partial.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["target.pt"]


def test_cli_target_train_on_a_full_disk_says_one_line(tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "t.pt"
    _full_disk_under(out)
    code = main(["target", "train", "--data", "digits", "--out", str(out), "--steps", "1", "--train-size", "50"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "inline_container" not in err, err
    assert f"obliviate target train: error: could not write {out}: the disk is full" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_steal_report_on_a_full_disk_is_refused_in_words_and_the_previous_report_kept(tmp_path):
    from flows.audit import write_outputs

    files = {"json": ("steal.json", b"{}"), "markdown": ("steal.md", b"# new"), "png": ("steal.png", b"png")}
    write_outputs(str(tmp_path), {key: (name, b"old") for key, (name, _) in files.items()})
    _full_disk_under(tmp_path / "steal.md")
    with pytest.raises(OutputWriteFailed) as caught:
        write_outputs(str(tmp_path), files)
    said = str(caught.value)
    assert said.startswith(f"could not write {tmp_path / 'steal.md'}: the disk is full"), said
    assert "choose another path (--out)" in said and "results were not saved anywhere else" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steal.json", "steal.md", "steal.png"]
    assert all((tmp_path / name).read_bytes() == b"old" for name, _ in files.values())


def test_a_steal_report_on_a_full_disk_says_where_its_finished_cells_are_kept(tmp_path):
    """The error said the audit's results were kept beside the report even when none had been written there."""
    from flows.audit import FinishedCells, write_outputs

    kept = FinishedCells(str(tmp_path), fingerprint="f" * 64)
    assert kept.keep({"attack": "basic", "selector": "random", "budget": 15, "seed": 0}, {"accuracy": 0.9}) is None
    files = {"json": ("steal.json", b"{}"), "markdown": ("steal.md", b"# new")}
    _full_disk_under(tmp_path / "steal.md")
    with pytest.raises(OutputWriteFailed) as caught:
        write_outputs(str(tmp_path), files, kept=kept)
    said = str(caught.value)
    assert said.endswith(f"Its finished cells are kept in {kept.folder}: the same command again takes them."), said
    assert "not saved anywhere else" not in said


def test_cli_target_train_that_cannot_write_leaves_no_folder_it_made(tmp_path):
    """The checkpoint's folder is made before training (so a bad --out fails in seconds); a write that then
    fails took it away again. The fault is real: a file size limit (RLIMIT_FSIZE) lets folders be made and
    the checkpoint's bytes fail (EFBIG)."""
    import subprocess
    import sys

    out = tmp_path / "new" / "deeper" / "t.pt"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "from flows.cli import main\n"
        f"sys.exit(main(['target', 'train', '--data', 'digits', '--out', {str(out)!r}, '--steps', '1',"
        " '--train-size', '50']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"obliviate target train: error: could not write {out}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
