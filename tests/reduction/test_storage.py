"""Storage contract, run against local disk and a moto S3 server alike."""

from __future__ import annotations

import io
import os
import pickle
import socket
import threading
import uuid

import numpy as np
import pytest
import torch

from storage import CorruptObject, ObjectNotFound, ObjectStore, PointerConflict, StorageUnavailable
from storage.objects import COMMIT_SUFFIX


def _raw_fs_and_path(store: ObjectStore, key: str):
    """The backend filesystem and path of ``key``: used only to simulate crashes and damage."""
    return store._fs, store._path(key)


def test_bytes_roundtrip_exists_and_list(store):
    info = store.put_bytes("a/b/one.bin", b"hello")
    store.put_bytes("a/two.bin", b"")
    store.put_bytes("other.bin", b"x")
    assert store.get_bytes("a/b/one.bin") == b"hello"
    assert store.get_bytes("a/two.bin") == b""
    assert info.size == 5 and len(info.sha256) == 64
    assert store.exists("a/b/one.bin") and not store.exists("a/b/missing.bin")
    assert store.list("a") == ["a/b/one.bin", "a/two.bin"]
    assert store.list() == ["a/b/one.bin", "a/two.bin", "other.bin"]
    assert store.list("nothing/here") == []


def test_array_json_torch_roundtrip(store):
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    store.put_array("m.npy", array)
    back = store.get_array("m.npy")
    assert back.dtype == np.float32 and np.array_equal(back, array)
    store.put_json("cfg.json", {"k": 600, "bins": [256]})
    assert store.get_json("cfg.json") == {"k": 600, "bins": [256]}
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(3)}
    store.put_torch("ckpt.pt", state)
    loaded = store.get_torch("ckpt.pt")
    assert torch.equal(loaded["w"], state["w"]) and int(loaded["step"]) == 3


class _CodeCarrier:
    def __reduce__(self):
        return (os.getcwd, ())


def test_torch_pickle_with_code_is_refused(store):
    buffer = io.BytesIO()
    torch.save({"payload": _CodeCarrier()}, buffer)
    store.put_bytes("evil.pt", buffer.getvalue())
    with pytest.raises(CorruptObject, match="weights_only=True"):
        store.get_torch("evil.pt")


def test_missing_object_is_object_not_found(store):
    with pytest.raises(ObjectNotFound) as caught:
        store.get_bytes("never/written.bin")
    assert isinstance(caught.value, FileNotFoundError)


def test_failed_write_leaves_nothing_visible(store):
    def chunks():
        yield b"first half"
        raise RuntimeError("producer crashed mid-write")

    with pytest.raises(RuntimeError, match="crashed"):
        store.put_chunks("half.bin", chunks())
    assert not store.exists("half.bin")
    assert store.list() == []
    with pytest.raises(ObjectNotFound):
        store.get_bytes("half.bin")


def test_data_without_commit_record_is_invisible(store):
    # A writer that died after its data write but before the commit record.
    fs, path = _raw_fs_and_path(store, "crashed.bin")
    fs.makedirs(os.path.dirname(path), exist_ok=True) if store.is_local else None
    fs.pipe_file(path, b"orphan data")
    assert not store.exists("crashed.bin")
    assert store.list() == []
    with pytest.raises(ObjectNotFound):
        store.get_bytes("crashed.bin")


def test_corrupted_object_is_detected(store):
    store.put_array("tile.npy", np.ones((4, 4), dtype=np.float32))
    fs, path = _raw_fs_and_path(store, "tile.npy")
    damaged = bytearray(fs.cat_file(path))
    damaged[-1] ^= 0xFF
    fs.pipe_file(path, bytes(damaged))
    with pytest.raises(CorruptObject) as caught:
        store.get_array("tile.npy")
    assert isinstance(caught.value, ValueError)


def test_read_racing_a_rewrite_returns_one_whole_version(store):
    # A serve's announcement and heartbeat are rewritten in place while other processes read them.
    # A read caught between a rewrite's data and its commit record must read again, not report damage.
    # Here a rewrite every 0.1 s (a serve's heartbeat comes every few seconds) and reads back to back.
    versions = [{"pid": 1, "pad": ""}, {"pid": 2, "pad": "x" * 40}]
    store.put_json("service/endpoint.json", versions[0])
    stop = threading.Event()
    rewrites = [0]

    def rewrite() -> None:
        writer = ObjectStore(store.url)
        while not stop.wait(0.1):
            writer.put_json("service/endpoint.json", versions[(rewrites[0] + 1) % 2])
            rewrites[0] += 1

    thread = threading.Thread(target=rewrite)
    thread.start()
    seen: list = []
    try:
        # Both counts, not one: on a loaded host a read that waits out a race can take longer than a rewrite.
        while rewrites[0] < 20 or len(seen) < 20:
            seen.append(store.get_json("service/endpoint.json"))
    finally:
        stop.set()
        thread.join()
    assert all(body in versions for body in seen)
    assert len(seen) >= 20 and rewrites[0] >= 20


