"""`obliviate target train`'s --arch and --out rules (probe107 item 9)."""

from __future__ import annotations

import pytest


def test_an_architecture_the_help_does_not_name_is_refused_and_c3f2_is_not_given_lenets_time(tmp_path, capsys):
    """`--arch resnet18` was taken though --help says lenet5 or c3f2; it ran past 120 s while its start line
    quoted LeNet-5's 9 s."""
    from flows.cli import main

    out = tmp_path / "t.pt"
    with pytest.raises(SystemExit) as stopped:
        main(["target", "train", "--arch", "resnet18", "--out", str(out), "--steps", "1"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert (
        "Invalid value for '--arch': a target is lenet5 or c3f2, the architectures steal's substitutes take; got "
        "'resnet18'. Give --arch c3f2, or leave --arch out for lenet5." in err
    )
    assert "Traceback" not in err and not out.exists()
    assert main(["target", "train", "--arch", "c3f2", "--out", str(out), "--train-size", "50", "--steps", "1"]) == 0
    said = capsys.readouterr().err
    assert "training c3f2 on 50 images of mnist5k, 1 Adam steps (1,500 took 385 s end to end" in said
    assert "took 9 s" not in said


def test_an_existing_out_is_replaced_only_with_overwrite(tmp_path, capsys):
    """`--train-size 10` replaced a trained runs/target.pt (93 %) with a 39.8 % one, without a word."""
    from flows.cli import main

    out = tmp_path / "t.pt"
    assert main(["target", "train", "--out", str(out), "--train-size", "50", "--steps", "1"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["target", "train", "--out", str(out), "--train-size", "60", "--steps", "1", "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert (
        f"--out {str(out)!r} already exists; target train does not replace a file unless told to. Add --overwrite to "
        "replace it, or give another --out." in err
    )
    assert "training" not in err and "Traceback" not in err
    assert out.read_bytes() == before
    options = ["--out", str(out), "--train-size", "60", "--steps", "1", "--seed", "1", "--overwrite"]
    assert main(["target", "train", *options]) == 0
    assert out.read_bytes() != before
