"""Central data sets: digits, mnist1d, and the MNIST / Fashion-MNIST / CIFAR-10 readers on tiny real files."""

from __future__ import annotations

import gzip
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import DATASETS, build_federated_data
from fedsim.data.base import CentralDataset
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
