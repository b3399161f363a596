"""FedProx's Synthetic(alpha, beta) and Synthetic-IID: one device per client, drawn as the authors draw them.

Follows litian96/FedProx `data/synthetic_1_1/generate_synthetic.py` and `data/synthetic_iid/generate_iid.py`
draw for draw (same distributions, same order), but from the numpy Generator passed in instead of the
unseeded global numpy state, and with each device's shuffle drawn from that Generator too (the authors use
Python's `random.shuffle`, after all devices are generated). BLAS runs on one thread while drawing: the
matrices are small, and a multi-threaded BLAS sharing busy cores slowed generation 30-100x in our tests.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field
from threadpoolctl import threadpool_limits

from fedsim.data.base import DATASETS, DataParams, FederatedData, Footprint
from fedsim.data.build import gather, split_train_test


class SyntheticIIDParams(DataParams):
    """Shape of the generated problem; pFedMe uses 100 devices and sample_scale 5."""

    num_features: int = Field(default=60, gt=0)
    num_classes: int = Field(default=10, ge=2)
    sample_scale: int = Field(default=1, ge=1)


class SyntheticParams(SyntheticIIDParams):
    """alpha: std of the per-device model mean u_k; beta: std of the per-device feature mean B_k."""

    alpha: float = Field(default=1.0, ge=0)
    beta: float = Field(default=1.0, ge=0)


def device_sizes(rng: np.random.Generator, num_devices: int, sample_scale: int) -> np.ndarray:
    """Samples per device: (int(lognormal(4, 2)) + 50) * sample_scale, a heavy tail with a floor of 50."""
    return (rng.lognormal(4, 2, num_devices).astype(int) + 50) * sample_scale


def feature_cov(num_features: int) -> np.ndarray:
    """Sigma = diag((j + 1)^-1.2): later features vary less."""
    return np.diag(np.power(np.arange(1, num_features + 1, dtype=float), -1.2))


def _label(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmax of the logits (the authors' argmax of softmax, without its overflow risk)."""
    return np.argmax(x @ w + b, axis=1).astype(np.int64)


def _assemble(
    xs: list[np.ndarray], ys: list[np.ndarray], rng: np.random.Generator, params: SyntheticIIDParams
) -> FederatedData:
    """Shuffle each device, split it into train/test, and concatenate the devices."""
    bounds = np.cumsum([0] + [len(y) for y in ys])
    parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    train, test = split_train_test(parts, rng, params.test_fraction)
    return gather(np.concatenate(xs), np.concatenate(ys), train, test, params.num_classes)


MEAN_DEVICE_SIZE = math.exp(4 + 2**2 / 2) + 50
"""Expected samples per device before sample_scale: the mean of lognormal(4, 2), plus the floor of 50."""


def synthetic_footprint(params: SyntheticIIDParams, num_clients: int) -> Footprint:
    """Expected peak of a build: each sample drawn in float64, kept in float32, then gathered into train and test
    tensors (about 24 bytes a feature) and its logits (8 bytes a class), plus the d x d covariance and its
    factorisation and a device's d x c labeller."""
    samples = num_clients * MEAN_DEVICE_SIZE * params.sample_scale
    labeller = 2 * 8 * (params.num_features + 1) * params.num_classes
    nbytes = samples * (24 * params.num_features + 8 * params.num_classes + 16) + 4 * 8 * params.num_features**2 \
        + labeller
    return Footprint(int(min(nbytes, 2**63)), (params.num_features,), params.num_classes)


@DATASETS.register("synthetic", SyntheticParams, natural=True, footprint=synthetic_footprint)
def synthetic(params: SyntheticParams, num_clients: int, rng: np.random.Generator) -> FederatedData:
    """Synthetic(alpha, beta) of FedProx: each device has its own linear labeller and feature mean."""
    with threadpool_limits(limits=1, user_api="blas"):
        xs, ys = _draw_synthetic(params, num_clients, rng)
        return _assemble(xs, ys, rng, params)


def _draw_synthetic(params: SyntheticParams, num_clients: int, rng: np.random.Generator) -> tuple[list, list]:
    d, c = params.num_features, params.num_classes
    # Draw order of generate_synthetic.py: sizes, u_k, B_k, all v_k, then per device W_k, b_k, X_k.
    sizes = device_sizes(rng, num_clients, params.sample_scale)
    mean_w = rng.normal(0, params.alpha, num_clients)
    mean_b = mean_w
    big_b = rng.normal(0, params.beta, num_clients)
    cov = feature_cov(d)
    mean_x = [rng.normal(big_b[k], 1, d) for k in range(num_clients)]
    xs, ys = [], []
    for k in range(num_clients):
        w = rng.normal(mean_w[k], 1, (d, c))
        b = rng.normal(mean_b[k], 1, c)
        x = rng.multivariate_normal(mean_x[k], cov, sizes[k])
        ys.append(_label(x, w, b))
        xs.append(x.astype(np.float32))  # labelled in float64; kept in float32, as the data set stores it
    return xs, ys


@DATASETS.register("synthetic_iid", SyntheticIIDParams, natural=True, footprint=synthetic_footprint)
def synthetic_iid(params: SyntheticIIDParams, num_clients: int, rng: np.random.Generator) -> FederatedData:
    """Synthetic-IID of FedProx: one global linear labeller, every device's features centred on 0."""
    with threadpool_limits(limits=1, user_api="blas"):
        xs, ys = _draw_synthetic_iid(params, num_clients, rng)
        return _assemble(xs, ys, rng, params)


def _draw_synthetic_iid(
    params: SyntheticIIDParams, num_clients: int, rng: np.random.Generator
) -> tuple[list, list]:
    d, c = params.num_features, params.num_classes
    # Draw order of generate_iid.py: sizes, global W, global b, then X_k per device.
    sizes = device_sizes(rng, num_clients, params.sample_scale)
    cov = feature_cov(d)
    w = rng.normal(0, 1, (d, c))
    b = rng.normal(0, 1, c)
    xs, ys = [], []
    for n in sizes:
        x = rng.multivariate_normal(np.zeros(d), cov, n)
        ys.append(_label(x, w, b))
        xs.append(x.astype(np.float32))  # labelled in float64; kept in float32, as the data set stores it
    return xs, ys
