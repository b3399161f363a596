"""least_squares data set and closed-form optimum: optimality, least norm, draw order, heterogeneity, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.data import DATASETS, FederatedData, build_federated_data
from fedsim.data.build import data_rng
from fedsim.data.least_squares import (
    LeastSquaresParams,
    least_squares,
    least_squares_footprint,
    least_squares_loss,
    least_squares_optimum,
)
from fedsim.errors import ScenarioError


def _build(num_clients: int = 5, seed: int = 0, **params: object) -> FederatedData:
    return build_federated_data("least_squares", params, "natural", None, num_clients, seed)


def _gradient(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, ridge: float, bias: bool) -> torch.Tensor:
    """Gradient of the objective by autograd on least_squares_loss's formula (float64)."""
    t = t.clone().requires_grad_(True)
    z = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1) if bias else x.double()
    w = t[: len(t) - bias]
    loss = 0.5 * (z @ t - y.double()).square().mean() + 0.5 * ridge * w.square().sum()
    loss.backward()
    return t.grad


def _pooled_train(fd: FederatedData) -> tuple[torch.Tensor, torch.Tensor]:
    return fd.x_train, fd.y_train


@pytest.mark.parametrize("ridge", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_optimum_has_zero_gradient(ridge: float, bias: bool) -> None:
    x, y = _pooled_train(_build(feature_shift=2.0))
    t = least_squares_optimum(x, y, ridge, bias)
    assert t.dtype == torch.float64 and t.shape == (x.shape[1] + bias,)
    scale = _gradient(x, y, torch.zeros_like(t), ridge, bias).norm()
    assert _gradient(x, y, t, ridge, bias).norm() / scale < 1e-9


@pytest.mark.parametrize("ridge", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_optimum_beats_its_random_perturbations(ridge: float, bias: bool) -> None:
    x, y = _pooled_train(_build(feature_shift=1.0))
    t = least_squares_optimum(x, y, ridge, bias)
    best = least_squares_loss(x, y, t, ridge, bias)
    gen = torch.Generator().manual_seed(0)
    for scale in (1e-4, 1e-2, 1.0):
        for _ in range(20):
            step = scale * torch.randn(t.shape, generator=gen, dtype=torch.float64)
            assert least_squares_loss(x, y, t + step, ridge, bias) > best


def test_loss_matches_the_objective_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    y = torch.tensor([1.0, 0.0])
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    # residuals: 0.5 - 2 + 2 - 1 = -0.5 and 1.5 + 1 + 2 - 0 = 4.5; mean of squares / 2 = 5.125; ridge 0.1/2 * 1.25
    assert least_squares_loss(x, y, w, 0.1, bias=True) == pytest.approx(5.125 + 0.0625, rel=1e-15)


def test_rank_deficient_rows_give_the_least_norm_solution() -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    x = torch.cat([base, base[:, :1] + base[:, 1:2]], 1)  # 4th column = 1st + 2nd: rank 3
    y = torch.randn(30, generator=gen, dtype=torch.float64)
    w = least_squares_optimum(x, y)
    np.testing.assert_allclose(w.numpy(), (torch.linalg.pinv(x) @ y).numpy(), rtol=1e-10, atol=1e-12)
    null = torch.tensor([1.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    assert w @ null == pytest.approx(0.0, abs=1e-10)  # no component along the null space
    assert least_squares_loss(x, y, w + 0.1 * null) == pytest.approx(least_squares_loss(x, y, w), rel=1e-12)


def test_same_seed_gives_the_same_data_and_another_seed_other_data() -> None:
    a, b, c = _build(seed=3, size_sigma=0.5), _build(seed=3, size_sigma=0.5), _build(seed=4, size_sigma=0.5)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(a.train_sizes, b.train_sizes)
    assert not torch.equal(a.x_train[:10], c.x_train[:10])


def test_draw_order_is_sizes_then_shared_model() -> None:
    """Without heterogeneity or noise every client's targets follow the x* drawn second from the data stream."""
    fd = _build(num_clients=4, seed=7, heterogeneity=0.0, noise=0.0, size_sigma=0.3, feature_shift=1.5)
    rng = data_rng(7)
    rng.lognormal(0.0, 0.3, 4)
    x_star = torch.from_numpy(rng.standard_normal(10))
    w = least_squares_optimum(*_pooled_train(fd))
    assert (w - x_star).norm() / x_star.norm() < 1e-5
    for k in range(fd.num_clients):
        own = least_squares_optimum(*fd.client_train(k))
        assert (own - x_star).norm() / x_star.norm() < 1e-5


def test_heterogeneity_makes_client_optima_differ() -> None:
    fd = _build(num_clients=4, heterogeneity=1.0, noise=0.0, samples_per_client=100)
    optima = [least_squares_optimum(*fd.client_train(k)) for k in range(fd.num_clients)]
    for k in range(1, fd.num_clients):
        assert (optima[k] - optima[0]).norm() > 0.1 * optima[0].norm()


def test_client_sizes_vary_with_size_sigma_and_stay_at_least_two() -> None:
    fixed = _build(num_clients=20, samples_per_client=30, test_fraction=0.0)
    assert set(fixed.train_sizes.tolist()) == {30}
    varied = _build(num_clients=200, samples_per_client=30, size_sigma=2.0, test_fraction=0.0)
    assert varied.train_sizes.min() == 2 and varied.train_sizes.max() > 100


def test_float_targets_survive_gather_and_shards() -> None:
    fd = _build(num_clients=6)
    assert fd.x_train.dtype == fd.y_train.dtype == fd.y_test.dtype == torch.float32
    assert fd.y_train.shape == (len(fd.x_train),) and fd.num_classes == 1
    assert not torch.equal(fd.y_train, fd.y_train.round())  # real-valued, not truncated to labels
    shard = fd.shard([1, 4])
    assert shard.y_train.dtype == shard.y_test.dtype == torch.float32
    assert torch.equal(shard.client_train(4)[1], fd.client_train(4)[1])
    assert torch.equal(shard.client_test(1)[1], fd.client_test(1)[1])


def test_classification_data_keeps_int64_labels() -> None:
    fd = build_federated_data("synthetic_iid", {"num_features": 5}, "natural", None, 3, 0)
    assert fd.y_train.dtype == fd.y_test.dtype == torch.int64


@pytest.mark.parametrize("params", [{}, {"num_features": 30, "samples_per_client": 80}, {"size_sigma": 0.4}])
def test_footprint_matches_the_built_data(params: dict) -> None:
    num_clients = 40
    footprint = least_squares_footprint(LeastSquaresParams(**params), num_clients)
    fd = _build(num_clients=num_clients, **params)
    assert footprint.feature_shape == fd.feature_shape and footprint.num_classes == 1 == fd.num_classes
    actual = sum(t.numel() * t.element_size() for t in (fd.x_train, fd.y_train, fd.x_test, fd.y_test))
    assert actual / 4 <= footprint.nbytes <= 4 * actual


def test_registry_entry_declares_regression_with_natural_clients() -> None:
    meta = DATASETS.get("least_squares").meta
    assert meta["natural"] and meta["task"] == "regression" and meta["footprint"] is least_squares_footprint


def test_direct_call_equals_build_on_the_data_stream() -> None:
    direct = least_squares(LeastSquaresParams(), 3, data_rng(5))
    assert torch.equal(direct.x_train, _build(num_clients=3, seed=5).x_train)


@pytest.mark.parametrize("field, value", [("num_features", 0), ("samples_per_client", 1), ("noise", -0.1),
                                          ("heterogeneity", -1.0), ("feature_shift", -1.0), ("size_sigma", -0.5)])
def test_bad_parameters_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ScenarioError, match=rf"data\.{field}"):
        _build(**{field: value})


def test_optimum_rejects_negative_ridge_and_loss_rejects_wrong_width() -> None:
    x, y = torch.ones(3, 2), torch.ones(3)
    with pytest.raises(ValueError, match="ridge"):
        least_squares_optimum(x, y, ridge=-1.0)
    with pytest.raises(ValueError, match="3 expected"):
        least_squares_loss(x, y, torch.zeros(2), bias=True)
