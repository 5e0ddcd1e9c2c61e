"""Loading real data, fingerprints, splits and bad-input errors (issue 2, data)."""

from __future__ import annotations

import gzip
import io
import struct

import numpy as np
import pytest
from PIL import Image

from obliviate.data import ImageDataset, load_dataset, stratified_split, to_gray
from obliviate.errors import DataError


def test_mnist5k_is_real_uint8_mnist_with_500_per_class() -> None:
    data = load_dataset("mnist5k")
    assert data.images.shape == (5000, 28, 28)
    assert data.images.dtype == np.uint8
    assert data.levels == 256
    assert np.bincount(data.labels).tolist() == [500] * 10
    # Real MNIST: mostly background, strokes reach full intensity.
    assert 0.7 < (data.images == 0).mean() < 0.9
    assert data.images.max() == 255


def test_digits_keeps_its_17_levels() -> None:
    data = load_dataset("digits")
    assert data.images.shape == (1797, 8, 8)
    assert data.levels == 17
    assert data.images.max() == 16


def test_npz_round_trip_and_fingerprint(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 6, 6), dtype=np.uint8)
    labels = rng.integers(0, 3, size=20)
    path = tmp_path / "pool.npz"
    np.savez(path, images=images, labels=labels)
    loaded = load_dataset(path)
    assert np.array_equal(loaded.images, images)
    assert np.array_equal(loaded.labels, labels)
    again = ImageDataset("elsewhere", images.copy(), labels.copy(), 256)
    assert loaded.fingerprint == again.fingerprint
    changed = images.copy()
    changed[0, 0, 0] ^= 1
    assert ImageDataset("x", changed, labels, 256).fingerprint != loaded.fingerprint


def test_npz_flat_and_colour_images_are_reshaped_and_grayed(tmp_path) -> None:
    rng = np.random.default_rng(1)
    flat = rng.integers(0, 256, size=(5, 16), dtype=np.uint8)
    np.savez(tmp_path / "flat.npz", x=flat, y=np.arange(5))
    assert load_dataset(tmp_path / "flat.npz").images.shape == (5, 4, 4)
    colour = rng.integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "colour.npz", images=colour, labels=np.arange(5))
    assert np.array_equal(load_dataset(tmp_path / "colour.npz").images, to_gray(colour))
    assert np.array_equal(load_dataset(tmp_path / "colour.npz", gray="mean").images, to_gray(colour, mode="mean"))


def test_luma_and_mean_differ_on_pure_green() -> None:
    green = np.zeros((1, 1, 3), dtype=np.uint8)
    green[..., 1] = 255
    assert to_gray(green)[0, 0] == 150  # round(0.587 * 255)
    assert to_gray(green, mode="mean")[0, 0] == 85


def test_image_folder_layout(tmp_path) -> None:
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels = np.full((5, 5, 3), 40 * (label + 1) + i, dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    data = load_dataset(tmp_path)
    assert data.images.shape == (6, 5, 5)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[4, 0, 0] == 81


def test_torchvision_mnist_raw_idx_folder(tmp_path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">BBBBiii", 0, 0, 8, 3, 2, 3, 3) + images.tobytes())
    with open(raw / "train-labels-idx1-ubyte", "wb") as fh:
        fh.write(struct.pack(">BBBBi", 0, 0, 8, 1, 2) + bytes([7, 3]))
    data = load_dataset(tmp_path)
    assert np.array_equal(data.images, images)
    assert data.labels.tolist() == [7, 3]


def test_idx_files_are_looked_for_where_torchvision_puts_them_not_in_the_whole_tree(tmp_path) -> None:
    """An ImageFolder holding an unrelated IDX file deep inside was read as a broken IDX dataset."""
    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((4, 4), 10 * label, dtype=np.uint8)).save(tmp_path / name / "0.png")
    deep = tmp_path / "cat" / "notes" / "raw"
    deep.mkdir(parents=True)
    (deep / "train-images-idx3-ubyte").write_bytes(b"unrelated")
    data = load_dataset(tmp_path)
    assert data.labels.tolist() == [0, 1] and data.images.shape == (2, 4, 4)
    for where in ("raw", "."):  # root/raw and root itself still hold an IDX dataset
        folder = tmp_path / f"idx-{where.strip('.') or 'root'}"
        raw = folder / where
        raw.mkdir(parents=True, exist_ok=True)
        with open(raw / "train-images-idx3-ubyte", "wb") as fh:
            fh.write(struct.pack(">BBBBiii", 0, 0, 8, 3, 1, 2, 2) + bytes(4))
        with open(raw / "train-labels-idx1-ubyte", "wb") as fh:
            fh.write(struct.pack(">BBBBi", 0, 0, 8, 1, 1) + bytes([5]))
        assert load_dataset(folder).labels.tolist() == [5]


