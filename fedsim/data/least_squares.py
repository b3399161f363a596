"""Federated linear regression with a known optimum: the `least_squares` data set and its closed-form minimiser.

Client k holds rows a ~ N(mu_k, I) with targets b = a . x_k* + noise; the federated objective weighted by client
sizes is the pooled mean of 0.5 (a . w - b)^2, so `least_squares_optimum` on all training rows is its minimiser.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field

from fedsim.data.base import DATASETS, DataParams, FederatedData, Footprint
from fedsim.data.build import gather, split_train_test


class LeastSquaresParams(DataParams):
    """Problem size and how much the clients differ in their true models and in their features."""

    num_features: int = Field(10, ge=1, description="d, the length of a feature row and of the true models")
    samples_per_client: int = Field(50, ge=2, description="samples of each client (the median when size_sigma > 0)")
    size_sigma: float = Field(0.0, ge=0, description="sigma of the lognormal factor on each client's size")
    heterogeneity: float = Field(1.0, ge=0, description="std of each client's true model around the shared one")
    feature_shift: float = Field(0.0, ge=0, description="std of each client's feature mean around 0")
    noise: float = Field(0.1, ge=0, description="std of the Gaussian noise on each target")


def client_sizes(params: LeastSquaresParams, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """floor(samples_per_client * lognormal(0, size_sigma)), at least 2 each; exactly samples_per_client at 0."""
    factors = rng.lognormal(0.0, params.size_sigma, num_clients)
    return np.maximum(np.floor(params.samples_per_client * factors), 2).astype(np.int64)


def least_squares_footprint(params: LeastSquaresParams, num_clients: int) -> Footprint:
    """Expected peak of a build: float32 rows and targets held twice (drawn, then gathered into train and test),
    int64 indices, the per-client models and means, and one client's float64 draws."""
    d = params.num_features
    mean_size = params.samples_per_client * math.exp(min(params.size_sigma**2 / 2, 700)) + 2
    samples = num_clients * mean_size
    nbytes = samples * (8 * d + 40) + mean_size * (16 * d + 24) + num_clients * (24 * d + 16)
    return Footprint(int(min(nbytes, 2**63)), (d,), 1)


@DATASETS.register("least_squares", LeastSquaresParams, natural=True, task="regression",
                   footprint=least_squares_footprint)
def least_squares(params: LeastSquaresParams, num_clients: int, rng: np.random.Generator) -> FederatedData:
    """Linear regression, each client with its own true model x_k* and feature mean mu_k; float32 targets."""
    d = params.num_features
    # Draw order: client sizes, x* (d), all deviations of x_k* (clients x d), all mu_k (clients x d); then per client
    # its rows A_k (n_k x d) and its target noise (n_k); then the train/test shuffles of split_train_test.
    sizes = client_sizes(params, num_clients, rng)
    shared = rng.standard_normal(d)
    models = shared + params.heterogeneity * rng.standard_normal((num_clients, d))
    means = params.feature_shift * rng.standard_normal((num_clients, d))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    x = np.empty((int(offsets[-1]), d), dtype=np.float32)
    y = np.empty(int(offsets[-1]), dtype=np.float32)
    for k in range(num_clients):
        rows = slice(int(offsets[k]), int(offsets[k + 1]))
        x[rows] = means[k] + rng.standard_normal((int(sizes[k]), d))
        # Targets from the stored float32 rows, so noise 0 makes (x, y) exactly consistent up to y's rounding.
        y[rows] = x[rows].astype(np.float64) @ models[k] + params.noise * rng.standard_normal(int(sizes[k]))
    parts = [np.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    train, test = split_train_test(parts, rng, params.test_fraction)
    return gather(x, y, train, test, num_classes=1)


def _design(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """The rows as a float64 CPU matrix, with a trailing column of ones when there is a bias."""
    a = x.detach().to("cpu", torch.float64).reshape(len(x), -1)
    return torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], 1) if bias else a


def least_squares_optimum(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0, bias: bool = False) -> torch.Tensor:
    """argmin (1/n) sum_i 0.5 (a_i . w [+ c] - y_i)^2 + ridge/2 ||w||^2 (c not penalised), float64 on the CPU:
    w (d,), or (w, c) as (d+1,) with a bias. At ridge 0 with rank-deficient rows, the least-norm minimiser."""
    if ridge < 0 or len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need ridge >= 0 and as many targets as rows (>= 1), got ridge {ridge}, "
                         f"{len(x)} rows and {len(y)} targets")
    z = _design(x, bias)
    b = y.detach().to("cpu", torch.float64).reshape(-1, 1)
    if ridge > 0:
        # n times the objective is 0.5 ||Z t - y||^2 + 0.5 ||sqrt(n ridge) D t||^2 (D: identity on w, 0 on c), so
        # least squares on the stacked system solves the normal equations without squaring Z's condition number.
        penalty = math.sqrt(len(z) * ridge) * torch.eye(z.shape[1], dtype=torch.float64)[: z.shape[1] - bias]
        z, b = torch.cat([z, penalty]), torch.cat([b, torch.zeros(len(penalty), 1, dtype=torch.float64)])
    # gelsd (SVD) returns the least-norm solution when Z is rank-deficient.
    return torch.linalg.lstsq(z, b, driver="gelsd").solution.reshape(-1)


def least_squares_loss(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, ridge: float = 0.0,
                       bias: bool = False) -> float:
    """(1/n) sum_i 0.5 (a_i . w [+ c] - y_i)^2 + ridge/2 ||w||^2 in float64; `w` laid out as the optimum's."""
    z = _design(x, bias)
    t = w.detach().to("cpu", torch.float64).reshape(-1)
    if len(t) != z.shape[1]:
        raise ValueError(f"w has {len(t)} entries, {z.shape[1]} expected ({z.shape[1] - bias} weights, bias {bias})")
    residual = z @ t - y.detach().to("cpu", torch.float64).reshape(-1)
    weights = t[: len(t) - bias]
    return float(0.5 * residual.square().mean() + 0.5 * ridge * weights.square().sum())
