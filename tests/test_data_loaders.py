"""Central data sets: digits, mnist1d, and the MNIST / Fashion-MNIST / CIFAR-10 readers on tiny real files."""

from __future__ import annotations

import gzip
import itertools
import os
import pickle
import random
import re
import struct
import subprocess
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import DATASETS, build_federated_data
from fedsim.data.base import CentralDataset, Footprint
from fedsim.errors import DataError, ScenarioError

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _load(name: str, **params) -> CentralDataset:
    entry, validated = DATASETS.resolve({"name": name, **params}, "data")
    return entry.obj(validated, 4, np.random.default_rng(0))


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write(path: Path, payload: bytes, gz: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _write_idx_set(
    directory: Path, gz: tuple[bool, bool, bool, bool], n_train: int = 5, n_test: int = 3
) -> tuple:
    """Random 28x28 images and labels in the four IDX files; returns the pooled (x uint8, y) expected."""
    rng = np.random.default_rng(len(str(directory)))
    x_train, x_test = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (n_train, n_test))
    y_train, y_test = (rng.integers(0, 10, n, dtype=np.uint8) for n in (n_train, n_test))
    for name, array, zipped in zip(IDX_NAMES, (x_train, y_train, x_test, y_test), gz, strict=True):
        _write(directory / name, _idx_bytes(array), zipped)
    return np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])


