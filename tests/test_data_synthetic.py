"""FedProx Synthetic(alpha, beta) and Synthetic-IID: sizes, splits, draw order, what alpha/beta control."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data import DATASETS, FederatedData, build_federated_data
from fedsim.data.build import data_rng
from fedsim.data.synthetic import SyntheticIIDParams, SyntheticParams, device_sizes, synthetic, synthetic_iid
from fedsim.errors import ScenarioError


def _client_xy(fd: FederatedData, k: int) -> tuple[np.ndarray, np.ndarray]:
    (xa, ya), (xb, yb) = fd.client_train(k), fd.client_test(k)
    return np.concatenate([xa.numpy(), xb.numpy()]), np.concatenate([ya.numpy(), yb.numpy()])


def _device_feature_means(fd: FederatedData) -> np.ndarray:
    return np.array([_client_xy(fd, k)[0].mean() for k in range(fd.num_clients)])


def _mean_label_tv(fd: FederatedData) -> float:
    """Mean total-variation distance between each device's label histogram and the pooled one."""
    ys = [_client_xy(fd, k)[1] for k in range(fd.num_clients)]
    pooled = np.bincount(np.concatenate(ys), minlength=fd.num_classes) / sum(len(y) for y in ys)
    hists = [np.bincount(y, minlength=fd.num_classes) / len(y) for y in ys]
    return float(np.mean([0.5 * np.abs(h - pooled).sum() for h in hists]))


def _authors_synthetic(rng: np.random.Generator, devices: int, alpha: float, beta: float) -> tuple:
    """generate_synthetic.py (litian96/FedProx) transcribed draw for draw onto a Generator, then the split."""
    dim, classes = 60, 10
    samples = rng.lognormal(4, 2, devices).astype(int) + 50
    mean_w = rng.normal(0, alpha, devices)
    mean_b = mean_w
    big_b = rng.normal(0, beta, devices)
    cov = np.diag([(j + 1) ** -1.2 for j in range(dim)])
    mean_x = np.zeros((devices, dim))
    for i in range(devices):
        mean_x[i] = rng.normal(big_b[i], 1, dim)
    xs, ys = [], []
    for i in range(devices):
        w = rng.normal(mean_w[i], 1, (dim, classes))
        b = rng.normal(mean_b[i], 1, classes)
        xx = rng.multivariate_normal(mean_x[i], cov, samples[i])
        xs.append(xx)
        ys.append(np.array([np.argmax(xx[j] @ w + b) for j in range(samples[i])]))
    return _split_like_the_authors(rng, xs, ys)


def _authors_synthetic_iid(rng: np.random.Generator, devices: int) -> tuple:
    """generate_iid.py (litian96/FedProx) transcribed draw for draw onto a Generator, then the split."""
    dim, classes = 60, 10
    samples = rng.lognormal(4, 2, devices).astype(int) + 50
    cov = np.diag([(j + 1) ** -1.2 for j in range(dim)])
    w = rng.normal(0, 1, (dim, classes))
    b = rng.normal(0, 1, classes)
    xs = [rng.multivariate_normal(np.zeros(dim), cov, samples[i]) for i in range(devices)]
    ys = [np.array([np.argmax(row @ w + b) for row in xx]) for xx in xs]
    return _split_like_the_authors(rng, xs, ys)


def _split_like_the_authors(rng: np.random.Generator, xs: list, ys: list) -> tuple:
    """Per device, after all devices are drawn: shuffle, train = first int(0.9 n), test = the rest."""
    train, test = [], []
    for xx, yy in zip(xs, ys, strict=True):
        order = rng.permutation(len(yy))
        cut = int(0.9 * len(yy))
        train.append((xx[order[:cut]], yy[order[:cut]]))
        test.append((xx[order[cut:]], yy[order[cut:]]))
    return train, test


def _assert_same_devices(fd: FederatedData, train: list, test: list) -> None:
    for k in range(fd.num_clients):
        np.testing.assert_array_equal(fd.client_train(k)[0].numpy(), train[k][0].astype(np.float32))
        np.testing.assert_array_equal(fd.client_train(k)[1].numpy(), train[k][1])
        np.testing.assert_array_equal(fd.client_test(k)[0].numpy(), test[k][0].astype(np.float32))
        np.testing.assert_array_equal(fd.client_test(k)[1].numpy(), test[k][1])


def test_synthetic_reproduces_the_authors_draw_order_exactly():
    fd = synthetic(SyntheticParams(alpha=0.5, beta=0.7), 4, np.random.default_rng(11))
    _assert_same_devices(fd, *_authors_synthetic(np.random.default_rng(11), 4, alpha=0.5, beta=0.7))


def test_synthetic_iid_reproduces_the_authors_draw_order_exactly():
    fd = synthetic_iid(SyntheticIIDParams(), 4, np.random.default_rng(12))
    _assert_same_devices(fd, *_authors_synthetic_iid(np.random.default_rng(12), 4))


def test_alpha_leaves_the_data_unchanged_as_in_the_authors_generator():
    # u_k is added to every entry of W_k and b_k, shifting all class logits equally: argmax ignores it.
    low = synthetic(SyntheticParams(alpha=0.0), 6, np.random.default_rng(2))
    high = synthetic(SyntheticParams(alpha=3.0), 6, np.random.default_rng(2))
    assert np.array_equal(low.x_train.numpy(), high.x_train.numpy())
    assert np.array_equal(low.y_train.numpy(), high.y_train.numpy())


