"""The model zoo: functional forward, seeded initialisation, shape checks."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.errors import ScenarioError
from fedsim.models import MODELS, build_model


def make(name: str, shape=(60,), seed: int = 0, **params):
    return build_model(name, MODELS.get(name).params(**params), shape, 10, seed)


@pytest.mark.parametrize(("name", "shape"), [("logreg", (60,)), ("mlp", (60,)), ("cnn", (1, 8, 8))])
def test_initialisation_is_determined_by_the_seed(name, shape):
    a, b, c = make(name, shape, 1), make(name, shape, 1), make(name, shape, 2)
    assert all(torch.equal(a.init_params[k], b.init_params[k]) for k in a.init_params)
    assert any(not torch.equal(a.init_params[k], c.init_params[k]) for k in a.init_params)


@pytest.mark.parametrize(("name", "shape"), [("logreg", (60,)), ("mlp", (1, 8, 8)), ("cnn", (3, 32, 32))])
def test_functional_forward_gives_class_logits(name, shape):
    model = make(name, shape)
    x = torch.randn(5, *shape)
    logits = model.forward(model.init_params, x)
    assert logits.shape == (5, 10)
    doubled = {k: 2 * v for k, v in model.init_params.items()}
    assert not torch.equal(model.forward(doubled, x), logits)


def test_logreg_is_glorot_uniform_with_zero_bias_like_fedprox_mclr():
    params = make("logreg").init_params
    weight = next(v for k, v in params.items() if k.endswith("weight"))
    bias = next(v for k, v in params.items() if k.endswith("bias"))
    assert weight.shape == (10, 60)
    limit = math.sqrt(6 / 70)
    assert weight.abs().max() <= limit and weight.abs().max() > 0.9 * limit
    assert torch.equal(bias, torch.zeros(10))


def test_mlp_hidden_sizes_are_configurable():
    params = make("mlp", hidden=[32, 16]).init_params
    assert [tuple(v.shape) for k, v in params.items() if k.endswith("weight")] == [(32, 60), (16, 32), (10, 16)]


def test_cnn_on_flat_features_is_a_clear_error():
    with pytest.raises(ScenarioError, match="cnn needs image data"):
        make("cnn", (60,))