def _write_cifar(directory: Path, per_batch: int = 2) -> tuple:
    """Six tiny pickled batches in CIFAR-10's layout (rows of 1024 R, 1024 G, 1024 B bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with (directory / name).open("wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f, protocol=2)
        xs.append(data)
        ys.extend(labels)
    return np.concatenate(xs), np.array(ys)


def test_digits_are_1797_images_of_1x8x8_scaled_to_unit_range_with_10_classes():
    data = _load("digits")
    assert data.x.shape == (1797, 1, 8, 8) and data.x.dtype == np.float32
    assert data.x.min() == 0.0 and data.x.max() == 1.0
    assert data.y.dtype == np.int64 and set(np.unique(data.y)) == set(range(10))
    assert data.num_classes == 10


def test_mnist1d_pools_train_and_test_into_length_40_signals_balanced_over_classes():
    data = _load("mnist1d", num_samples=200)
    assert data.x.shape == (200, 40) and data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(data.y, minlength=10), np.full(10, 20))


def test_mnist1d_is_deterministic_in_the_rng_passed_in():
    entry, params = DATASETS.resolve({"name": "mnist1d", "num_samples": 100}, "data")
    a = entry.obj(params, 1, np.random.default_rng(5))
    b = entry.obj(params, 1, np.random.default_rng(5))
    c = entry.obj(params, 1, np.random.default_rng(6))
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


def test_mnist1d_leaves_the_global_random_states_untouched():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    _load("mnist1d", num_samples=100)
    assert np.random.random() == expected_np and random.random() == expected_py


def test_mnist1d_rejects_fewer_than_100_samples():
    with pytest.raises(ScenarioError, match=r"^data\.num_samples: "):
        DATASETS.resolve({"name": "mnist1d", "num_samples": 50}, "data")


def test_mnist_reads_plain_idx_files_in_root_and_pools_train_then_test(tmp_path):
    x, y = _write_idx_set(tmp_path, (False, False, False, False))
    data = _load("mnist", root=str(tmp_path))
    assert data.x.shape == (8, 1, 28, 28) and data.x.dtype == np.float32
    np.testing.assert_allclose(data.x[:, 0], x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y, y)
    assert data.y.dtype == np.int64 and data.num_classes == 10


def test_mnist_reads_gzipped_files_in_torchvision_raw_directory(tmp_path):
    x, y = _write_idx_set(tmp_path / "MNIST" / "raw", (True, True, True, True))
    data = _load("mnist", root=str(tmp_path))
    np.testing.assert_allclose(data.x[:, 0], x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y, y)


def test_fashion_mnist_reads_mixed_gz_and_plain_files_in_its_raw_directory(tmp_path):
    x, y = _write_idx_set(tmp_path / "FashionMNIST" / "raw", (True, False, False, True))
    data = _load("fashion_mnist", root=str(tmp_path))
    np.testing.assert_allclose(data.x[:, 0], x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y, y)


def test_vision_root_expands_home_and_max_samples_keeps_the_first_n(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    x, y = _write_idx_set(tmp_path / "data", (False, True, False, True))
    data = _load("mnist", root="~/data", max_samples=6)
    assert data.x.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(data.y, y[:6])
    np.testing.assert_allclose(data.x[:, 0], x[:6] / 255.0, rtol=1e-6)


def test_missing_mnist_files_raise_naming_root_and_expected_files(tmp_path):
    with pytest.raises(DataError) as err:
        _load("mnist", root=str(tmp_path / "nowhere"))
    message = str(err.value)
    assert message.startswith(f"data.root: no MNIST files in {tmp_path / 'nowhere'}")
    assert all(f"{name}[.gz]" in message for name in IDX_NAMES) and "\n" not in message


def test_incomplete_mnist_directory_names_the_missing_file(tmp_path):
    _write_idx_set(tmp_path, (False,) * 4)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        DataError, match=r"^data\.root: MNIST files incomplete in .*: missing t10k-labels-idx1-ubyte$"
    ):
        _load("mnist", root=str(tmp_path))


def test_idx_file_with_a_wrong_magic_number_raises_naming_the_file(tmp_path):
    _write_idx_set(tmp_path, (False,) * 4)
    bad = tmp_path / "train-labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + bad.read_bytes()[4:])
    with pytest.raises(DataError, match=rf"^data\.root: {bad} is not an IDX file .*0x00000803"):
        _load("mnist", root=str(tmp_path))


def test_truncated_idx_file_raises_naming_the_file(tmp_path):
    _write_idx_set(tmp_path, (False,) * 4)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(DataError, match=rf"^data\.root: {bad} is corrupt"):
        _load("mnist", root=str(tmp_path))


def test_corrupt_gzip_raises_naming_the_file(tmp_path):
    _write_idx_set(tmp_path, (True,) * 4)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"not a gzip stream")
    with pytest.raises(DataError, match=rf"^data\.root: cannot read {bad}"):
        _load("mnist", root=str(tmp_path))


def test_image_and_label_counts_must_agree(tmp_path):
    _write_idx_set(tmp_path, (False,) * 4)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(4, dtype=np.uint8)), gz=False)
    with pytest.raises(DataError, match=r"has 5 images but .* has 4 labels"):
        _load("mnist", root=str(tmp_path))


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_cifar10_reads_pickled_batches_as_rgb_planes_in_either_layout(tmp_path, subdir):
    rows, y = _write_cifar(tmp_path / subdir if subdir else tmp_path)
    data = _load("cifar10", root=str(tmp_path))
    assert data.x.shape == (12, 3, 32, 32) and data.x.dtype == np.float32
    np.testing.assert_allclose(data.x[3, 0], rows[3, :1024].reshape(32, 32) / 255.0, rtol=1e-6)
    np.testing.assert_allclose(data.x[3, 2], rows[3, 2048:].reshape(32, 32) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y, y)


def test_cifar10_max_samples_and_missing_files(tmp_path):
    _write_cifar(tmp_path)
    assert _load("cifar10", root=str(tmp_path), max_samples=5).x.shape == (5, 3, 32, 32)
    with pytest.raises(DataError, match=r"^data\.root: no CIFAR-10 files in .*\(expected data_batch_1, "):
        _load("cifar10", root=str(tmp_path / "empty"))


def test_corrupt_cifar_batch_raises_naming_the_file(tmp_path):
    _write_cifar(tmp_path)
    bad = tmp_path / "data_batch_3"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match=rf"^data\.root: {bad} is not a CIFAR-10 batch"):
        _load("cifar10", root=str(tmp_path))


def test_vision_params_require_root_and_positive_max_samples():
    with pytest.raises(ScenarioError, match=r"^data\.root: missing"):
        DATASETS.resolve({"name": "mnist"}, "data")
    with pytest.raises(ScenarioError, match=r"^data\.max_samples: "):
        DATASETS.resolve({"name": "fashion_mnist", "root": "/x", "max_samples": 0}, "data")


def test_mnist_files_build_into_federated_clients(tmp_path):
    _write_idx_set(tmp_path, (False,) * 4, n_train=30, n_test=10)
    fd = build_federated_data("mnist", {"root": str(tmp_path)}, "iid", {}, 4, seed=0)
    assert fd.num_clients == 4 and fd.feature_shape == (1, 28, 28)
    assert int(fd.train_sizes.sum() + fd.test_sizes.sum()) == 40


# Hostile and lying files: every failure is one line naming the field and the file, and memory stays small.

ONE_LINE_LIMIT = 400
SMALL_PEAK = 20 << 20


class _Reduces:
    """Pickles as whatever `reduce_value` says: how the tests write hostile pickles."""

    def __init__(self, *reduce_value) -> None:
        self.reduce_value = reduce_value

    def __reduce__(self):
        """What pickle stores for this object, and so what unpickling it calls."""
        return self.reduce_value


def _footprint(name: str, **params) -> int:
    """The peak bytes the data set's footprint estimates."""
    return _footprint_of(name, **params).nbytes


