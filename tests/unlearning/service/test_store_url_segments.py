"""A store URL with an empty path segment (``//`` inside it) is refused before anything is written.

``train --store s3://p77//dbl2`` exited 0 and wrote keys starting ``/dbl2/``; ``verify``, ``forget`` and
``store check`` with the same URL then listed the store under ``p77//dbl2`` but read under ``p77/dbl2``,
so the run could never be verified nor forgotten from.
"""

from __future__ import annotations

import uuid

import pytest

from flows.cli import main
from obliviate.errors import ConfigError
from storage import ObjectStore


@pytest.fixture
def bucket(moto_endpoint):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    name = f"seg-{uuid.uuid4().hex[:10]}"
    ObjectStore(f"s3://{name}/x").ensure_container()
    return name


def _bucket_keys(bucket: str) -> list[str]:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True).find(bucket)


@pytest.mark.parametrize(
    "given, fixed",
    [
        ("s3://{bucket}//dbl2", "s3://{bucket}/dbl2"),
        ("s3://{bucket}/a//b/", "s3://{bucket}/a/b"),
        ("s3:///{bucket}/prod", "s3://{bucket}/prod"),
    ],
)
def test_an_s3_url_with_an_empty_segment_is_refused_with_the_url_to_write(bucket, given, fixed):
    url = given.format(bucket=bucket)
    with pytest.raises(ConfigError) as refused:
        ObjectStore(url)
    said = str(refused.value)
    assert "must not have an empty path segment" in said and repr(url.rstrip("/")) in said, said
    assert f"Write {fixed.format(bucket=bucket)}." in said, said
    assert _bucket_keys(bucket) == []


def test_a_file_url_with_an_empty_segment_is_refused_too(tmp_path):
    for url, fixed in (
        (f"file://{tmp_path}//store", f"file://{tmp_path}/store"),
        (f"file:///{tmp_path}/store", f"file://{tmp_path}/store"),  # file:////tmp/... : '//tmp' to POSIX
        ("file://./runs//x", "file://./runs/x"),
    ):
        with pytest.raises(ConfigError, match=f"empty path segment .*got '{url}'. Write {fixed}."):
            ObjectStore(url)
    # the spellings that stay accepted: a trailing slash, an absolute path, a relative one
    assert ObjectStore(f"file://{tmp_path}/store/").url == f"file://{tmp_path}/store"
    assert ObjectStore("s3://bucket/prefix/").url == "s3://bucket/prefix"


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--run-id", "dbl", "--data", "digits", "--blocks", "3", "--epochs", "1"],
        ["forget", "--ids", "5", "--data", "digits", "--no-event"],
    ],
)
def test_train_and_forget_refuse_it_with_exit_2_and_write_nothing(bucket, tmp_path, capsys, command):
    s3 = f"s3://{bucket}//dbl2"
    assert main([*command, "--store", s3]) == 2
    err = capsys.readouterr().err
    assert f"got '{s3}'. Write s3://{bucket}/dbl2." in err and "Traceback" not in err, err
    assert _bucket_keys(bucket) == []
    local = f"file://{tmp_path}//runs"
    assert main([*command, "--store", local]) == 2
    assert f"Write file://{tmp_path}/runs." in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