def test_truncated_commit_record_is_corrupt(store):
    store.put_bytes("x.bin", b"abc")
    fs, path = _raw_fs_and_path(store, "x.bin")
    fs.pipe_file(path + COMMIT_SUFFIX, b"{not json")
    with pytest.raises(CorruptObject):
        store.get_bytes("x.bin")


def test_manifest_publishes_members_with_checksums(store):
    a = store.put_array("run/subset.npy", np.array([3, 1, 2]))
    b = store.put_json("run/summary.json", {"h": 1.5})
    store.commit_manifest("run/manifest.json", {"subset": a, "summary": b}, {"k": 3})
    manifest = store.read_manifest("run/manifest.json")
    assert manifest.metadata == {"k": 3}
    assert np.load(io.BytesIO(store.get_member(manifest, "subset"))).tolist() == [3, 1, 2]
    # A member rewritten after publication no longer matches its manifest.
    store.put_json("run/summary.json", {"h": 99.0})
    with pytest.raises(CorruptObject, match="manifest"):
        store.get_member(manifest, "summary")


def test_pointer_compare_and_swap(store):
    assert store.read_pointer("models/current") is None
    first = store.swap_pointer("models/current", {"version": "v1"}, expected_version=0)
    assert first.version == 1
    second = store.swap_pointer("models/current", {"version": "v2"}, expected_version=1)
    assert second.version == 2
    with pytest.raises(PointerConflict, match="version 2"):
        store.swap_pointer("models/current", {"version": "stale"}, expected_version=1)
    current = store.read_pointer("models/current")
    assert current.version == 2 and current.target == {"version": "v2"}


def test_pointers_as_exactly_once_records(store):
    store.swap_pointer("ledger/req-1", {"status": "pending"}, expected_version=0)
    store.swap_pointer("ledger/req-2", {"status": "pending"}, expected_version=0)
    with pytest.raises(PointerConflict):  # the same request id again
        store.swap_pointer("ledger/req-1", {"status": "pending"}, expected_version=0)
    store.swap_pointer("ledger/req-1", {"status": "done"}, expected_version=1)
    store.put_json("ledger/readme.json", {"not": "a pointer"})
    assert store.list_pointers("ledger") == ["ledger/req-1", "ledger/req-2"]
    assert store.read_pointer("ledger/req-1").target == {"status": "done"}


def test_pointer_versions_are_create_if_absent(store):
    # The primitive under swap_pointer: a second create of the same version must fail on the
    # backend itself (O_EXCL / If-None-Match), not only in our version check.
    store.swap_pointer("p", {"n": 1}, expected_version=0)
    path = store._path("p/v000000002.json")
    store._create_exclusive(path, b"{}")
    with pytest.raises(FileExistsError):
        store._create_exclusive(path, b"{}")
    late = ObjectStore(store.url)
    with pytest.raises(PointerConflict):
        late.swap_pointer("p", {"n": "late"}, expected_version=1)


def test_store_pickles_without_credentials(store):
    clone = pickle.loads(pickle.dumps(store))
    store.put_bytes("k.bin", b"v")
    assert clone.get_bytes("k.bin") == b"v"
    assert b"testing" not in pickle.dumps(store)