def test_synthetic_has_one_device_per_client_with_float32_features_and_int64_labels():
    fd = synthetic(SyntheticParams(num_features=7, num_classes=3), 13, np.random.default_rng(0))
    assert fd.num_clients == 13
    assert fd.feature_shape == (7,)
    assert fd.x_train.dtype.is_floating_point and fd.x_train.element_size() == 4
    assert str(fd.y_train.dtype) == "torch.int64"
    assert set(np.unique(fd.y_train.numpy())) <= {0, 1, 2}
    assert fd.num_classes == 3


def test_device_sizes_are_truncated_lognormal_4_2_plus_50():
    sizes = device_sizes(np.random.default_rng(0), 5000, 1)
    assert sizes.dtype.kind == "i" and sizes.min() >= 50
    excess = sizes - 50
    median, q90 = np.median(excess), np.quantile(excess, 0.9)
    assert 45 <= median <= 65  # e^4 = 54.6
    assert 9 <= q90 / median <= 17  # e^(2 * 1.2816) = 13.0 for sigma 2


def test_sample_scale_multiplies_every_device_size():
    base = synthetic(SyntheticParams(), 10, np.random.default_rng(7))
    scaled = synthetic(SyntheticParams(sample_scale=3), 10, np.random.default_rng(7))
    base_total = base.train_sizes + base.test_sizes
    scaled_total = scaled.train_sizes + scaled.test_sizes
    np.testing.assert_array_equal(scaled_total, 3 * base_total)
    assert scaled_total.min() >= 150


@pytest.mark.parametrize("test_fraction", [0.1, 0.25])
def test_each_device_trains_on_the_first_int_of_one_minus_test_fraction_of_its_samples(test_fraction):
    fd = synthetic(SyntheticParams(test_fraction=test_fraction), 12, np.random.default_rng(1))
    total = fd.train_sizes + fd.test_sizes
    np.testing.assert_array_equal(fd.train_sizes, [int((1 - test_fraction) * n) for n in total])


def test_synthetic_is_deterministic_for_a_seed_and_changes_with_it():
    a = synthetic(SyntheticParams(), 6, np.random.default_rng(5))
    b = synthetic(SyntheticParams(), 6, np.random.default_rng(5))
    c = synthetic(SyntheticParams(), 6, np.random.default_rng(6))
    assert np.array_equal(a.x_train.numpy(), b.x_train.numpy())
    assert np.array_equal(a.y_test.numpy(), b.y_test.numpy())
    assert a.x_train.shape != c.x_train.shape or not np.array_equal(a.x_train.numpy(), c.x_train.numpy())


def test_beta_is_the_standard_deviation_of_the_device_feature_means():
    wide = synthetic(SyntheticParams(alpha=0, beta=4), 60, np.random.default_rng(0))
    narrow = synthetic(SyntheticParams(alpha=0, beta=0), 60, np.random.default_rng(0))
    # device mean = B_k + noise of sd ~0.13: sd across devices ~4 if beta is a std (2 if it were a variance)
    assert 3.0 <= _device_feature_means(wide).std() <= 5.5
    assert _device_feature_means(narrow).std() < 0.3


def test_synthetic_iid_centres_every_device_on_zero_unlike_synthetic_1_1():
    iid = synthetic_iid(SyntheticIIDParams(), 30, np.random.default_rng(0))
    skewed = synthetic(SyntheticParams(alpha=1, beta=1), 30, np.random.default_rng(0))
    assert np.abs(_device_feature_means(iid)).max() < 0.1
    assert _device_feature_means(skewed).std() > 0.5


def test_synthetic_iid_devices_share_one_labeller_so_label_mixes_match_across_devices():
    iid = synthetic_iid(SyntheticIIDParams(), 30, np.random.default_rng(0))
    skewed = synthetic(SyntheticParams(alpha=1, beta=1), 30, np.random.default_rng(0))
    assert _mean_label_tv(iid) < 0.25
    assert _mean_label_tv(skewed) > 0.5


def test_synthetic_params_reject_negative_std_and_iid_rejects_alpha():
    with pytest.raises(ScenarioError, match=r"^data\.beta: "):
        DATASETS.resolve({"name": "synthetic", "beta": -1}, "data")
    with pytest.raises(ScenarioError, match=r"^data\.alpha: unknown field"):
        DATASETS.resolve({"name": "synthetic_iid", "alpha": 1}, "data")
    assert DATASETS.get("synthetic").meta["natural"] and DATASETS.get("synthetic_iid").meta["natural"]


def test_builder_returns_the_natural_devices_drawn_from_data_stream_of_the_seed():
    built = build_federated_data("synthetic", {}, "natural", {}, 8, seed=42)
    direct = synthetic(SyntheticParams(), 8, data_rng(42))
    other = build_federated_data("synthetic", {}, "natural", {}, 8, seed=43)
    assert np.array_equal(built.x_train.numpy(), direct.x_train.numpy())
    np.testing.assert_array_equal(built.train_sizes, direct.train_sizes)
    assert not np.array_equal(built.train_sizes, other.train_sizes)
    assert np.array_equal(
        data_rng(42).random(3), np.random.default_rng(np.random.SeedSequence([42, 1])).random(3)
    )


def test_builder_pools_natural_devices_before_another_partitioner():
    natural = build_federated_data("synthetic", {}, "natural", {}, 8, seed=0)
    repartitioned = build_federated_data("synthetic", {}, "iid", {}, 8, seed=0)
    total = int(natural.train_sizes.sum() + natural.test_sizes.sum())
    assert int(repartitioned.train_sizes.sum() + repartitioned.test_sizes.sum()) == total
    sizes = repartitioned.train_sizes + repartitioned.test_sizes
    assert sizes.max() - sizes.min() <= 1
