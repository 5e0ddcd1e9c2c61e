"""Mutual information between images (SPEC section 1).

``MI(u, v) = H(u) + H(v) - H(u, v)`` over the gray-level histograms of two images, natural
log, exactly as ``sklearn.metrics.mutual_info_score(u.ravel(), v.ravel())``.

Speed comes from one identity: with ``f(c) = c log c`` and P pixels,
``H(u, v) = log P - (1/P) * sum_c f(c)`` over the joint counts. For a row image ``u`` whose
level counts are known, only the pixels where ``v`` is non-zero change the joint histogram
away from "``u`` against an all-zero image", so each pair costs O(nnz(v)) table look-ups
instead of O(P) or O(levels^2). On MNIST about 19 % of pixels are non-zero.

The counting kernels are numba-compiled and run rows of a tile in parallel threads
(``numba.set_num_threads`` decides how many).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

from obliviate.checks import index_array, is_whole, whole_number
from obliviate.errors import ConfigError, DataError


@dataclass(frozen=True, eq=False)
class PreparedImages:
    """Images quantised to ``bins`` levels plus what every pair needs, computed once.

    Attributes:
        codes: ``(n, P)`` uint8 quantised gray levels, C-contiguous.
        nz_ptr: ``(n + 1,)`` CSR row pointers into ``nz_pos`` / ``nz_code``.
        nz_pos: pixel positions of non-zero codes, image after image (16-bit where P allows).
        nz_code: the non-zero codes at those positions.
        entropy: ``(n,)`` float64 entropy of each image's code histogram (nats).
        bins: number of code levels used for counting.
        clogc: ``f(c) = c log c`` for ``c = 0 .. P``.
    """

    codes: np.ndarray
    nz_ptr: np.ndarray
    nz_pos: np.ndarray
    nz_code: np.ndarray
    entropy: np.ndarray
    bins: int
    clogc: np.ndarray

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def pixels(self) -> int:
        return int(self.codes.shape[1])


def quantize(images: np.ndarray, *, levels: int = 256, bins: int = 256) -> np.ndarray:
    """Map gray levels ``0 .. levels-1`` to codes ``0 .. min(bins, levels)-1``.

    Level ``x`` becomes ``floor(x * bins / levels)``; with ``bins >= levels`` codes equal levels.
    Lowering ``bins`` below 256 changes which pairs look similar (SPEC section 1: on MNIST 5k,
    32 bins ranks pairs with Spearman rho 0.94 against 256 levels).

    Raises:
        DataError: the images are not uint8, are empty (no image or no pixel), or hold a gray
            level ``>= levels`` (the counting kernels index their histograms by level).
        ConfigError: ``levels`` or ``bins`` is outside 2..256.
    """
    check_bins(levels=levels, bins=bins)
    flat = check_images(images, levels=levels)
    if bins >= levels:
        return flat
    return ((flat.astype(np.uint32) * bins) // levels).astype(np.uint8)


def prepare_images(images: np.ndarray, *, levels: int = 256, bins: int = 256) -> PreparedImages:
    """Quantise images and precompute entropies and sparse non-zero lists.

    Args:
        images: ``(n, H, W)`` or ``(n, P)`` uint8 gray levels.
        levels: gray levels of the source (256 for 8-bit data).
        bins: code levels to count with (SPEC default 256).

    Returns:
        the codes, sparse non-zero lists and entropies every pair of :func:`mi_tile` reads.

    Raises:
        ConfigError: ``levels`` or ``bins`` is not a whole number in 2..256.
        DataError: the images are not uint8, are empty (no image or no pixel), or hold a gray
            level ``>= levels``.
    """
    codes = np.ascontiguousarray(quantize(images, levels=levels, bins=bins))
    n, pixels = codes.shape
    mask = codes != 0
    nz_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(mask.sum(axis=1), out=nz_ptr[1:])
    rows, cols = np.nonzero(mask)
    clogc = _clogc_table(pixels)
    code_levels = min(bins, levels)
    entropy = _entropies(codes, clogc, code_levels)
    return PreparedImages(
        codes=codes,
        nz_ptr=nz_ptr,
        nz_pos=cols.astype(_pixel_index_dtype(pixels)),
        nz_code=codes[rows, cols].astype(np.uint8),
        entropy=entropy,
        bins=code_levels,
        clogc=clogc,
    )


def mutual_information(
    *, u: np.ndarray, v: np.ndarray, levels: int = 256, bins: int = 256, normalize: bool = False
) -> float:
    """MI of one image pair (SPEC section 1).

    Args:
        u: gray-level image, any shape with the same number of pixels as ``v``.
        v: gray-level image.
        levels: gray levels of the source.
        bins: code levels to count with.
        normalize: return ``2 MI / (H(u) + H(v))`` instead of raw MI (1.0 for two constant images,
            as ``sklearn.metrics.normalized_mutual_info_score``).

    Returns:
        ``MI(u, v)`` in nats (or the normalised value).

    Raises:
        ConfigError: ``levels`` or ``bins`` is not a whole number in 2..256.
        DataError: the images differ in pixel count, are empty, are not uint8, or hold a gray
            level ``>= levels``.
    """
    u_flat, v_flat = np.asarray(u).reshape(1, -1), np.asarray(v).reshape(1, -1)
    if u_flat.shape != v_flat.shape:
        raise DataError(
            f"both images of a pair must have the same number of pixels; got {u_flat.shape[1]} and {v_flat.shape[1]}."
        )
    prepared = prepare_images(np.concatenate([u_flat, v_flat]), levels=levels, bins=bins)
    tile = mi_tile(prepared, rows=np.array([0]), cols=np.array([1]), normalize=normalize)
    return float(tile[0, 0])


def mi_tile(
    prepared: PreparedImages,
    *,
    rows: np.ndarray,
    cols: np.ndarray,
    normalize: bool = False,
    upper_only: bool = False,
) -> np.ndarray:
    """One tile of the MI matrix: ``tile[a, b] = MI(rows[a], cols[b])`` as float32.

    Args:
        prepared: output of :func:`prepare_images`.
        rows: image indices of the tile's rows.
        cols: image indices of the tile's columns.
        normalize: normalised MI (SPEC section 1 switch).
        upper_only: compute only entries with ``rows[a] < cols[b]`` and leave the rest 0;
            for diagonal tiles of a symmetric plan, which mirror them afterwards.

    Raises:
        ConfigError: ``rows`` or ``cols`` holds booleans, fractions, or indices outside ``0..n-1``.
    """
    rows = _check_indices(rows, prepared.n, "rows")
    cols = _check_indices(cols, prepared.n, "cols")
    tile = np.zeros((rows.shape[0], cols.shape[0]), dtype=np.float32)
    _tile_kernel(
        prepared.codes,
        prepared.nz_ptr,
        prepared.nz_pos,
        prepared.nz_code,
        prepared.entropy,
        prepared.clogc,
        prepared.bins,
        rows,
        cols,
        normalize,
        upper_only,
        numba.get_num_threads(),
        tile,
        _pixel_index_dtype(prepared.pixels),
    )
    return tile


def mi_matrix(
    images: np.ndarray,
    *,
    levels: int = 256,
    bins: int = 256,
    normalize: bool = False,
    block: int = 1024,
    on_tile: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The full symmetric ``(n, n)`` float32 MI matrix, computed tile by tile in this process.

    The diagonal holds ``MI(u, u) = H(u)`` (1 when normalised). Use only where ``4 n^2`` bytes
    fit in memory; the distributed ``reduce`` flow streams tiles through storage instead.

    Args:
        images: ``(n, H, W)`` or ``(n, P)`` uint8 gray levels.
        levels: gray levels of the source.
        bins: code levels to count with.
        normalize: normalised MI.
        block: tile side.
        on_tile: called as ``on_tile(done, total)`` after each tile, for progress display.

    Raises:
        ConfigError: ``block`` is not a whole number >= 1, or ``levels`` / ``bins`` is outside 2..256.
        DataError: the images are not uint8 or hold a gray level ``>= levels``.
    """
    whole_number(block, name="block", minimum=1)
    prepared = prepare_images(images, levels=levels, bins=bins)
    n = prepared.n
    matrix = np.zeros((n, n), dtype=np.float32)
    starts = range(0, n, block)
    total = len(starts) * (len(starts) + 1) // 2
    done = 0
    for start_r in starts:
        rows = np.arange(start_r, min(start_r + block, n))
        for start_c in range(start_r, n, block):
            cols = np.arange(start_c, min(start_c + block, n))
            tile = mi_tile(prepared, rows=rows, cols=cols, normalize=normalize, upper_only=start_c == start_r)
            matrix[start_r : start_r + rows.shape[0], start_c : start_c + cols.shape[0]] = tile
            done += 1
            if on_tile is not None:
                on_tile(done, total)
    upper = np.triu(matrix, k=1)
    matrix = upper + upper.T
    diag = np.ones(n, dtype=np.float32) if normalize else prepared.entropy.astype(np.float32)
    np.fill_diagonal(matrix, diag)
    return matrix


