"""MNIST, Fashion-MNIST and CIFAR-10 from local files in their original formats (no download, no torchvision).

Files may lie directly in `root` or where torchvision puts them (`root/MNIST/raw`, `root/FashionMNIST/raw`,
`root/cifar-10-batches-py`). Train and test parts are pooled; the partitioner and the per-client split decide
what each client trains and tests on.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path

import numpy as np
from pydantic import Field

from fedsim.data.base import DATASETS, CentralDataset, DataParams
from fedsim.errors import DataError

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
IDX_UBYTE = 0x08


class VisionParams(DataParams):
    """root: directory holding the files (`~` expanded); max_samples: keep only the first n pooled samples."""

    root: str
    max_samples: int | None = Field(default=None, gt=0)


def _find(directory: Path, name: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        if (directory / (name + suffix)).is_file():
            return directory / (name + suffix)
    return None


def locate(
    root: Path, subdir: str, names: tuple[str, ...], label: str, suffixes: tuple[str, ...]
) -> list[Path]:
    """The files `names` in `root` or else `root/subdir` (the first holding any of them), or a DataError."""
    shown = ", ".join(n + ("[.gz]" if ".gz" in suffixes else "") for n in names)
    for directory in (root, root / subdir):
        found = [_find(directory, n, suffixes) for n in names]
        if all(found):
            return found
        if any(found):
            missing = ", ".join(n for n, f in zip(names, found, strict=True) if f is None)
            raise DataError(f"data.root: {label} files incomplete in {directory}: missing {missing}")
    raise DataError(f"data.root: no {label} files in {root} or {root / subdir} (expected {shown})")


def _read_bytes(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"data.root: cannot read {path}: {exc}") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with `ndim` dimensions; a wrong magic number or size is a DataError."""
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, IDX_UBYTE, ndim]):
        raise DataError(
            f"data.root: {path} is not an IDX file of {ndim}-D unsigned bytes "
            f"(magic number 0x{raw[:4].hex()})"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    body = np.frombuffer(raw, np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise DataError(f"data.root: {path} is corrupt: header says {dims}, found {body.size} data bytes")
    return body.reshape(dims)


def _idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images, 3), read_idx(labels, 1)
    if len(x) != len(y):
        raise DataError(f"data.root: {images} has {len(x)} images but {labels} has {len(y)} labels")
    return x, y


def _central(x: np.ndarray, y: np.ndarray, max_samples: int | None, num_classes: int = 10) -> CentralDataset:
    """First `max_samples` samples, pixels scaled from 0..255 to [0, 1] float32, labels int64."""
    x, y = x[:max_samples], y[:max_samples]
    scaled = (x / np.float32(255)).astype(np.float32, copy=False)
    return CentralDataset(scaled, y.astype(np.int64), num_classes)


def load_idx_dataset(params: VisionParams, subdir: str, label: str) -> CentralDataset:
    """Pooled train + t10k parts of an MNIST-format data set as x (n, 1, rows, cols)."""
    paths = locate(Path(params.root).expanduser(), subdir, IDX_FILES, label, ("", ".gz"))
    x_train, y_train = _idx_pair(paths[0], paths[1])
    x_test, y_test = _idx_pair(paths[2], paths[3])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"data.root: image sizes differ: {paths[0]} {x_train.shape[1:]}, {paths[2]} {x_test.shape[1:]}"
        )
    x = np.concatenate([x_train, x_test])[:, None]
    return _central(x, np.concatenate([y_train, y_test]), params.max_samples)


@DATASETS.register("mnist", VisionParams)
def mnist(params: VisionParams, num_clients: int, rng: np.random.Generator) -> CentralDataset:
    """MNIST handwritten digits from IDX files: x (n, 1, 28, 28) in [0, 1], 10 classes."""
    return load_idx_dataset(params, "MNIST/raw", "MNIST")


@DATASETS.register("fashion_mnist", VisionParams)
def fashion_mnist(params: VisionParams, num_clients: int, rng: np.random.Generator) -> CentralDataset:
    """Fashion-MNIST clothing images from IDX files: x (n, 1, 28, 28) in [0, 1], 10 classes."""
    return load_idx_dataset(params, "FashionMNIST/raw", "Fashion-MNIST")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch as x (n, 3, 32, 32) uint8 and labels; a corrupt batch is a DataError."""
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch.get(b"data", batch.get("data")), dtype=np.uint8)
        labels = np.asarray(batch.get(b"labels", batch.get("labels")), dtype=np.int64)
        x = data.reshape(len(data), 3, 32, 32)
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
        TypeError,
        ValueError,
    ) as exc:
        raise DataError(f"data.root: {path} is not a CIFAR-10 batch: {exc}") from None
    if len(x) != len(labels):
        raise DataError(f"data.root: {path} has {len(x)} images but {len(labels)} labels")
    return x, labels


@DATASETS.register("cifar10", VisionParams)
def cifar10(params: VisionParams, num_clients: int, rng: np.random.Generator) -> CentralDataset:
    """CIFAR-10 from the python pickle batches: x (n, 3, 32, 32) in [0, 1], 10 classes."""
    paths = locate(Path(params.root).expanduser(), "cifar-10-batches-py", CIFAR_FILES, "CIFAR-10", ("",))
    batches = [read_cifar_batch(p) for p in paths]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return _central(x, y, params.max_samples)
