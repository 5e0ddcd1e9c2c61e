"""A Pool refuses images whose gray levels reach its ``levels`` (the MI kernels would read past their histograms)."""

from __future__ import annotations

import numpy as np
import pytest

from obliviate.errors import ConfigError, DataError
from obliviate.extraction.selectors import Pool


def test_pool_refuses_gray_levels_at_or_above_levels() -> None:
    images = np.zeros((4, 8, 8), np.uint8)
    images[2, 1, 1] = 16  # digits-like data has 17 levels; levels=8 crashed DRMI selectors before
    with pytest.raises(DataError, match="gray levels must be below levels=8; found 16"):
        Pool(images=images, levels=8, drmi_starts=3)
    assert Pool(images=images, levels=17).levels == 17


@pytest.mark.parametrize("levels", [1, 300])
def test_pool_refuses_levels_outside_2_to_256(levels) -> None:
    with pytest.raises(ConfigError, match="levels must be in 2..256"):
        Pool(images=np.zeros((4, 8, 8), np.uint8), levels=levels)
