"""MI entry points refuse input the counting kernels cannot index: levels, blocks, indices, empty sets."""

from __future__ import annotations

import numpy as np
import pytest

from obliviate.errors import ConfigError, DataError
from obliviate.reduction.mi import mi_matrix, mutual_information, prepare_images, quantize


def _images(n: int = 3, top: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, top, size=(n, 8, 8), dtype=np.uint8)


@pytest.mark.parametrize(
    "call",
    [
        lambda imgs: quantize(imgs, levels=16, bins=16),
        lambda imgs: prepare_images(imgs, levels=16, bins=16),  # codes up to 255 with bins 16 before
        lambda imgs: mi_matrix(imgs, levels=16),  # aborted with "corrupted size vs. prev_size"
        lambda imgs: mutual_information(imgs[0], imgs[1], levels=16),  # segfaulted
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
