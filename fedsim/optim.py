"""Server optimizers as composable transforms, the way optax composes gradient transformations.

A transform is an `init(params) -> state` and `update(direction, state) -> (step, state)` pair on pytrees, where
`direction` is the server's ascent direction (FedOpt's negated pseudo-gradient: the mean client change) and the
server adds `step` to its model. FedAvg is `scale(lr)`, FedAvgM is `chain(trace(beta), scale(lr))`, FedAdam is
`adam(lr, ...)` (Reddi et al., ICLR 2021, Algorithm 2); future rules (FedYogi, learning-rate schedules,
hypergradient methods) are further transforms, not further server rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedsim.params import Pytree, tree_map, tree_zeros_like


@dataclass(frozen=True)
class Transform:
    """An init/update pair; the state is a pytree of tensors (so it checkpoints as plain data)."""

    init: Callable[[Pytree], Pytree]
    update: Callable[[Pytree, Pytree], tuple[Pytree, Pytree]]


def scale(factor: float) -> Transform:
    """step = factor * direction (FedAvg's server learning rate)."""
    return Transform(lambda params: {}, lambda d, state: (tree_map(lambda v: factor * v, d), state))


def trace(decay: float) -> Transform:
    """Heavy-ball momentum: v <- decay v + direction; step = v (FedAvgM, Hsu et al. 2019)."""

    def update(d: Pytree, state: Pytree) -> tuple[Pytree, Pytree]:
        v = tree_map(lambda old, g: decay * old + g, state["velocity"], d)
        return v, {"velocity": v}

    return Transform(lambda params: {"velocity": tree_zeros_like(params)}, update)


def adam(lr: float, beta1: float, beta2: float, tau: float, bias_correction: bool = False) -> Transform:
    """FedAdam (Reddi et al. Algorithm 2): m <- b1 m + (1-b1) D; v <- b2 v + (1-b2) D^2; step = lr m / (sqrt(v)
    + tau). Algorithm 2 has no bias correction; `bias_correction` divides m by 1 - b1^t and v by 1 - b2^t first
    (Kingma & Ba), as the Keras Adam inside the authors' TensorFlow code does (Keras also moves epsilon inside its
    step size; we keep tau where the paper puts it)."""

    def init(params: Pytree) -> Pytree:
        return {"m": tree_zeros_like(params), "v": tree_zeros_like(params), "count": torch.zeros((), dtype=torch.int64)}

    def update(d: Pytree, state: Pytree) -> tuple[Pytree, Pytree]:
        m = tree_map(lambda old, g: beta1 * old + (1 - beta1) * g, state["m"], d)
        v = tree_map(lambda old, g: beta2 * old + (1 - beta2) * g * g, state["v"], d)
        count = state["count"] + 1
        if bias_correction:
            t = int(count)
            m_hat = tree_map(lambda x: x / (1 - beta1**t), m)
            v_hat = tree_map(lambda x: x / (1 - beta2**t), v)
        else:
            m_hat, v_hat = m, v
        step = tree_map(lambda a, b: lr * a / (torch.sqrt(b) + tau), m_hat, v_hat)
        return step, {"m": m, "v": v, "count": count}

    return Transform(init, update)


def chain(*transforms: Transform) -> Transform:
    """Apply transforms in order, each to the previous one's step; the state holds each one's state."""

    def init(params: Pytree) -> Pytree:
        return {str(i): t.init(params) for i, t in enumerate(transforms)}

    def update(d: Pytree, state: Pytree) -> tuple[Pytree, Pytree]:
        new = {}
        for i, t in enumerate(transforms):
            d, new[str(i)] = t.update(d, state[str(i)])
        return d, new

    return Transform(init, update)
