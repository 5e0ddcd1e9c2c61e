"""Options that take a local path refuse a URL: ``--out s3://bucket/p`` wrote to the folder ``./s3:/bucket/p``.

``reduce --out``, ``target train --out`` and ``steal --out`` took any string as a path, so an object-storage URL became a
folder named ``s3:`` under the current one, and the command said it wrote to ``s3:/bucket/p``.
"""

from __future__ import annotations

import pytest

from flows.cli import main


@pytest.mark.parametrize("url", ["s3://bucket/prefix", "file:///tmp/elsewhere", "gs://bucket/p"])
@pytest.mark.parametrize(
    ("command", "what", "fix"),
    [
        (["reduce", "--data", "digits", "--k", "5", "--workers", "0"], "a local folder for results", "give --store"),
        (["target", "train", "--data", "digits"], "the checkpoint's file", "Train to a local path"),
        (
            ["steal", "--target", "http://127.0.0.1:9/predict", "--pool", "digits"],
            "the report's folder",
            "to a local folder",
        ),
    ],
)
def test_a_url_where_a_local_path_is_taken_is_refused_and_nothing_is_written(
    tmp_path, monkeypatch, capsys, command, what, fix, url
):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--out", url]) == 2
    err = capsys.readouterr().err
    assert f"--out is {what}, a path on this machine, not a URL; got {url!r}" in err and fix in err
    assert list(tmp_path.iterdir()) == []  # no ./s3: (or ./file:, ./gs:) folder


def test_a_local_path_that_merely_holds_a_colon_is_still_a_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["reduce", "--data", "digits", "--k", "5", "--starts", "4", "--workers", "0", "--out", "a:b"]) == 0
    assert (tmp_path / "a:b").is_dir()
