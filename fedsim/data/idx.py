"""The IDX format of MNIST and Fashion-MNIST, read from plain or gzipped files without trusting them.

Headers are checked against the file's size (and a gzip file's most it can inflate to) before any body is read,
memory is checked before the arrays are allocated, and rows are streamed in chunks into those arrays.
"""

from __future__ import annotations

import gzip
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedsim.data.files import check_labels, locate, reading, rows_wanted, shown
from fedsim.errors import DataError
from fedsim.resources import check_fits

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IDX_NDIMS = (3, 1, 3, 1)
IDX_UBYTE = 0x08

READ_CHUNK = 1 << 20
"""Bytes read (or inflated) per call while filling an array, so reading never holds a second copy of a body."""
DEFLATE_MAX_RATIO = 1032
"""Deflate expands data at most 1032-fold, which bounds what a gzip file of a given size can hold."""

LOADER_PIXEL_BYTES = 1 + 4
"""Bytes per pixel a loader holds at its peak: the uint8 image and its float32 scaled copy."""
LOADER_SAMPLE_BYTES = 1 + 8
"""Bytes per sample for the labels a loader holds: as read and as int64."""


@dataclass(frozen=True)
class IdxHeader:
    """A checked IDX header: `dims[0]` rows of `dims[1:]` unsigned bytes, after `offset` bytes of header."""

    path: Path
    dims: tuple[int, ...]

    @property
    def offset(self) -> int:
        """Bytes before the body: the magic number and one 4-byte size per dimension."""
        return 4 + 4 * len(self.dims)

    @property
    def rows(self) -> int:
        """Images (or labels) the header announces."""
        return self.dims[0]

    @property
    def row_bytes(self) -> int:
        """Bytes of one image (one for a label)."""
        return math.prod(self.dims[1:])

    @property
    def body_bytes(self) -> int:
        """Bytes the header says follow it, as an exact Python int however large the dimensions."""
        return self.rows * self.row_bytes

    def corrupt(self, finding: str) -> DataError:
        """The error for a file whose contents contradict this header."""
        return DataError(
            f"data.root: {shown(self.path)} is corrupt: header says {self.dims} "
            f"({self.body_bytes} data bytes), {finding}"
        )


def _open_idx(path: Path) -> BinaryIO:
    """`path` opened for streaming reads, through a gzip decoder when its name ends in .gz."""
    with reading(path):
        return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _read_header(stream: BinaryIO, path: Path, ndim: int) -> IdxHeader:
    """The magic number and dimensions at the start of `stream`, checked against what the file can hold."""
    with reading(path):
        raw = stream.read(4 + 4 * ndim)
        size = os.fstat(stream.fileno()).st_size
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, IDX_UBYTE, ndim]):
        raise DataError(
            f"data.root: {shown(path)} is not an IDX file of {ndim}-D unsigned bytes "
            f"(magic number 0x{raw[:4].hex()})"
        )
    header = IdxHeader(path, tuple(int.from_bytes(raw[i : i + 4], "big") for i in range(4, len(raw), 4)))
    _check_file_size(header, size)
    return header


def _check_file_size(header: IdxHeader, size: int) -> None:
    """A plain file must hold exactly the header's bytes; a gzip file no more than deflate can expand to."""
    needed = header.offset + header.body_bytes
    if header.path.suffix == ".gz" and needed > DEFLATE_MAX_RATIO * size:
        raise header.corrupt(f"more than a {size}-byte gzip file can hold")
    if header.path.suffix != ".gz" and needed != size:
        raise header.corrupt(f"the file holds {size - header.offset}")


def _read_rows(stream: BinaryIO, header: IdxHeader, out: np.ndarray) -> None:
    """Fill `out` with the first len(out) rows of the body, a chunk at a time; when those are all the rows, the
    data must end there (a gzip stream inflating past its header is refused at the first byte beyond it)."""
    flat = out.reshape(-1)
    done = 0
    with reading(header.path):
        while done < flat.size:
            got = stream.readinto(flat[done : done + READ_CHUNK])
            if not got:
                raise header.corrupt(f"the data end after {done}")
            done += got
        if len(out) == header.rows and stream.read(1):
            raise header.corrupt("the data go on past them")


def _idx_headers(stack: ExitStack, paths: list[Path]) -> tuple[list[BinaryIO], list[IdxHeader]]:
    """The four files opened (closed with `stack`) and their headers, checked against each other."""
    streams = [stack.enter_context(_open_idx(p)) for p in paths]
    heads = [_read_header(s, p, n) for s, p, n in zip(streams, paths, IDX_NDIMS, strict=True)]
    for images, labels in (heads[:2], heads[2:]):
        if images.rows != labels.rows:
            raise DataError(
                f"data.root: {shown(images.path)} has {images.rows} images "
                f"but {shown(labels.path)} has {labels.rows} labels"
            )
    if heads[0].dims[1:] != heads[2].dims[1:]:
        raise DataError(
            f"data.root: image sizes differ: {shown(paths[0])} {heads[0].dims[1:]}, "
            f"{shown(paths[2])} {heads[2].dims[1:]}"
        )
    return streams, heads


def _allocate_idx(heads: list[IdxHeader], rows: list[int], field: str) -> tuple[np.ndarray, np.ndarray]:
    """Uninitialized pooled images and labels for `rows` train and test rows, once memory is known to suffice."""
    total = sum(rows)
    what = f"{total} images from {shown(heads[0].path)}" + (f" and {shown(heads[2].path)}" if rows[1] else "")
    check_fits(field, total * (heads[0].row_bytes * LOADER_PIXEL_BYTES + LOADER_SAMPLE_BYTES), what)
    return np.empty((total, *heads[0].dims[1:]), np.uint8), np.empty(total, np.uint8)


def idx_files(root: str, subdir: str, label: str) -> list[Path]:
    """The four IDX files of an MNIST-format data set, plain or gzipped, in `root` or else `root/subdir`."""
    return locate(root, subdir, IDX_FILES, label, ("", ".gz"))


def read_idx_headers(paths: list[Path]) -> list[IdxHeader]:
    """The four files' headers, checked against the files and each other; no body is read."""
    with ExitStack() as stack:
        return _idx_headers(stack, paths)[1]


def read_idx(paths: list[Path], max_samples: int | None, field: str) -> tuple[np.ndarray, np.ndarray]:
    """Pooled train + t10k images (n, rows, cols) and labels, uint8, of which only the first `max_samples` rows are
    read; `field` is named if they do not fit in memory."""
    with ExitStack() as stack:
        streams, heads = _idx_headers(stack, paths)
        rows = rows_wanted((heads[0].rows, heads[2].rows), max_samples)
        x, y = _allocate_idx(heads, rows, field)
        parts = (slice(0, rows[0]), slice(rows[0], None))
        for (images, labels), part in zip(((0, 1), (2, 3)), parts, strict=True):
            _read_rows(streams[labels], heads[labels], y[part])
            check_labels(y[part], paths[labels])
            _read_rows(streams[images], heads[images], x[part])
    return x, y