def test_an_unreadable_image_or_a_cut_idx_file_is_named_not_a_traceback(tmp_path) -> None:
    folder = tmp_path / "folder"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / name / "ok.png")
    (folder / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"broken\.png' in dataset folder .* is not a readable image.*remove it"):
        load_dataset(folder)
    raw = tmp_path / "idx" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    # the download stopped 5 bytes early
    (raw / "train-images-idx3-ubyte").write_bytes(struct.pack(">BBBBiii", 0, 0, 8, 3, 2, 3, 3) + images.tobytes()[:-5])
    (raw / "train-labels-idx1-ubyte").write_bytes(struct.pack(">BBBBi", 0, 0, 8, 1, 2) + bytes([7, 3]))
    with pytest.raises(DataError, match=r"holds 13 bytes of data, but its header says \(2, 3, 3\) \(18 bytes\)"):
        load_dataset(tmp_path / "idx")


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda tmp: "mnist6k", "unknown dataset name 'mnist6k'"),
        (lambda tmp: str(tmp / "missing.npz"), "does not exist"),
        (lambda tmp: _write(tmp / "notes.txt", b"hello"), "only .npz files"),
        (
            lambda tmp: _npz(tmp / "f.npz", images=np.zeros((2, 3, 3), np.float32), labels=np.zeros(2, int)),
            "dtype float32",
        ),
        (lambda tmp: _npz(tmp / "s.npz", images=np.zeros((2, 5), np.uint8), labels=np.zeros(2, int)), "square number"),
        (lambda tmp: _npz(tmp / "k.npz", pixels=np.zeros((2, 3, 3), np.uint8)), "must hold arrays"),
        (
            lambda tmp: _npz(tmp / "l.npz", images=np.zeros((2, 3, 3), np.uint8), labels=np.zeros(3, int)),
            "one label per image",
        ),
        (lambda tmp: _mkdir(tmp / "empty"), "neither class sub-folders"),
        (
            lambda tmp: _npz(tmp / "n.npz", images=np.zeros((2, 3, 3), np.uint8), labels=np.array([0, -1])),
            "class indices and must be >= 0; found -1",
        ),
        (
            lambda tmp: _npz(tmp / "r.npz", images=np.zeros((2, 8, 6), np.uint8), labels=np.zeros(2, int)),
            "must be square.*got 8 x 6",
        ),
        (lambda tmp: _write(tmp / "g.npz", b"not a zip"), "not a readable .npz archive"),
        (lambda tmp: _write(tmp / "one.npz", _npy_bytes(np.zeros(3))), "holds one array, not an .npz archive"),
        # each of these was a traceback (an object array, labels up to 10**12) or wrong advice
        (
            lambda tmp: _npz(tmp / "o.npz", images=np.array([object()] * 2, dtype=object), labels=np.zeros(2, int)),
            "holds Python objects",
        ),
        (
            lambda tmp: _npz(tmp / "c.npz", images=np.zeros((2, 3, 3), np.uint8), labels=np.array([0, 10**12])),
            "C at most 10,000 .*found 1000000000000",
        ),
        (
            lambda tmp: _npz(tmp / "u.npz", images=np.full((2, 3, 3), 0.5, np.float32), labels=np.zeros(2, int)),
            r"floats in \[0, 1\]: save \(images \* 255\).round\(\).astype\(np.uint8\)",
        ),
        (
            lambda tmp: _npz(tmp / "w.npz", images=np.full((2, 3, 3), 300, np.int64), labels=np.zeros(2, int)),
            "got dtype int64 with values 300..300",
        ),
        (lambda tmp: _npz(tmp / "e.npz", images=np.zeros((0, 3, 3), np.uint8), labels=np.zeros(0, int)), "no images"),
    ],
)
def test_bad_sources_raise_data_error_naming_the_problem(tmp_path, make_source, message) -> None:
    source = make_source(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset(source)


def test_integer_images_within_0_to_255_are_read_as_gray_levels(tmp_path) -> None:
    images = np.arange(2 * 4 * 4, dtype=np.int64).reshape(2, 4, 4) * 7
    dataset = load_dataset(_npz(tmp_path / "i.npz", images=images, labels=np.array([0, 1])))
    assert dataset.images.dtype == np.uint8 and np.array_equal(dataset.images, images)


def test_levels_above_declared_range_are_rejected() -> None:
    with pytest.raises(DataError, match="below levels=17"):
        ImageDataset("d", np.full((1, 2, 2), 20, np.uint8), np.zeros(1, np.int64), 17)


def test_stratified_split_is_disjoint_balanced_and_seeded() -> None:
    labels = load_dataset("mnist5k").labels
    a, b, c = stratified_split(labels, sizes=(2000, 2000, 1000), rng=np.random.default_rng(3))
    assert len(set(a) | set(b) | set(c)) == 5000
    for part, size in ((a, 2000), (b, 2000), (c, 1000)):
        assert np.bincount(labels[part], minlength=10).tolist() == [size // 10] * 10
    a2, _, _ = stratified_split(labels, sizes=(2000, 2000, 1000), rng=np.random.default_rng(3))
    assert np.array_equal(a, a2)
    with pytest.raises(DataError, match="sum to at most n=5000"):
        stratified_split(labels, sizes=(4000, 2000), rng=np.random.default_rng(0))


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _mkdir(path):
    path.mkdir()
    return path


def test_a_dataset_path_is_named_absolutely_so_other_folders_find_it(tmp_path, monkeypatch) -> None:
    """`tune --data pool.npz` failed every trial (Ray Tune runs trials in their own folders), and a run
    trained on `./pool.npz` stored a name `serve` elsewhere, or a `forget --data pool.npz`, did not match."""
    from flows.cli import parse_args
    from obliviate.data import dataset_source

    _npz(tmp_path / "pool.npz", images=np.zeros((4, 3, 3), np.uint8), labels=np.arange(4))
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path.resolve() / "pool.npz")
    assert dataset_source("pool.npz") == dataset_source("./pool.npz") == absolute
    assert dataset_source("digits") == "digits" and dataset_source("mnist6k") == "mnist6k"  # named, not a path
    parse = parse_args
    assert parse(["train", "--run-id", "r", "--data", "pool.npz"]).data == absolute
    assert parse(["forget", "--data", "./pool.npz", "--ids", "1"]).data == absolute
    assert parse(["tune", "unlearning", "--data", "pool.npz"]).data == absolute
    assert parse(["steal", "--pool", "pool.npz"]).pool == absolute