def check_levels(levels: int) -> None:
    """Raise :class:`ConfigError` unless ``levels`` (the source's gray levels) is a whole number in 2..256."""
    if not is_whole(levels):
        raise ConfigError(
            f"levels must be a whole number in 2..256 (gray levels of the source); got {levels!r} "
            f"({type(levels).__name__}). Pass an int, e.g. 256 for 8-bit data."
        )
    if not 2 <= levels <= 256:
        raise ConfigError(f"levels must be in 2..256 (gray levels of the source); got {levels}.")


def check_bins(*, levels: int, bins: int) -> None:
    """Raise :class:`ConfigError` unless ``levels`` and ``bins`` are both whole numbers in 2..256."""
    check_levels(levels)
    if not is_whole(bins):
        raise ConfigError(
            f"bins must be a whole number in 2..256; got {bins!r} ({type(bins).__name__}). The spec default is 256."
        )
    if not 2 <= bins <= 256:
        raise ConfigError(f"bins must be in 2..256; got {bins}. The spec default is 256.")


def check_images(images: np.ndarray, *, levels: int) -> np.ndarray:
    """``images`` as ``(n, P)`` uint8, refused unless non-empty with every gray level below ``levels``.

    Args:
        images: ``(n, H, W)`` or ``(n, P)`` uint8 gray levels.
        levels: gray levels of the source.

    Returns:
        a flat ``(n, P)`` view of the images.

    Raises:
        DataError: the images are not uint8, have no image or no pixel, or hold a level ``>= levels``.
    """
    flat = _as_flat_uint8(images)
    check_gray_levels(flat, levels=levels)
    return flat


