"""The oracle a client rule's `step` asks for gradients, per-sample gradients and random draws.

Every oracle differentiates the task's weighted mean minibatch loss (`fedsim.tasks.Objective`); they differ only
in how, so a rule gets the same numbers from each (to float rounding) and never knows which it got:
- `AutogradOracle`: `torch.autograd.grad` on the mean loss, for batches without padding (about 3x less per-step
  overhead than torch.func on small models): the sequential runtime and the vectorized runtime's unbatched tail.
- `FuncOracle`: `torch.func.grad`, which runs under vmap: the vectorized runtime, and every runtime's Poisson-sampled
  steps (`local_oracle`, whose loss is the batch's sum over its expected size), on the weighted loss for padded
  batches or the plain mean of per-sample losses where every sample of the step counts (fewer ops).
Random draws are counter-based (`fedsim.keyed_random`), keyed by the job's key, the step and a stream, so a job
draws the same numbers in every runtime, batched or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.func import grad as func_grad
from torch.func import grad_and_value, vmap

from fedsim import keyed_random
from fedsim.params import Pytree, tree_leaves, tree_map
from fedsim.tasks import Objective

if TYPE_CHECKING:  # clients/ imports this module (rules wrapping the oracle), so no runtime import back
    from fedsim.clients import Batch, BatchingParams

STREAMS_PER_STEP = 1 << 16
"""Random streams a rule may use per step (the `stream` argument of `normal` and `uniform`)."""


def _salt(batch: Batch, stream: int) -> torch.Tensor:
    if not 0 <= stream < STREAMS_PER_STEP:
        raise ValueError(f"oracle: random stream {stream} is outside [0, {STREAMS_PER_STEP})")
    return batch.step * STREAMS_PER_STEP + stream


class KeyedDraws:
    """The oracle's random draws, shared by every oracle."""

    def normal(self, batch: Batch, like: Pytree, stream: int = 0) -> Pytree:
        return keyed_random.tree_normal(batch.key, _salt(batch, stream), like)

    def uniform(self, batch: Batch, like: Pytree, stream: int = 0) -> Pytree:
        salt = _salt(batch, stream)
        leaves = iter(range(sum(1 for _ in tree_leaves(like))))
        return tree_map(lambda v: keyed_random.uniform(keyed_random.fold_in(batch.key, next(leaves)), salt,
                                                       v.shape, v.dtype), like)

    def per_sample_grads(self, params: Pytree, batch: Batch) -> Pytree:
        return vmap(func_grad(self.objective.sample_loss), in_dims=(None, 0, 0))(params, batch.x, batch.y)

    objective: Objective


class AutogradOracle(KeyedDraws):
    """Gradients by `torch.autograd.grad` of the mean loss; only for batches whose weights are all 1."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective

    def value_and_grad(self, params: Pytree, batch: Batch) -> tuple[torch.Tensor, Pytree]:
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            loss = self.objective.mean_loss(leaves, batch.x, batch.y)
            grads = torch.autograd.grad(loss, tuple(leaves.values()))
        return loss.detach(), dict(zip(leaves, grads, strict=True))

    def grad(self, params: Pytree, batch: Batch) -> Pytree:
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(self.objective.mean_loss(leaves, batch.x, batch.y), tuple(leaves.values()))
        return dict(zip(leaves, grads, strict=True))


class FuncOracle(KeyedDraws):
    """Gradients by `torch.func`, usable under vmap: of the weighted loss (`weighted`; over `denominator` when given,
    for Poisson-sampled batches), or of the plain mean for steps where every weight is 1."""

    def __init__(self, objective: Objective, weighted: bool, denominator: float | None = None) -> None:
        self.objective, self.weighted = objective, weighted

        def loss(params: Pytree, batch: Batch) -> torch.Tensor:
            if weighted:
                return objective.weighted_loss(params, batch.x, batch.y, batch.w, denominator)
            return objective.per_sample_mean_loss(params, batch.x, batch.y)

        self._grad, self._value_and_grad = func_grad(loss), grad_and_value(loss)

    def value_and_grad(self, params: Pytree, batch: Batch) -> tuple[torch.Tensor, Pytree]:
        grads, value = self._value_and_grad(params, batch)
        return value, grads

    def grad(self, params: Pytree, batch: Batch) -> Pytree:
        return self._grad(params, batch)


def local_oracle(objective: Objective, hp: BatchingParams) -> AutogradOracle | FuncOracle:
    """The oracle of one client's unbatched local steps: autograd on the batch mean for shuffled batches, and for
    Poisson-sampled ones (padded, possibly empty) the weighted sum over the expected batch size."""
    if hp.sampling == "poisson":
        return FuncOracle(objective, weighted=True, denominator=float(hp.batch_size))
    return AutogradOracle(objective)
