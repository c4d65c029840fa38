"""Labelled image sets loaded from local files into memory: Fashion-MNIST (IDX), CIFAR-10, ``.npz``.

Nothing is downloaded: a missing dataset is an error that names the path and how to install it.
Every loader returns an :class:`ImageDataset` of uint8 ``N x C x H x W`` images, int64 labels and
stable int64 ``sample_ids`` (the row number in the original file), which is what soft labels,
features and partitions are keyed by.
"""
from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgefl_core.data import safe_unpickle
from edgefl_core.registry import Registry

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DatasetError(ValueError):
    """A dataset file is missing, corrupt, or not what its name promises."""


class MissingSplit(DatasetError):
    """A dataset that may lack a split (a device's own npz or image folder without test data) lacks it."""


@dataclass(frozen=True)
class ImageDataset:
    images: np.ndarray      # N x C x H x W, uint8
    labels: np.ndarray      # N, int64
    sample_ids: np.ndarray  # N, int64, unique and stable across runs
    num_classes: int
    name: str = "dataset"

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DatasetError(f"{self.name}: images must be uint8 N x C x H x W, got {self.images.dtype} "
                               f"{self.images.shape}")
        if self.labels.shape != (n,) or self.sample_ids.shape != (n,):
            raise DatasetError(f"{self.name}: {n} images but labels {self.labels.shape} and sample_ids "
                               f"{self.sample_ids.shape}")
        if n and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DatasetError(f"{self.name}: labels must lie in [0, {self.num_classes}), got "
                               f"[{self.labels.min()}, {self.labels.max()}]")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, rows: np.ndarray) -> "ImageDataset":
        """Rows by position (not by sample id); ids travel with their images."""
        return ImageDataset(self.images[rows], self.labels[rows], self.sample_ids[rows], self.num_classes, self.name)

    def rows_of(self, sample_ids: np.ndarray) -> np.ndarray:
        """Positions of ``sample_ids`` in this set; an id that is not here is an error."""
        order = np.argsort(self.sample_ids, kind="stable")
        pos = np.searchsorted(self.sample_ids, sample_ids, sorter=order)
        pos = np.minimum(pos, len(order) - 1)
        rows = order[pos]
        missing = self.sample_ids[rows] != sample_ids
        if missing.any():
            raise KeyError(f"{self.name}: unknown sample ids {np.asarray(sample_ids)[missing][:5].tolist()}")
        return rows


