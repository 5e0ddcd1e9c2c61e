"""MI entry points refuse input the counting kernels cannot index: levels, blocks, indices, empty sets."""

from __future__ import annotations

import numpy as np
import pytest

from obliviate.errors import ConfigError, DataError
from obliviate.reduction.mi import mi_matrix, mi_tile, mutual_information, prepare_images, quantize


def _images(n: int = 3, top: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, top, size=(n, 8, 8), dtype=np.uint8)


@pytest.mark.parametrize(
    "call",
    [
        lambda imgs: quantize(imgs, levels=16, bins=16),
        lambda imgs: prepare_images(imgs, levels=16, bins=16),  # codes up to 255 with bins 16 before
        lambda imgs: mi_matrix(imgs, levels=16),  # aborted with "corrupted size vs. prev_size"
        lambda imgs: mutual_information(u=imgs[0], v=imgs[1], levels=16),  # segfaulted
    ],
)
def test_gray_levels_at_or_above_levels_are_refused(call) -> None:
    imgs = _images()
    imgs[1, 2, 3] = 200
    with pytest.raises(DataError, match=r"gray levels must be below levels=16; found 2\d\d\. Pass levels=256"):
        call(imgs)


def test_gray_levels_below_levels_are_accepted_unchanged() -> None:
    imgs = _images(top=16)
    assert quantize(imgs, levels=16, bins=16).max() <= 15
    assert mi_matrix(imgs, levels=16).shape == (3, 3)


@pytest.mark.parametrize("block", [-1, 0, 2.5, True])
def test_mi_matrix_refuses_a_block_that_is_not_a_whole_number_from_1(block) -> None:
    # block=-1 returned an all-zero off-diagonal matrix; block=0 raised a bare ValueError from range()
    with pytest.raises(ConfigError, match=r"block must be a whole number >= 1; got"):
        mi_matrix(_images(), block=block)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (np.array([True, False]), "rows must be integer indices; got an array of dtype bool"),  # read as 1, 0
        (np.array([0.7]), "rows must be integer indices; got an array of dtype float64"),  # truncated to 0
        (np.array([-1]), r"rows must index the 3 prepared images; got values -1..-1"),
        (np.array([3], dtype=np.uint64), r"rows must index the 3 prepared images; got values 3..3"),
    ],
)
def test_mi_tile_refuses_rows_that_are_not_image_indices(rows, message) -> None:
    prepared = prepare_images(_images())
    with pytest.raises(ConfigError, match=message):
        mi_tile(prepared, rows=rows, cols=np.array([0, 1]))
    with pytest.raises(ConfigError, match=message.replace("rows", "cols")):
        mi_tile(prepared, rows=np.array([0, 1]), cols=rows)


def test_mi_tile_accepts_lists_and_numpy_integer_indices() -> None:
    prepared = prepare_images(_images())
    expected = mi_tile(prepared, rows=np.array([0, 1]), cols=np.array([2]))
    assert np.array_equal(mi_tile(prepared, rows=[0, 1], cols=np.array([2], dtype=np.int32)), expected)


@pytest.mark.parametrize(
    "call",
    [
        lambda: quantize(np.zeros((0, 8, 8), np.uint8)),  # numpy's "cannot reshape array of size 0"
        lambda: prepare_images(np.zeros((0, 8, 8), np.uint8)),
        lambda: mi_matrix(np.zeros((0, 8, 8), np.uint8)),
        lambda: prepare_images(np.zeros((3, 0), np.uint8)),  # entropy nan
        lambda: mutual_information(u=np.zeros(0, np.uint8), v=np.zeros(0, np.uint8)),  # returned nan
    ],
)
def test_empty_image_sets_and_zero_pixel_images_are_refused(call) -> None:
    with pytest.raises(DataError, match=r"images must hold at least one image of at least one pixel; got shape"):
        call()