def _footprint_of(name: str, **params) -> Footprint:
    """What the data set's registered footprint says, for 4 clients."""
    entry, validated = DATASETS.resolve({"name": name, **params}, "data")
    return entry.meta["footprint"](validated, 4)


def _one_line(err: pytest.ExceptionInfo, prefix: str = "data.root: ") -> str:
    """The error's message, checked to be one bounded line starting with the scenario field."""
    message = str(err.value)
    assert message.startswith(prefix) and "\n" not in message and len(message) < ONE_LINE_LIMIT, message
    return message


def _raises_in_little_memory(fn, error: type[Exception] = DataError) -> pytest.ExceptionInfo:
    """Run `fn`, which must raise `error`, and check it allocated under SMALL_PEAK bytes on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(error) as err:
            fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < SMALL_PEAK, peak
    return err


def _idx_header(*dims: int) -> bytes:
    """An IDX header of unsigned bytes with these dimensions, and no body."""
    return bytes([0, 0, 0x08, len(dims)]) + np.asarray(dims, dtype=">u4").tobytes()


def _gzip_of_header_then_zeros(header: bytes, mebibytes: int) -> bytes:
    """A valid one-member gzip file of `header` followed by `mebibytes` MiB of zeros, built without compressing
    them: one self-contained deflate block run (a full flush ends it) repeated, then an empty final block."""
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = head.compress(header) + head.flush(zlib.Z_FULL_FLUSH)
    zeros = zlib.compressobj(9, zlib.DEFLATED, -15)
    mebibyte = bytes(1 << 20)
    run = zeros.compress(mebibyte) + zeros.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(header)
    for _ in range(mebibytes):
        crc = zlib.crc32(mebibyte, crc)
    trailer = struct.pack("<II", crc, (len(header) + (mebibytes << 20)) & 0xFFFFFFFF)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + start + run * mebibytes + b"\x03\x00" + trailer


def _sparse(path: Path, header: bytes, size: int) -> None:
    """A file of `size` bytes that takes no disk: `header`, then a hole of zeros."""
    with path.open("wb") as f:
        f.write(header)
        f.truncate(size)


def _pickle_to(path: Path, obj, protocol: int = 2) -> None:
    """Write `obj` pickled (protocol 2 by default, like the tiny batches of _write_cifar)."""
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _py2_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote CIFAR-10: protocol 2, strings as (SHORT_)BINSTRING, numpy 1's global
    names, dtype arguments as ints and memo indices counted from 1."""
    out, memo = [b"\x80\x02"], itertools.count(1)

    def emit(*opcodes: bytes, memoize: bool = True) -> None:
        out.extend(opcodes)
        if memoize:
            out.append(b"q" + bytes([next(memo)]))

    def string(s: bytes) -> None:
        emit((b"U" + bytes([len(s)]) if len(s) < 256 else b"T" + struct.pack("<i", len(s))) + s)

    emit(b"}")
    emit(b"(", memoize=False)
    string(b"data")
    emit(b"cnumpy.core.multiarray\n_reconstruct\n")
    emit(b"cnumpy\nndarray\n")
    emit(b"K\x00\x85")
    string(b"b")
    emit(b"\x87")
    emit(b"R")
    emit(b"(K\x01", b"J" + struct.pack("<i", data.shape[0]), b"J" + struct.pack("<i", data.shape[1]), b"\x86")
    emit(b"cnumpy\ndtype\n")
    string(b"u1")
    emit(b"K\x00K\x01\x87")
    emit(b"R")
    emit(b"(K\x03", memoize=False)
    string(b"|")
    emit(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t")
    emit(b"b\x89", memoize=False)
    string(data.tobytes())
    emit(b"t")
    emit(b"b", memoize=False)
    string(b"labels")
    emit(b"]")
    emit(b"(", *(b"K" + bytes([v]) for v in labels), b"e", memoize=False)
    emit(b"u.", memoize=False)
    return b"".join(out)


def _write_py2_cifar(directory: Path, per_batch: int = 2) -> tuple:
    """Six batches as the real CIFAR-10 files are pickled (see _py2_batch_pickle); returns rows and labels."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 256, (6 * per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, 6 * per_batch)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        part = slice(i * per_batch, (i + 1) * per_batch)
        (directory / name).write_bytes(_py2_batch_pickle(rows[part], [int(v) for v in labels[part]]))
    return rows, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("build", ["load", "footprint"])
def test_idx_header_claiming_2_31_by_2_31_images_with_no_body_is_one_line_corrupt_error(tmp_path, gz, build):
    _write_idx_set(tmp_path, (gz,) * 4)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_header(2**31, 2**31, 1), gz)
    run = _load if build == "load" else _footprint
    err = _raises_in_little_memory(lambda: run("mnist", root=str(tmp_path)))
    message = _one_line(err)
    assert "train-images-idx3-ubyte" in message and " is corrupt: header says (2147483648, 2147483648, 1)" in message


def test_gzip_member_inflating_far_past_its_header_is_refused_after_reading_little(tmp_path):
    _write_idx_set(tmp_path, (False, False, False, False))
    bomb = tmp_path / "train-images-idx3-ubyte"
    bomb.unlink()
    gz = bomb.with_name(bomb.name + ".gz")
    gz.write_bytes(_gzip_of_header_then_zeros(_idx_header(5, 28, 28), mebibytes=200))
    assert gz.stat().st_size < 300_000
    started = time.perf_counter()
    message = _one_line(_raises_in_little_memory(lambda: _load("mnist", root=str(tmp_path))))
    assert time.perf_counter() - started < 1.0
    assert message == f"data.root: {gz} is corrupt: header says (5, 28, 28) (3920 data bytes), the data go on past them"


def test_gzip_stream_that_ends_properly_before_its_header_s_body_is_corrupt(tmp_path):
    _write_idx_set(tmp_path, (True,) * 4)
    short = tmp_path / "t10k-labels-idx1-ubyte.gz"
    short.write_bytes(gzip.compress(_idx_header(3) + bytes([1, 2])))
    with pytest.raises(DataError) as err:
        _load("mnist", root=str(tmp_path))
    assert _one_line(err).endswith(f"{short} is corrupt: header says (3,) (3 data bytes), the data end after 2")


def test_truncated_gzip_stream_is_one_line_cannot_read_error(tmp_path):
    _write_idx_set(tmp_path, (True,) * 4)
    cut = tmp_path / "train-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        _load("mnist", root=str(tmp_path))
    assert _one_line(err) == f"data.root: cannot read {cut}: the gzip stream is truncated"


@pytest.mark.parametrize(
    ("name", "header", "expected"),
    [
        ("train-images-idx3-ubyte", b"", r"is not an IDX file of 3-D unsigned bytes \(magic number 0x00000000\)$"),
        ("train-images-idx3-ubyte", _idx_header(5, 28, 28), r"is corrupt: .*, the file holds 8589934576$"),
        ("t10k-labels-idx1-ubyte.gz", b"", r": not a gzip file, or a corrupt one$"),
    ],
)
@pytest.mark.parametrize("build", ["load", "footprint"])
def test_8_gib_sparse_idx_file_is_rejected_by_its_header_or_size_without_reading_it(
    tmp_path, name, header, expected, build
):
    _write_idx_set(tmp_path, (name.endswith(".gz"),) * 4)
    _sparse(tmp_path / name, header, 8 << 30)
    run = _load if build == "load" else _footprint
    started = time.perf_counter()
    message = _one_line(_raises_in_little_memory(lambda: run("mnist", root=str(tmp_path))))
    assert time.perf_counter() - started < 1.0
    assert str(tmp_path / name) in message and re.search(expected, message), message


def test_8_gib_sparse_cifar_batch_is_refused_by_its_size_without_reading_it(tmp_path):
    _write_cifar(tmp_path)
    _sparse(tmp_path / "data_batch_2", b"\x80\x02", 8 << 30)
    for run in (_load, _footprint):
        with pytest.raises(DataError) as err:
            run("cifar10", root=str(tmp_path))
        assert _one_line(err) == (
            f"data.root: {tmp_path / 'data_batch_2'} is not a CIFAR-10 batch: it holds 8.0 GiB, "
            "more than the 256.0 MiB any batch takes"
        )


@pytest.mark.parametrize("part", ["train", "t10k"])
def test_idx_label_outside_0_to_9_names_the_file_position_and_value(tmp_path, part):
    _write_idx_set(tmp_path, (False,) * 4)
    labels = tmp_path / f"{part}-labels-idx1-ubyte"
    values = np.frombuffer(labels.read_bytes()[8:], np.uint8).copy()
    values[2] = 12
    _write(labels, _idx_bytes(values), gz=False)
    with pytest.raises(DataError) as err:
        _load("mnist", root=str(tmp_path))
    assert _one_line(err) == f"data.root: {labels} holds label 12 at position 2, outside 0..9"


def test_max_samples_reads_only_the_rows_it_needs_from_train_then_test(tmp_path):
    x, y = _write_idx_set(tmp_path, (True,) * 4)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        whole = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(whole[: len(whole) * 3 // 4])
    data = _load("mnist", root=str(tmp_path), max_samples=2)
    np.testing.assert_allclose(data.x[:, 0], x[:2] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y, y[:2])
    with pytest.raises(DataError, match="the gzip stream is truncated"):
        _load("mnist", root=str(tmp_path))


def test_max_samples_reads_a_few_rows_of_a_huge_sparse_file_in_little_memory(tmp_path, monkeypatch):
    x, y = _write_idx_set(tmp_path, (False,) * 4)
    rows = 10**7
    _sparse(tmp_path / "train-images-idx3-ubyte", _idx_header(rows, 28, 28), 16 + rows * 784)
    _sparse(tmp_path / "train-labels-idx1-ubyte", _idx_header(rows), 8 + rows)
    tracemalloc.start()
    try:
        data = _load("mnist", root=str(tmp_path), max_samples=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < SMALL_PEAK and data.x.shape == (3, 1, 28, 28) and not data.x.any() and not data.y.any()
    assert _footprint("mnist", root=str(tmp_path), max_samples=3) < 100_000
    assert _footprint("mnist", root=str(tmp_path)) > (rows + 3) * 784 * 8
    monkeypatch.setattr("fedsim.resources.available_memory", lambda: 1 << 30)
    with pytest.raises(ScenarioError) as err:
        _load("mnist", root=str(tmp_path))
    assert _one_line(err).startswith(f"data.root: too large: {rows + 3} images from {tmp_path}")


def test_loaders_refuse_data_that_cannot_fit_in_memory_before_reading_it(tmp_path, monkeypatch):
    _write_idx_set(tmp_path / "idx", (False,) * 4)
    _write_cifar(tmp_path / "cifar")
    monkeypatch.setattr("fedsim.resources.available_memory", lambda: 1000)
    with pytest.raises(ScenarioError) as err:
        _load("mnist", root=str(tmp_path / "idx"), max_samples=6)
    assert _one_line(err, "data.max_samples: too large: 6 images from ")
    with pytest.raises(ScenarioError) as err:
        _load("cifar10", root=str(tmp_path / "cifar"))
    assert _one_line(err).startswith(f"data.root: too large: reading {tmp_path / 'cifar' / 'data_batch_1'} needs")


@pytest.mark.parametrize(
    ("payload", "protocol", "reference"),
    [
        (lambda marker: _Reduces(os.system, (f"touch {marker}",)), 2, r"posix\.system|nt\.system"),
        (lambda marker: _Reduces(exec, (f"open({str(marker)!r}, 'w').close()",)), 2, r"__builtin__\.exec"),
        (lambda marker: _Reduces(exec, (f"open({str(marker)!r}, 'w').close()",)), 4, r"builtins\.exec"),
        (lambda marker: [_Reduces(subprocess.call, (["touch", str(marker)],))], 4, r"subprocess\.call"),
    ],
)
def test_malicious_cifar_pickle_is_refused_and_its_code_never_runs(tmp_path, payload, protocol, reference):
    _write_cifar(tmp_path)
    marker = tmp_path / "marker"
    bad = tmp_path / "data_batch_1"
    _pickle_to(bad, {b"data": np.zeros((1, 3072), np.uint8), b"labels": payload(marker)}, protocol)
    with pytest.raises(DataError) as err:
        _load("cifar10", root=str(tmp_path))
    assert not marker.exists()
    message = _one_line(err)
    assert re.fullmatch(
        rf"data\.root: {re.escape(str(bad))} is not a CIFAR-10 batch: it references ({reference}), "
        r"which a CIFAR-10 batch does not hold",
        message,
    ), message


RECONSTRUCT = np.zeros(1).__reduce__()[0]
"""numpy's array reconstruction function, under whichever module name this numpy pickles it."""


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (np.array([[1, "x"]], dtype=object), "it holds an array of dtype 'O8', not a plain numeric one"),
        (np.zeros((1, 2), dtype="V8"), "it holds an array of dtype 'V8', not a plain numeric one"),
        (_Reduces(RECONSTRUCT, (np.ndarray, (2**40, 3072), b"b")), "its data are not a uint8 array of 3072 columns"),
        (
            _Reduces(RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, (2**40, 3072), np.dtype(np.uint8), False, b"abc")),
            "it holds an array of shape (1099511627776, 3072) but 3 data bytes",
        ),
        (_Reduces(RECONSTRUCT, (_Reduces, (0,), b"b")), "it references "),
        (np.zeros((2, 3000), np.uint8), "its data are not a uint8 array of 3072 columns"),
        (np.zeros((2, 3072), np.int64), "its data are not a uint8 array of 3072 columns"),
    ],
)
def test_cifar_batch_with_hostile_or_wrong_data_array_is_refused_in_little_memory(tmp_path, data, expected):
    _write_cifar(tmp_path)
    bad = tmp_path / "data_batch_4"
    _pickle_to(bad, {b"data": data, b"labels": [0, 1]})
    message = _one_line(_raises_in_little_memory(lambda: _load("cifar10", root=str(tmp_path))))
    assert message.startswith(f"data.root: {bad} is not a CIFAR-10 batch: {expected}"), message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x80\x03B" + struct.pack("<I", 2**31) + b"abc.", "malformed pickle (a string of 2147483648 bytes runs past"),
        (b"\x80\x04\x95" + struct.pack("<Q", 2**40) + b"}.", "malformed pickle (a frame of 1099511627776 bytes runs"),
        (b"\x80\x02}r\xff\xff\xff\xff.", "its pickle stores memo entry 4294967295 after only 0 others"),
        (b"\x80\x02(" + b"}" * 5000 + b"l.", "its pickle has more than the 1056 opcodes a batch of its size needs"),
        (b"\x80\x02]q\x00.", "it holds a list, not a dict"),
        (b"\x80\x02garbage", "its pickle uses opcode b'g', which a CIFAR-10 batch does not use"),
        (b"\x80\x02}q\x00", "malformed pickle (it ends before its STOP opcode)"),
        (b"\x80\x04\x8c\x05posix\x94K\x01\x93.", "its pickle names a global by values that are not plain strings"),
        (b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94\x93.", "it references posix.system, which a CIFAR-10 batch"),
        (b"\x80\x02cos\nsystem" + b"x" * 300 + b"\n.", "malformed pickle (a global's name is unterminated or too"),
    ],
)
def test_cifar_pickle_with_lying_counts_or_structure_is_refused_before_unpickling(tmp_path, raw, expected):
    _write_cifar(tmp_path)
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(raw)
    message = _one_line(_raises_in_little_memory(lambda: _load("cifar10", root=str(tmp_path))))
    assert message.startswith(f"data.root: {bad} is not a CIFAR-10 batch: {expected}"), message


