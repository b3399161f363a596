"""Model zoo: each model is a functional forward plus a parameter pytree (torch.func.functional_call).

One stateless `nn.Module` template per run defines the architecture; parameters live outside it, so a runtime can
hold one pytree per client stacked on an axis instead of one module per client.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from fedsim.errors import ScenarioError
from fedsim.params import Pytree
from fedsim.registry import Params, Registry


@dataclass(frozen=True)
class Model:
    """A functional model: `forward(params, x) -> logits` and the seeded initial parameters."""

    template: nn.Module
    init_params: Pytree

    def forward(self, params: Pytree, x: torch.Tensor) -> torch.Tensor:
        # No model here shares weights, so skip functional_call's per-call untying (a third of a small step).
        return functional_call(self.template, params, (x,), tie_weights=False)

    def loss(self, params: Pytree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the batch, the loss every classifier here trains on."""
        return nn.functional.cross_entropy(self.forward(params, x), y)


MODELS: Registry = Registry("model")
"""Entries: `fn(params, input_shape, num_classes) -> nn.Module` (the template; initialised by `build_model`)."""


def _glorot_linear_init_(module: nn.Module, generator: torch.Generator) -> None:
    """Glorot-uniform weights and zero biases for every Linear layer (TF's default, used by FedProx's code)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            fan_out, fan_in = m.weight.shape
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            with torch.no_grad():
                m.weight.uniform_(-limit, limit, generator=generator)
                m.bias.zero_()


def _default_init_(module: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Linear/Conv initialisation, drawn from our generator instead of the global one."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            fan_in = math.prod(m.weight.shape[1:])
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                m.weight.uniform_(-bound, bound, generator=generator)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=generator)


class LogRegParams(Params):
    """Multinomial logistic regression takes no architecture parameters."""


@MODELS.register("logreg", params=LogRegParams, init=_glorot_linear_init_)
def logreg(params: LogRegParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression (FedProx's `mclr`: Glorot-uniform kernel, zero bias)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


class LinearParams(Params):
    bias: bool = False


def _zero_init_(module: nn.Module, generator: torch.Generator) -> None:
    """Every parameter 0: least-squares runs start at the origin, so distances to the optimum compare across
    seeds."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


@MODELS.register("linear", params=LinearParams, init=_zero_init_)
def linear(params: LinearParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A linear map to `num_classes` outputs (1 for regression: linear least squares / ridge), starting at 0."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes, bias=params.bias))


class MLPParams(Params):
    hidden: list[int] = Field(default_factory=lambda: [200], min_length=1)
    activation: Literal["relu", "tanh"] = Field("relu", description="relu; or tanh, which makes the loss smooth "
                                                                    "(what stationarity guarantees assume)")


@MODELS.register("mlp", params=MLPParams)
def mlp(params: MLPParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multi-layer perceptron with ReLU (or tanh) activations."""
    if any(h <= 0 for h in params.hidden):
        raise ScenarioError(f"model.hidden: layer sizes must be positive (got {params.hidden})")
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in params.hidden:
        layers += [nn.Linear(width, h), nn.ReLU() if params.activation == "relu" else nn.Tanh()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class CNNParams(Params):
    channels: list[int] = Field(default_factory=lambda: [16, 32], min_length=1, max_length=3)
    hidden: int = Field(64, gt=0)


@MODELS.register("cnn", params=CNNParams)
def cnn(params: CNNParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Small CNN: [3x3 conv, ReLU, 2x2 max-pool] per channel entry, then a hidden dense layer."""
    if len(input_shape) != 3:
        raise ScenarioError(
            f"model.name: cnn needs image data shaped (channels, height, width); this data set gives {input_shape}"
        )
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out in params.channels:
        if h < 2 or w < 2:
            raise ScenarioError(f"model.channels: {len(params.channels)} pooling stages are too many for {input_shape}")
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, params.hidden), nn.ReLU(), nn.Linear(params.hidden, num_classes)]
    return nn.Sequential(*layers)


def build_model(name: str, params: Params, input_shape: tuple[int, ...], num_classes: int, seed: int) -> Model:
    """Build the template and its initial parameters, drawn deterministically from `seed`."""
    entry = MODELS.get(name, "model.name")
    template: nn.Module = entry.obj(params, input_shape, num_classes)
    init: Callable[[nn.Module, torch.Generator], None] = entry.meta.get("init", _default_init_)
    init(template, torch.Generator().manual_seed(seed))
    template.requires_grad_(False)
    return Model(template, {k: v.detach().clone() for k, v in template.named_parameters()})
