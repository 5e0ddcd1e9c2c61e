"""Mutual information against scikit-learn's exact oracle (issue 2, SPEC section 1)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from obliviate.data import load_dataset
from obliviate.errors import ConfigError, DataError
from obliviate.reduction.mi import mi_matrix, mi_tile, mutual_information, prepare_images, quantize


@pytest.fixture(scope="module")
def mnist_sample() -> np.ndarray:
    data = load_dataset("mnist5k")
    return data.images[np.random.default_rng(0).choice(len(data), size=40, replace=False)]


@pytest.fixture(scope="module")
def digits_sample() -> np.ndarray:
    return load_dataset("digits").images[:40]


def _oracle(u: np.ndarray, v: np.ndarray, *, levels: int, bins: int, normalize: bool) -> float:
    qu, qv = quantize(u[None], levels=levels, bins=bins)[0], quantize(v[None], levels=levels, bins=bins)[0]
    if normalize:
        return normalized_mutual_info_score(qu, qv, average_method="arithmetic")
    return mutual_info_score(qu, qv)


@pytest.mark.parametrize("bins", [256, 64, 32, 16, 2])
@pytest.mark.parametrize("normalize", [False, True])
def test_pairs_match_sklearn_on_real_mnist(mnist_sample, bins, normalize) -> None:
    for i in range(0, 40, 2):
        u, v = mnist_sample[i], mnist_sample[i + 1]
        ours = mutual_information(u=u, v=v, bins=bins, normalize=normalize)
        assert ours == pytest.approx(_oracle(u, v, levels=256, bins=bins, normalize=normalize), abs=1e-5)


@pytest.mark.parametrize("bins", [256, 17, 8, 4])
@pytest.mark.parametrize("normalize", [False, True])
def test_tile_matches_sklearn_on_real_digits(digits_sample, bins, normalize) -> None:
    prepared = prepare_images(digits_sample, levels=17, bins=bins)
    rows, cols = np.arange(0, 12), np.arange(12, 40)
    tile = mi_tile(prepared, rows=rows, cols=cols, normalize=normalize)
    assert tile.dtype == np.float32 and tile.shape == (12, 28)
    expected = np.array(
        [
            [_oracle(digits_sample[r], digits_sample[c], levels=17, bins=bins, normalize=normalize) for c in cols]
            for r in rows
        ]
    )
    np.testing.assert_allclose(tile, expected, atol=1e-5)


def test_dense_images_without_zero_background_match_sklearn() -> None:
    rng = np.random.default_rng(5)
    images = rng.integers(1, 256, size=(6, 10, 10), dtype=np.uint8)
    prepared = prepare_images(images)
    tile = mi_tile(prepared, rows=np.arange(6), cols=np.arange(6))
    for r in range(6):
        for c in range(6):
            assert tile[r, c] == pytest.approx(mutual_info_score(images[r].ravel(), images[c].ravel()), abs=1e-5)


def test_joint_counts_beyond_16_bits_match_sklearn() -> None:
    # Images of more than 65,535 pixels count in a wider type; one joint cell here holds about 80,000.
    rng = np.random.default_rng(6)
    u = np.where(rng.random(100_000) < 0.8, 1, rng.integers(2, 9, size=100_000)).astype(np.uint8)
    v = np.where(rng.random(100_000) < 0.9, u + 10, rng.integers(1, 256, size=100_000)).astype(np.uint8)
    assert mutual_information(u=u, v=v) == pytest.approx(mutual_info_score(u, v), abs=1e-5)


def test_matrix_is_symmetric_with_entropy_diagonal(mnist_sample) -> None:
    matrix = mi_matrix(mnist_sample, block=16)
    np.testing.assert_array_equal(matrix, matrix.T)
    for i in (0, 17, 39):
        assert matrix[i, i] == pytest.approx(
            mutual_info_score(mnist_sample[i].ravel(), mnist_sample[i].ravel()), abs=1e-5
        )
    direct = mi_tile(prepare_images(mnist_sample), rows=np.arange(40), cols=np.arange(40))
    off = ~np.eye(40, dtype=bool)
    np.testing.assert_array_equal(matrix[off], direct[off])
    assert np.all(np.diag(mi_matrix(mnist_sample, normalize=True)) == 1.0)


def test_upper_only_leaves_lower_triangle_empty(mnist_sample) -> None:
    prepared = prepare_images(mnist_sample)
    idx = np.arange(10)
    full = mi_tile(prepared, rows=idx, cols=idx)
    upper = mi_tile(prepared, rows=idx, cols=idx, upper_only=True)
    np.testing.assert_array_equal(upper, np.triu(full, k=1))


def test_mi_is_bounded_by_the_smaller_entropy(mnist_sample) -> None:
    prepared = prepare_images(mnist_sample)
    tile = mi_tile(prepared, rows=np.arange(40), cols=np.arange(40))
    bound = np.minimum.outer(prepared.entropy, prepared.entropy)
    assert np.all(tile <= bound + 1e-5)


def test_quantize_maps_levels_evenly() -> None:
    levels = np.arange(256, dtype=np.uint8)[None]
    assert np.array_equal(quantize(levels, bins=32)[0], np.arange(256) // 8)
    assert np.array_equal(quantize(levels, bins=256)[0], np.arange(256))


def test_bad_inputs_say_the_rule() -> None:
    images = np.zeros((3, 4, 4), np.uint8)
    with pytest.raises(ConfigError, match="bins must be in 2..256; got 1"):
        prepare_images(images, bins=1)
    with pytest.raises(DataError, match="uint8"):
        prepare_images(images.astype(np.float64))
    with pytest.raises(ConfigError, match="rows must index the 3 prepared images"):
        mi_tile(prepare_images(images), rows=np.array([3]), cols=np.array([0]))
    with pytest.raises(DataError, match="same number of pixels"):
        mutual_information(u=images[0], v=np.zeros((5, 5), np.uint8))