def test_cifar_footprint_refuses_a_malicious_batch_without_unpickling_it_or_reading_images(tmp_path):
    _write_py2_cifar(tmp_path, per_batch=1000)
    tracemalloc.start()
    try:
        footprint = _footprint("cifar10", root=str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and footprint > 6000 * 3072 * 8
    marker = tmp_path / "marker"
    _pickle_to(tmp_path / "test_batch", {b"data": _Reduces(os.system, (f"touch {marker}",))}, protocol=4)
    with pytest.raises(DataError) as err:
        _footprint("cifar10", root=str(tmp_path))
    assert not marker.exists()
    assert _one_line(err) == (
        f"data.root: {tmp_path / 'test_batch'} is not a CIFAR-10 batch: it references posix.system, "
        "which a CIFAR-10 batch does not hold"
    )


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([3, 10], "holds label 10 at position 1, outside 0..9"),
        (np.array([-1, 2]), "holds label -1 at position 0, outside 0..9"),
        ([1, 2**62], "holds label 4611686018427387904 at position 1, outside 0..9"),
        ([1, 2**70], "is not a CIFAR-10 batch: its pickle holds an integer of more than 64 bits"),
        ([1, "2"], "is not a CIFAR-10 batch: its labels are not a list of integers"),
        ([True, False], "is not a CIFAR-10 batch: its labels are not a list of integers"),
        ([1.0, 2.0], "is not a CIFAR-10 batch: its pickle uses opcode b'G', which a CIFAR-10 batch does not use"),
        ([1, 2, 3], "has 2 images but 3 labels"),
    ],
)
def test_cifar_labels_must_be_one_integer_class_in_0_to_9_per_image(tmp_path, labels, expected):
    _write_cifar(tmp_path)
    bad = tmp_path / "test_batch"
    _pickle_to(bad, {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels})
    with pytest.raises(DataError) as err:
        _load("cifar10", root=str(tmp_path))
    assert _one_line(err) == f"data.root: {bad} {expected}"