# ---------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped), checking the magic number and that sizes agree. Streamed into
    one writable buffer: a device holds the data once, never the compressed and raw copies beside it."""
    path = Path(path)
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise DatasetError(f"{path}: not an IDX file (bad magic number {head[:4].hex()})")
            dtype, ndim = np.dtype(_IDX_DTYPES[head[2]]), head[3]
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DatasetError(f"{path}: truncated IDX header")
            shape = struct.unpack(f">{ndim}I", dims)
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if expected > 1 << 34:
                raise DatasetError(f"{path}: IDX header says shape {shape}: more than 16 GiB")
            data = bytearray(expected)
            got = f.readinto(data)
            extra = len(f.read(1))
    except FileNotFoundError:
        raise
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: cannot read IDX file ({e})") from e
    if got != expected or extra:
        raise DatasetError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
                           f"{'more' if extra else got} bytes of data")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    raise DatasetError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install it with "
        f"'apt-get install dataset-fashion-mnist' (files land in {FASHION_MNIST_DIR}) or set data.path "
        f"to a directory holding the IDX files.")


def load_fashion_mnist(split: str, directory: str | Path | None = None) -> ImageDataset:
    directory = Path(directory) if directory else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8:
        raise DatasetError(f"{directory}: expected N x H x W uint8 images and N labels, got {images.shape} "
                           f"{images.dtype} and {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(f"{directory}: {len(images)} images but {len(labels)} labels in the {split} split")
    return ImageDataset(images[:, None], labels.astype(np.int64), np.arange(len(images), dtype=np.int64),
                        10, f"fashion_mnist/{split}")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python or binary layout)

_CIFAR_PY = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_BIN = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
_CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_dir(directory: Path, layout_dir: str, first_file: str) -> Path | None:
    for d in (directory, directory / layout_dir):
        if (d / first_file).exists():
            return d
    return None


def _batch_entry(batch: object, key: str, path: Path):
    # Python 2 pickles (the official files) have bytes keys; re-saved ones have str keys.
    if isinstance(batch, dict):
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
    raise DatasetError(f"{path}: not a CIFAR-10 batch (no {key!r} entry)")


def load_cifar10(split: str, directory: str | Path) -> ImageDataset:
    """CIFAR-10 from ``cifar-10-batches-py`` (python) or ``cifar-10-batches-bin`` (binary).

    The python layout is pickled; it is read with :mod:`edgefl_core.data.safe_unpickle`, which
    interprets the opcodes without importing or calling anything.
    """
    if not directory:
        raise DatasetError("CIFAR-10 needs data.path: a directory with cifar-10-batches-py or cifar-10-batches-bin")
    directory = Path(directory)
    images, labels = [], []
    if (d := _cifar_dir(directory, "cifar-10-batches-py", _CIFAR_PY[split][0])) is not None:
        for name in _CIFAR_PY[split]:
            batch = safe_unpickle.load_file(d / name)
            data, lab = _batch_entry(batch, "data", d / name), _batch_entry(batch, "labels", d / name)
            data = np.asarray(data, dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(lab):
                raise DatasetError(f"{d / name}: expected N x 3072 data and N labels, got {data.shape}, {len(lab)}")
            images.append(data.reshape(-1, 3, 32, 32))  # rows are R(1024) G(1024) B(1024)
            labels.append(np.asarray(lab, dtype=np.int64))
    elif (d := _cifar_dir(directory, "cifar-10-batches-bin", _CIFAR_BIN[split][0])) is not None:
        for name in _CIFAR_BIN[split]:
            raw = np.fromfile(d / name, dtype=np.uint8)
            if raw.size % _CIFAR_RECORD:
                raise DatasetError(f"{d / name}: size {raw.size} is not a multiple of the {_CIFAR_RECORD}-byte record")
            records = raw.reshape(-1, _CIFAR_RECORD)
            labels.append(records[:, 0].astype(np.int64))
            images.append(records[:, 1:].reshape(-1, 3, 32, 32))
    else:
        raise DatasetError(f"no CIFAR-10 {split} files under {directory} (looked for {_CIFAR_PY[split][0]} and "
                           f"{_CIFAR_BIN[split][0]}, also in cifar-10-batches-py/ and cifar-10-batches-bin/)")
    images_arr, labels_arr = np.concatenate(images), np.concatenate(labels)
    return ImageDataset(images_arr, labels_arr, np.arange(len(images_arr), dtype=np.int64), 10, f"cifar10/{split}")


# ---------------------------------------------------------------------------------------------
# npz


def load_npz(path: str | Path, name: str = "npz") -> ImageDataset:
    """Any labelled image set: ``images`` (N x H x W or N x C x H x W, uint8) and ``labels``; optional ``sample_ids``."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"npz dataset {path} does not exist (a device's data: images and labels in "
                           "train.npz [+ test.npz]; see docs/DEPLOYMENT.md, 'A device's own data')")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (pickled object arrays), OSError
        raise DatasetError(f"{path}: cannot read npz ({e})") from e
    for key in ("images", "labels"):
        if key not in arrays:
            raise DatasetError(f"{path}: missing array {key!r} (has {sorted(arrays)})")
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise DatasetError(f"{path}: images must be N x H x W, N x C x H x W or N x H x W x C, got shape "
                           f"{images.shape}")
    channels_first, channels_last = images.shape[1] in (1, 3, 4), images.shape[3] in (1, 3, 4)
    if channels_last and not channels_first:  # the numpy / PIL layout: stored N x H x W x C
        logger.info("%s: images are N x H x W x C %s; using them as N x C x H x W", path, images.shape)
        images = images.transpose(0, 3, 1, 2)
    elif not channels_first:
        raise DatasetError(f"{path}: images of shape {images.shape} have no channel axis of 1, 3 or 4 "
                           "(expected N x C x H x W or N x H x W x C)")
    elif channels_last and images.shape[1] != images.shape[3]:
        raise DatasetError(f"{path}: images of shape {images.shape} could be N x C x H x W or N x H x W x C; "
                           "store them as N x C x H x W")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: labels must be {len(images)} integers, got {labels.dtype} {labels.shape}")
    sample_ids = arrays.get("sample_ids", np.arange(len(images)))
    if sample_ids.shape != labels.shape or len(np.unique(sample_ids)) != len(sample_ids):
        raise DatasetError(f"{path}: sample_ids must be {len(images)} unique integers")
    num_classes = int(arrays["num_classes"]) if "num_classes" in arrays else int(labels.max()) + 1 if len(labels) else 0
    return ImageDataset(np.ascontiguousarray(images), labels.astype(np.int64), sample_ids.astype(np.int64),
                        num_classes, name)


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: ``load(split, path) -> ImageDataset`` and its per-channel training-split
    mean and std in [0, 1] units (None: normalize with a generic 0.5 / 0.25)."""

    load: Callable[[str, "str | None"], ImageDataset]
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    needs_path: bool = False


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(name: str, stats=None, needs_path: bool = False):
    """``@register_dataset("name", stats=(mean, std))`` on a ``(split, path) -> ImageDataset`` loader."""
    def deco(load):
        DATASETS.register(name)(DatasetSpec(load, stats, needs_path))
        return load
    return deco


register_dataset("fashion_mnist", stats=((0.2860,), (0.3530,)))(load_fashion_mnist)
register_dataset("cifar10", stats=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), needs_path=True)(load_cifar10)


@register_dataset("npz", needs_path=True)
def _load_npz_split(split: str, path: str | None) -> ImageDataset:
    """``path`` = a directory with train.npz/test.npz, or the train file (test: ``<stem>_test.npz`` beside it)."""
    if not path:
        raise DatasetError("dataset npz needs data.path")
    p = Path(path)
    file = p / f"{split}.npz" if p.is_dir() else (p if split == "train" else p.with_name(f"{p.stem}_test.npz"))
    if split == "test" and not file.exists():
        raise MissingSplit(f"{file}: no test split")
    return load_npz(file, f"npz/{split}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


_GRAY_MODES = ("1", "L", "LA", "I;16", "I;16B", "I;16L")


def _read_image(path: Path) -> np.ndarray:
    """One image as uint8 H x W (grayscale) or H x W x 3 (colour); 16-bit grayscale is scaled, not clipped."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16"):
                return (np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8)
            if im.mode in ("I", "F"):
                raise DatasetError(f"{path}: {im.mode} (32-bit) pixels; save it as 8- or 16-bit")
            return np.asarray(im.convert("L" if im.mode in _GRAY_MODES else "RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable image ({e})") from None


@register_dataset("image_folder", needs_path=True)
def load_image_folder(split: str, path: str | None) -> ImageDataset:
    """A plain folder of images per class, read with Pillow: ``path/train/<class>/*.png`` (and optionally
    ``path/test/<class>/...``), or ``path/<class>/...`` as the train split alone.

    Labels: class folders named ``0``, ``1``, ... are those labels; otherwise ``path/classes.txt`` lists the
    class folder names one per line in the run's label order (sorted folder names would give a device that
    lacks a class shifted labels). Every image must have the same size; grayscale images give 1 channel,
    others are converted to RGB. Sample ids are positions in the sorted list of relative paths (stable while
    the folder does not change). Raises DatasetError naming the folder or file."""
    if not path:
        raise DatasetError("dataset image_folder needs data.path")
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist")
    split_dir = root / split
    if not split_dir.is_dir():
        if split == "test":
            raise MissingSplit(f"{root}: no test/ folder")
        split_dir = root  # path/<class>/... : the train split alone
    class_dirs = sorted(d for d in split_dir.iterdir()
                        if d.is_dir() and d.name not in ("train", "test") and not d.name.startswith("."))
    if not class_dirs:
        raise DatasetError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    names_file = root / "classes.txt"
    if names_file.exists():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        duplicated = sorted({c for c in classes if classes.count(c) > 1})
        if duplicated:
            raise DatasetError(f"{names_file}: class {duplicated[0]!r} is listed twice")
        label_of = {name: i for i, name in enumerate(classes)}
        num_classes = len(classes)
    elif all(d.name.isascii() and d.name.isdigit() and int(d.name) < 100_000 for d in class_dirs):
        label_of = {d.name: int(d.name) for d in class_dirs}
        num_classes = max(label_of.values()) + 1  # a device may lack the top classes: data.num_classes says
    else:
        raise DatasetError(f"{split_dir}: class folders {[d.name for d in class_dirs][:5]} are not label numbers; "
                           f"list the class names in label order in {names_file}, one per line")
    files = []
    for d in class_dirs:
        if d.name not in label_of:
            raise DatasetError(f"{d}: class {d.name!r} is not in {names_file}")
        files += [(f, label_of[d.name]) for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in f.relative_to(d).parts)]
    if not files:
        raise DatasetError(f"{split_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    images = [_read_image(f) for f, _ in files]
    for (f, _), array in zip(files, images):
        if array.shape != images[0].shape:
            kind = {2: "grayscale", 3: "colour"}
            raise DatasetError(f"{f}: {kind[array.ndim]} {array.shape[1]}x{array.shape[0]} pixels, the first image "
                               f"({files[0][0]}) is {kind[images[0].ndim]} {images[0].shape[1]}x{images[0].shape[0]}: "
                               "make them alike (one size, all grayscale or all colour)")
    stacked = np.stack(images)
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)  # N x C x H x W
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    return ImageDataset(np.ascontiguousarray(stacked), labels, np.arange(len(files), dtype=np.int64), num_classes,
                        f"image_folder/{split}")


def dataset_stats(name: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Normalization statistics of a registered dataset (None when it has none or is unknown)."""
    return DATASETS.get(name).stats if name in DATASETS else None


def load_dataset(name: str, split: str, path: str | None = None) -> ImageDataset:
    """Load ``split`` ("train" | "test") of a registered dataset. Raises DatasetError (unknown name,
    missing or corrupt files) or ValueError (bad split)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS.names())}")
    ds = DATASETS.get(name).load(split, path)
    logger.info("loaded %s: %d images of shape %s", ds.name, len(ds), ds.image_shape)
    return ds