def check_gray_levels(images: np.ndarray, *, levels: int) -> None:
    """Raise :class:`DataError` if a gray level of uint8 ``images`` is ``>= levels``.

    One max over the array, skipped at 256 levels, which no uint8 value reaches. A level past
    ``levels`` would be counted outside the histograms of :func:`prepare_images` and
    :func:`mi_tile`, so it must be refused before any counting.
    """
    arr = np.asarray(images)
    if levels >= 256 or arr.size == 0:
        return
    top = int(arr.max())
    if top >= levels:
        raise DataError(
            f"gray levels must be below levels={levels}; found {top}. Pass levels=256 for 8-bit data "
            f"(or the data's own number of levels, at least {top + 1})."
        )


def _as_flat_uint8(images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise DataError(
            f"images must be uint8 gray levels; got dtype {arr.dtype}. Cast with .astype(np.uint8) "
            "after scaling to the source's levels."
        )
    if arr.ndim < 2:
        raise DataError(f"images must have shape (n, P) or (n, H, W); got {arr.shape}.")
    if arr.size == 0:
        raise DataError(
            f"images must hold at least one image of at least one pixel; got shape {arr.shape}. "
            "Pass a non-empty image set."
        )
    return arr.reshape(arr.shape[0], -1)


def _check_indices(idx: np.ndarray, n: int, what: str) -> np.ndarray:
    arr = index_array(idx, name=what)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ConfigError(f"{what} must index the {n} prepared images; got values {arr.min()}..{arr.max()}.")
    return arr


def _pixel_index_dtype(pixels: int) -> type:
    """The narrowest integer type that holds 0..``pixels``: every pixel position and joint count.

    At 16 bits the non-zero positions of a 4,000-image tile (about 1.2 MB on MNIST) stay in a
    core's L2 cache while each row image is compared with all of them, and the joint table halves.
    """
    return np.uint16 if pixels <= np.iinfo(np.uint16).max else np.int32


def _clogc_table(pixels: int) -> np.ndarray:
    counts = np.arange(pixels + 1, dtype=np.float64)
    table = np.zeros(pixels + 1, dtype=np.float64)
    table[1:] = counts[1:] * np.log(counts[1:])
    return table


@numba.njit(cache=True, parallel=True)
def _entropies(codes: np.ndarray, clogc: np.ndarray, bins: int) -> np.ndarray:
    n, pixels = codes.shape
    out = np.empty(n, dtype=np.float64)
    log_p = math.log(pixels)
    for i in numba.prange(n):
        counts = np.zeros(bins, dtype=np.int64)
        for p in range(pixels):
            counts[codes[i, p]] += 1
        acc = 0.0
        for c in range(bins):
            acc += clogc[counts[c]]
        out[i] = log_p - acc / pixels
    return out


@numba.njit(cache=True, parallel=True)
def _tile_kernel(
    codes: np.ndarray,
    nz_ptr: np.ndarray,
    nz_pos: np.ndarray,
    nz_code: np.ndarray,
    entropy: np.ndarray,
    clogc: np.ndarray,
    bins: int,
    rows: np.ndarray,
    cols: np.ndarray,
    normalize: bool,
    upper_only: bool,
    n_threads: int,
    tile: np.ndarray,
    count_dtype: type,
) -> None:
    pixels = codes.shape[1]
    log_p = math.log(pixels)
    n_rows = rows.shape[0]
    chunk = (n_rows + n_threads - 1) // n_threads
    for t in numba.prange(n_threads):
        # Per-thread scratch. joint[a * bins + b] counts pixels with u at a and v at b != 0, in the
        # narrowest type that holds P: at 256 levels it is 64 Ki entries, and halving it keeps more
        # of it in cache. rest[a] counts pixels with u at a and v at 0; u_counts[a] is rest before v.
        joint: np.ndarray = np.zeros(bins * bins, dtype=count_dtype)
        rest = np.zeros(bins, dtype=np.int32)
        u_counts = np.zeros(bins, dtype=np.int32)
        touched_key = np.empty(pixels, dtype=np.int32)
        touched_level = np.empty(pixels, dtype=np.int32)
        for a in range(t * chunk, min((t + 1) * chunk, n_rows)):
            u = rows[a]
            u_codes = codes[u]
            u_counts[:] = 0
            for p in range(pixels):
                u_counts[u_codes[p]] += 1
            base = 0.0
            for lvl in range(bins):
                base += clogc[u_counts[lvl]]
                rest[lvl] = u_counts[lvl]
            for b in range(cols.shape[0]):
                v = cols[b]
                if upper_only and v <= u:
                    continue
                first, count = nz_ptr[v], nz_ptr[v + 1] - nz_ptr[v]
                # Count first, then sum f over what changed: integer increments only in the hot loop.
                for q in range(count):
                    level_u = u_codes[nz_pos[first + q]]
                    key = level_u * bins + nz_code[first + q]
                    touched_key[q] = key
                    touched_level[q] = level_u
                    joint[key] += 1
                    rest[level_u] -= 1
                # A cell visited twice was reset on the first visit and adds f(0) = 0 the second time,
                # so no branch is needed to count each changed cell once.
                change = 0.0
                for q in range(count):
                    key = touched_key[q]
                    change += clogc[joint[key]]
                    joint[key] = 0
                    level_u = touched_level[q]
                    change += clogc[rest[level_u]] - clogc[u_counts[level_u]]
                    rest[level_u] = u_counts[level_u]
                joint_entropy = log_p - (base + change) / pixels
                mi = entropy[u] + entropy[v] - joint_entropy
                mi = max(mi, 0.0)  # rounding below zero; MI is non-negative
                if normalize:
                    denom = entropy[u] + entropy[v]
                    mi = 2.0 * mi / denom if denom > 0.0 else 1.0
                tile[a, b] = mi