def test_cifar10_reads_batches_pickled_by_python_2_and_numpy_1_as_the_real_files_are(tmp_path):
    rows, y = _write_py2_cifar(tmp_path)
    unrestricted = pickle.loads((tmp_path / "data_batch_2").read_bytes(), encoding="bytes")
    assert np.array_equal(unrestricted[b"data"], rows[2:4]) and unrestricted[b"labels"] == list(y[2:4])
    data = _load("cifar10", root=str(tmp_path))
    np.testing.assert_allclose(data.x.reshape(12, 3072), rows / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y, y)


def test_cifar_labels_stored_as_an_integer_array_load_as_plain_numpy_arrays(tmp_path):
    rows, y = _write_cifar(tmp_path)
    _pickle_to(tmp_path / "data_batch_1", {"data": rows[:2], "labels": y[:2].astype(np.uint8)}, protocol=4)
    data = _load("cifar10", root=str(tmp_path))
    np.testing.assert_array_equal(data.y, y)
    assert type(data.x) is np.ndarray and type(data.y) is np.ndarray and data.y.dtype == np.int64


def test_cifar10_max_samples_reads_only_the_batches_it_needs(tmp_path):
    rows, y = _write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x80\x02garbage")
    data = _load("cifar10", root=str(tmp_path), max_samples=5)
    np.testing.assert_allclose(data.x.reshape(5, 3072), rows[:5] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y, y[:5])
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR-10 batch: its pickle uses opcode b'g'"):
        _load("cifar10", root=str(tmp_path))


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_footprint_bounds_the_measured_peak_of_building_the_data_set(tmp_path, name):
    if name == "mnist":
        _write_idx_set(tmp_path, (False, True, True, False), n_train=2000, n_test=500)
    else:
        _write_py2_cifar(tmp_path, per_batch=200)
    footprint = _footprint(name, root=str(tmp_path))
    tracemalloc.start()
    try:
        data = build_federated_data(name, {"root": str(tmp_path)}, "iid", {}, 10, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= footprint <= 1.5 * peak, (peak, footprint)
    assert _footprint_of(name, root=str(tmp_path)) == Footprint(footprint, data.feature_shape, data.num_classes)


def test_footprint_is_proportional_to_the_samples_kept_and_reads_no_image_body(tmp_path):
    _write_idx_set(tmp_path, (True,) * 4)
    full = _footprint("fashion_mnist", root=str(tmp_path))
    assert full == 8 * _footprint("fashion_mnist", root=str(tmp_path), max_samples=1)
    assert _footprint("fashion_mnist", root=str(tmp_path), max_samples=6) == 6 * full // 8
    assert _footprint("fashion_mnist", root=str(tmp_path), max_samples=100) == full
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:40])
    assert _footprint("fashion_mnist", root=str(tmp_path)) == full
    with pytest.raises(DataError, match="the gzip stream is truncated"):
        _load("fashion_mnist", root=str(tmp_path))


@pytest.mark.parametrize(
    ("name", "label"), [("mnist", "MNIST"), ("fashion_mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10")]
)
def test_footprint_of_an_empty_directory_raises_the_loader_s_missing_files_error(tmp_path, name, label):
    with pytest.raises(DataError) as from_footprint:
        _footprint(name, root=str(tmp_path))
    with pytest.raises(DataError) as from_load:
        _load(name, root=str(tmp_path))
    assert _one_line(from_footprint) == str(from_load.value)
    assert str(from_load.value).startswith(f"data.root: no {label} files in {tmp_path}")


def test_paths_with_line_breaks_are_escaped_so_errors_stay_one_line(tmp_path):
    root = tmp_path / "a\nb"
    _write_idx_set(root, (False,) * 4)
    (root / "train-labels-idx1-ubyte").write_bytes(b"junk")
    with pytest.raises(DataError) as err:
        _load("mnist", root=str(root))
    assert "a\\nb" in _one_line(err)
