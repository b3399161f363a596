"""Tasks: what a model's outputs are scored against. The loss belongs to the task, never to a runtime.

A task gives the per-sample loss (for weighted minibatches and per-sample gradients), the plain mean loss (the
fast path for full minibatches) and the sums evaluation adds up over clients. `classification` is cross-entropy
on integer labels; `regression` is squared error 0.5 (f(x) - y)^2 on float targets, with an optional ridge
penalty on the weights. A data set names its task (`task` in its registry metadata; classification by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from pydantic import Field
from torch import nn

from fedsim.models import Model
from fedsim.params import Pytree
from fedsim.registry import NoParams, Params, Registry


class Task(Protocol):
    """A loss on model outputs and the evaluation sums that go with it."""

    metrics: tuple[str, ...]
    """Test metrics this task reports besides the losses (e.g. accuracy)."""

    def per_sample_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def mean_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def penalty(self, params: Pytree) -> torch.Tensor | float:
        """A term added to every minibatch's loss (0 for none)."""
        ...

    def eval_sums(self, outputs: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """float64 sums over the rows: "loss" (summed, without the penalty) and one per metric."""
        ...


TASKS: Registry = Registry("task")
"""Entries: a Task class constructed with its validated parameters."""


@TASKS.register("classification", params=NoParams)
class Classification:
    """Cross-entropy on integer labels; reports accuracy."""

    metrics = ("accuracy",)

    def __init__(self, params: NoParams) -> None:
        self.params = params

    def per_sample_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # logsumexp minus the true logit: F.cross_entropy's value, but under vmap on CPU about twice as fast for few
        # classes (torch's log_softmax costs ~100 ns a row, nll_loss's batching rule a dozen ops).
        return torch.logsumexp(outputs, -1) - outputs.gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def mean_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, y)

    def penalty(self, params: Pytree) -> float:
        return 0.0

    def eval_sums(self, outputs: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.cross_entropy(outputs.double(), y, reduction="sum"),
                "accuracy": (outputs.argmax(1) == y).sum().double()}


class RegressionParams(Params):
    ridge: float = Field(0.0, ge=0, description="lambda of the penalty lambda/2 ||W||^2 on weight tensors (not biases)")


@TASKS.register("regression", params=RegressionParams)
class Regression:
    """Squared error 0.5 (f(x) - y)^2 on float targets (least squares), plus ridge/2 ||W||^2 when asked."""

    metrics: tuple[str, ...] = ()

    def __init__(self, params: RegressionParams) -> None:
        self.ridge = params.ridge

    def per_sample_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (outputs.squeeze(-1) - y) ** 2

    def mean_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_sample_loss(outputs, y).mean()

    def penalty(self, params: Pytree) -> torch.Tensor | float:
        if self.ridge == 0.0:
            return 0.0
        return 0.5 * self.ridge * sum((v * v).sum() for k, v in params.items() if k.endswith("weight"))

    def eval_sums(self, outputs: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": self.per_sample_loss(outputs.double(), y.double()).sum()}


@dataclass(frozen=True)
class Objective:
    """A model scored by a task: the losses every oracle differentiates."""

    model: Model
    task: Task

    def mean_loss(self, params: Pytree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The minibatch's mean loss (every sample counts once) plus the task's penalty."""
        return self._penalized(self.task.mean_loss(self.model.forward(params, x), y), params)

    def per_sample_mean_loss(self, params: Pytree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The minibatch's mean loss by the per-sample form (plus the penalty): the same value as `mean_loss` to
        float rounding, and the faster form under vmap (see `Classification.per_sample_loss`)."""
        return self._penalized(self.task.per_sample_loss(self.model.forward(params, x), y).mean(), params)

    def weighted_loss(self, params: Pytree, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                      denominator: float | None = None) -> torch.Tensor:
        """sum_i w_i loss_i / sum_i w_i (padding rows have weight 0), or over `denominator` when given (a Poisson
        sample's expected size), plus the task's penalty."""
        per_sample = self.task.per_sample_loss(self.model.forward(params, x), y)
        total = (per_sample * w).sum()
        return self._penalized(total / (w.sum().clamp_min(1.0) if denominator is None else denominator), params)

    def sample_loss(self, params: Pytree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One sample's loss (x, y without a batch axis) plus the penalty: what per-sample gradients differentiate."""
        return self._penalized(
            self.task.per_sample_loss(self.model.forward(params, x.unsqueeze(0)), y.unsqueeze(0)).squeeze(0), params)

    def _penalized(self, loss: torch.Tensor, params: Pytree) -> torch.Tensor:
        """The loss plus the task's penalty; no op at all for tasks without one (every step pays for an op)."""
        penalty = self.task.penalty(params)
        return loss if isinstance(penalty, float) and penalty == 0.0 else loss + penalty
