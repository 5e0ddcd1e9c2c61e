"""Bad inputs to the data helpers fail at the entrance with a DataError/ConfigError naming the rule."""

from __future__ import annotations

import numpy as np
import pytest

from obliviate.data import ImageDataset, load_dataset, to_gray
from obliviate.errors import ConfigError, DataError


def _tiny(n: int = 30) -> ImageDataset:
    images = np.arange(n, dtype=np.uint8)[:, None, None] * np.ones((1, 4, 4), np.uint8)
    return ImageDataset("tiny", images, np.arange(n, dtype=np.int64) % 3, 256)


def test_subset_takes_a_boolean_mask_as_numpy_does() -> None:
    ds = _tiny()
    mask = np.arange(30) < 5
    sub = ds.subset(mask)
    assert len(sub) == 5
    assert np.array_equal(sub.images, ds.images[mask])
    assert np.array_equal(sub.labels, ds.labels[:5])
    with pytest.raises(DataError, match=r"boolean mask .* shape \(30,\); got \(4,\)"):
        ds.subset(np.array([True, False, True, True]))


@pytest.mark.parametrize("indices", [[-1], [0, 30], np.array([1.0, 2.0])])
def test_subset_refuses_negative_out_of_range_and_non_integer_indices(indices: object) -> None:
    with pytest.raises(DataError, match=r"row indices of 'tiny' must be"):
        _tiny().subset(indices)  # type: ignore[arg-type]


def test_subset_with_valid_indices_is_unchanged() -> None:
    ds = _tiny()
    sub = ds.subset([3, 1, 1])
    assert sub.images[:, 0, 0].tolist() == [3, 1, 1]
    assert len(ds.subset([])) == 0


def test_labels_must_be_integers() -> None:
    images = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(DataError, match=r"labels of 'f' must be an integer numpy array .*got dtype float64"):
        ImageDataset("f", images, np.array([0.0, 1.0, 2.0]), 256)
    ds = ImageDataset("i", images, np.array([0, 1, 2], dtype=np.int32), 256)
    assert ds.labels.dtype == np.int64


def test_unknown_gray_modes_list_the_valid_ones() -> None:
    with pytest.raises(DataError, match=r"gray must be one of \['luma', 'mean'\] .*got 'red'"):
        load_dataset("digits", gray="red")
    with pytest.raises(ConfigError, match=r"mode must be one of \['luma', 'mean'\]; got 'red'"):
        to_gray(np.zeros((1, 2, 2, 3), np.uint8), mode="red")


def test_to_gray_needs_channels_last() -> None:
    with pytest.raises(DataError, match=r"shape \(..., H, W, C\) with C = 3 or 4 .*got shape \(4, 4\)"):
        to_gray(np.zeros((4, 4), np.uint8))
    assert to_gray(np.full((2, 4, 4, 3), 100, np.uint8)).shape == (2, 4, 4)