def test_bad_keys_and_urls_are_rejected(tmp_path):
    store = ObjectStore(f"file://{tmp_path}")
    for key in ["", "../escape", "a//b", "x.sha256"]:
        with pytest.raises(ValueError):
            store.put_bytes(key, b"")
    with pytest.raises(ValueError, match="scheme"):
        ObjectStore("gs://bucket")
    assert ObjectStore("file://./runs").url == f"file://{os.path.abspath('runs')}"
    # these became local folders named 's3:/bucket', 'file:relative' or 's3:', silently
    for typo, fix in (("s3:/bucket", "Write s3://bucket"), ("file:relative", "Write file://relative")):
        with pytest.raises(ValueError, match=f"with '//' after the scheme; got '{typo}'. {fix}"):
            ObjectStore(typo)
    # `file:/tmp/x` was told "Write file://tmp/x", which is the relative ./tmp/x, another folder
    with pytest.raises(ValueError) as refused:
        ObjectStore("file:/tmp/obliviate-x")
    assert "Write file:///tmp/obliviate-x for the folder /tmp/obliviate-x (or ./file:/tmp/obliviate-x " in str(
        refused.value
    )
    assert "file://tmp/" not in str(refused.value)
    with pytest.raises(ValueError, match="must name a bucket"):
        ObjectStore("s3://")
    with pytest.raises(ValueError, match="a file store URL must name a folder"):  # it became a folder 'file:'
        ObjectStore("file://")
    assert ObjectStore(f"file://{tmp_path}/").url == f"file://{tmp_path}"
    assert ObjectStore("./a:b").url == f"file://{os.path.abspath('a:b')}"  # the way to name such a folder


def test_an_endpoint_without_a_scheme_is_refused_with_the_fix(monkeypatch):
    """`AWS_ENDPOINT_URL=127.0.0.1:9000` was a botocore traceback ("Invalid endpoint") from deep inside a call."""
    for typo, fix in (("127.0.0.1:9000", "Write http://127.0.0.1:9000"), ("notaurl", "Write http://notaurl")):
        monkeypatch.setenv("AWS_ENDPOINT_URL", typo)
        with pytest.raises(ValueError, match=f"AWS_ENDPOINT_URL must be an http\\(s\\) URL .*got '{typo}'. {fix}"):
            ObjectStore("s3://bucket/prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://")
    with pytest.raises(ValueError, match="with a host"):
        ObjectStore("s3://bucket/prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")  # empty: AWS S3 itself, as when unset
    ObjectStore("s3://bucket/prefix")
    ObjectStore("file://./runs")  # a file store never reads it


def test_unreachable_s3_is_storage_unavailable(monkeypatch, moto_endpoint):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead_port}")
    store = ObjectStore("s3://bucket/prefix")
    with pytest.raises(StorageUnavailable) as caught:
        store.put_bytes("k.bin", b"v")
    assert isinstance(caught.value, ConnectionError)
    with pytest.raises(StorageUnavailable):
        store.get_bytes("k.bin")
    # a reader asks whether the bucket exists first: s3fs's exists() said False, so `store check` and
    # `target serve --run` answered "store does not exist" during an outage
    with pytest.raises(StorageUnavailable, match="is unreachable"):
        store.container_exists()


def test_an_empty_bucket_exists_and_a_missing_one_does_not(s3_store):
    """container_exists asks S3 for the bucket itself; an empty bucket must still count."""
    import s3fs

    bucket = s3_store.url.removeprefix("s3://").split("/", 1)[0]
    empty = f"empty-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(empty)
    assert ObjectStore(f"s3://{empty}/p").container_exists()
    assert ObjectStore(f"s3://{bucket}/p").container_exists()
    assert not ObjectStore(f"s3://missing-{uuid.uuid4().hex[:8]}/p").container_exists()


def test_a_reader_of_the_wrong_kind_and_a_writer_of_the_wrong_type_get_clear_errors(store):
    from obliviate.errors import ConfigError

    store.put_json("cfg.json", {"count": np.int64(3), "rate": np.float32(0.5), "ok": np.bool_(True)})
    assert store.get_json("cfg.json") == {"count": 3, "rate": 0.5, "ok": True}  # numpy scalars stored as numbers
    store.put_array("m.npy", np.arange(3))
    with pytest.raises(CorruptObject, match="not a .npy array"):
        store.get_array("cfg.json")
    with pytest.raises(CorruptObject, match="not JSON"):
        store.get_json("m.npy")
    with pytest.raises(ConfigError, match="cannot be stored as JSON"):
        store.put_json("bad.json", {"model": object()})
    with pytest.raises(ConfigError, match="stores bytes; got str"):
        store.put_bytes("text.bin", "hello")
    for key in ("a\\b.json", "a/b\x00.json", "line\nbreak"):
        with pytest.raises(ConfigError, match="backslash or a control character"):
            store.put_bytes(key, b"x")
    assert store.list() == ["cfg.json", "m.npy"]


def test_file_localhost_url_names_an_absolute_path(tmp_path):
    assert ObjectStore(f"file://localhost{tmp_path}").url == f"file://{tmp_path}"
    assert ObjectStore("file://localhost/").url == "file:///"
