"""MNIST, Fashion-MNIST and CIFAR-10 from local files in their original formats (no download, no torchvision).

Files may lie directly in `root` or where torchvision puts them (`root/MNIST/raw`, `root/FashionMNIST/raw`,
`root/cifar-10-batches-py`). Train and test parts are pooled; the partitioner and the per-client split decide
what each client trains and tests on.

The files are not trusted. They are read by `fedsim.data.idx` (IDX headers checked against the file's size and the
memory available before any body is read, gzip streams inflated no further than their header justifies) and
`fedsim.data.cifar_pickle` (CIFAR-10's pickles through an unpickler that builds nothing but plain containers and
numeric arrays); every problem is one DataError line. This module registers the data sets and their footprints.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from fedsim.data.base import DATASETS, CentralDataset, DataParams, Footprint
from fedsim.data.cifar_pickle import (
    CIFAR_ROW_BYTES,
    UNPICKLE_BYTES_PER_FILE_BYTE,
    batch_size,
    read_cifar_batch,
    scan_batch,
)
from fedsim.data.files import NUM_CLASSES, locate, rows_wanted
from fedsim.data.idx import idx_files, read_idx, read_idx_headers

CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)

PIXEL_PEAK_BYTES = 9
"""Peak bytes per pixel of building a data set: 8 while the per-client float32 train and test tensors are gathered
from the pooled float32 images (the measured peak; the loaders' own, uint8 plus float32, is lower), plus 1 of
headroom."""
SAMPLE_PEAK_BYTES = 96
"""Peak bytes per sample for labels and indices: int64 labels pooled and gathered, the partition's index arrays,
their shuffles and concatenations."""


class VisionParams(DataParams):
    """root: directory holding the files (`~` expanded); max_samples: keep only the first n pooled samples."""

    root: str
    max_samples: int | None = Field(default=None, gt=0)


def _memory_field(params: VisionParams) -> str:
    """The field to change when the data do not fit: max_samples when it is set, else the root that holds them."""
    return "data.max_samples" if params.max_samples is not None else "data.root"


def _peak_bytes(samples: int, pixels: int) -> int:
    """Estimated peak memory of building a data set of `samples` images of `pixels` bytes each."""
    return samples * (pixels * PIXEL_PEAK_BYTES + SAMPLE_PEAK_BYTES)


def _central(x: np.ndarray, y: np.ndarray, max_samples: int | None, num_classes: int = 10) -> CentralDataset:
    """First `max_samples` samples, pixels scaled from 0..255 to [0, 1] float32, labels int64."""
    x, y = x[:max_samples], y[:max_samples]
    scaled = (x / np.float32(255)).astype(np.float32, copy=False)
    return CentralDataset(scaled, y.astype(np.int64), num_classes)


def load_idx_dataset(params: VisionParams, subdir: str, label: str) -> CentralDataset:
    """Pooled train + t10k parts of an MNIST-format data set as x (n, 1, rows, cols); only the rows kept are read."""
    paths = idx_files(params.root, subdir, label)
    x, y = read_idx(paths, params.max_samples, _memory_field(params))
    return _central(x[:, None], y, None)


def idx_footprint(params: VisionParams, subdir: str, label: str) -> Footprint:
    """Peak bytes and image shape of an MNIST-format data set, from the files' checked headers alone."""
    heads = read_idx_headers(idx_files(params.root, subdir, label))
    samples = sum(rows_wanted((heads[0].rows, heads[2].rows), params.max_samples))
    return Footprint(_peak_bytes(samples, heads[0].row_bytes), (1, *heads[0].dims[1:]), NUM_CLASSES)


def mnist_footprint(params: VisionParams, num_clients: int) -> Footprint:
    """What building MNIST from the files under `params.root` takes and gives."""
    return idx_footprint(params, "MNIST/raw", "MNIST")


def fashion_mnist_footprint(params: VisionParams, num_clients: int) -> Footprint:
    """What building Fashion-MNIST from the files under `params.root` takes and gives."""
    return idx_footprint(params, "FashionMNIST/raw", "Fashion-MNIST")


@DATASETS.register("mnist", VisionParams, footprint=mnist_footprint)
def mnist(params: VisionParams, num_clients: int, rng: np.random.Generator) -> CentralDataset:
    """MNIST handwritten digits from IDX files: x (n, 1, 28, 28) in [0, 1], 10 classes."""
    return load_idx_dataset(params, "MNIST/raw", "MNIST")


@DATASETS.register("fashion_mnist", VisionParams, footprint=fashion_mnist_footprint)
def fashion_mnist(params: VisionParams, num_clients: int, rng: np.random.Generator) -> CentralDataset:
    """Fashion-MNIST clothing images from IDX files: x (n, 1, 28, 28) in [0, 1], 10 classes."""
    return load_idx_dataset(params, "FashionMNIST/raw", "Fashion-MNIST")


def cifar10_footprint(params: VisionParams, num_clients: int) -> Footprint:
    """What building CIFAR-10 takes and gives: peak bytes from the batch files' sizes (each row takes 3072 bytes of
    its file) plus the transient cost of unpickling the largest batch. Each batch's pickle is scanned (its images
    skipped), so a hostile or malformed batch is refused here already."""
    paths = locate(params.root, "cifar-10-batches-py", CIFAR_FILES, "CIFAR-10", ("",))
    sizes = [batch_size(p) for p in paths]
    for path, size in zip(paths, sizes, strict=True):
        scan_batch(path, size)
    samples = sum(rows_wanted([s // CIFAR_ROW_BYTES for s in sizes], params.max_samples))
    nbytes = _peak_bytes(samples, CIFAR_ROW_BYTES) + UNPICKLE_BYTES_PER_FILE_BYTE * max(sizes)
    return Footprint(nbytes, (3, 32, 32), NUM_CLASSES)


@DATASETS.register("cifar10", VisionParams, footprint=cifar10_footprint)
def cifar10(params: VisionParams, num_clients: int, rng: np.random.Generator) -> CentralDataset:
    """CIFAR-10 from the python pickle batches: x (n, 3, 32, 32) in [0, 1], 10 classes."""
    paths = locate(params.root, "cifar-10-batches-py", CIFAR_FILES, "CIFAR-10", ("",))
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    for path in paths:
        if params.max_samples is not None and sum(len(b[1]) for b in batches) >= params.max_samples:
            break
        batches.append(read_cifar_batch(path, _memory_field(params)))
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return _central(x, y, params.max_samples)
