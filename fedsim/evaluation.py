"""Evaluation of the global model with the FedProx paper's conventions (`flearn/trainers/fedbase.py`): test
metrics (accuracy for classification) = sums over the evaluated clients' test samples / their count
(sample-weighted); training loss = sample-weighted mean of their full-data losses (the task's loss, plus its penalty
for the objective a regression with ridge minimises); dissimilarity = (1/N) sum_k ||grad f - grad F_k||^2 with
grad f = sum_k n_k grad F_k / sum_k n_k, from full-batch local gradients (the paper's "variance of local
gradients"); gradient norm = ||grad f|| from the same local gradients (how close the model is to a stationary point
of the training objective, what private SpiderBoost's guarantee is about).

Every metric is computed from sums over clients, so shards of clients (MPI ranks) evaluate their own clients
and a `reduce` adds the sums up; `clients` restricts evaluation to a fixed set (a sample of a huge population).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedsim.clients import Batch
from fedsim.data.base import ClientDataSource, FederatedData
from fedsim.data.least_squares import least_squares_optimum
from fedsim.oracle import AutogradOracle
from fedsim.params import Pytree
from fedsim.tasks import Objective, Regression

CHUNK_ROWS = 8192
Sums = dict[str, torch.Tensor]


def no_reduce(sums: Sums) -> Sums:
    return sums


class Evaluator:
    """Computes the task's test metrics, losses and (optionally) gradient dissimilarity of a global model."""

    def __init__(self, objective: Objective, data: ClientDataSource, dissimilarity: bool,
                 clients: Sequence[int] | None = None, reduce: Callable[[Sums], Sums] = no_reduce,
                 gradient_norm: bool = False) -> None:
        self.objective, self.data, self.dissimilarity, self.reduce = objective, data, dissimilarity, reduce
        self.gradient_norm = gradient_norm
        self.clients = list(range(data.num_clients)) if clients is None else list(clients)
        self.whole = clients is None and isinstance(data, FederatedData)
        self.oracle = AutogradOracle(objective)
        self.metrics = objective.task.metrics
        self.optimum = linear_optimum(objective, data) if self.whole else None

    def __call__(self, params: Pytree) -> dict[str, float]:
        sums = self.reduce(self.local_sums(params))
        penalty = float(self.objective.task.penalty(params))
        metrics = {m: float(sums[f"test_{m}"] / sums["test_count"].clamp_min(1)) for m in self.metrics}
        metrics["loss"] = float(sums["train_loss"] / sums["train_count"].clamp_min(1)) + penalty
        metrics["test_loss"] = float(sums["test_loss"] / sums["test_count"].clamp_min(1)) + penalty
        if self.dissimilarity:
            metrics["dissimilarity"] = dissimilarity_from_sums(sums)
        if self.gradient_norm:
            metrics["grad_norm"] = float(torch.linalg.vector_norm(sums["grad_nsum"] / sums["grad_n"]))
        if self.optimum is not None:
            flat = torch.cat([v.reshape(-1).double() for v in params.values()])
            metrics["distance_to_optimum"] = float(torch.linalg.vector_norm(flat - self.optimum))
        return metrics

    def local_sums(self, params: Pytree) -> Sums:
        """Sums over this evaluator's clients, in float64: losses, test metrics, sample counts."""
        with torch.no_grad():
            if self.whole:
                d = self.data
                train = split_sums(self.objective, params, d.x_train, d.y_train)
                test = split_sums(self.objective, params, d.x_test, d.y_test)
            else:
                train, test = zero_sums(self.metrics), zero_sums(self.metrics)
                for k in self.clients:
                    train = _add(train, split_sums(self.objective, params, *self.data.client_train(k)))
                    test = _add(test, split_sums(self.objective, params, *self.data.client_test(k)))
        sums = {"train_loss": train["loss"], "train_count": train["count"], "test_loss": test["loss"],
                "test_count": test["count"], **{f"test_{m}": test[m] for m in self.metrics}}
        if self.dissimilarity or self.gradient_norm:
            sums.update(self._gradient_sums(params))
        return sums


    def _gradient_sums(self, params: Pytree) -> Sums:
        """sum_k ||g_k||^2, sum_k g_k, sum_k n_k g_k, sum_k n_k and N: enough to finish the dissimilarity after
        adding shards up, since sum_k ||g_k - m||^2 = sum_k ||g_k||^2 - 2 m . sum_k g_k + N ||m||^2."""
        sizes = np.asarray(self.data.train_sizes)
        sq, g_sum, ng_sum = torch.zeros((), dtype=torch.float64), 0.0, 0.0
        for k in self.clients:
            g = self._client_gradient(params, k)
            sq = sq + g @ g
            g_sum = g_sum + g
            ng_sum = ng_sum + float(sizes[k]) * g
        return {"grad_sq": sq, "grad_sum": torch.as_tensor(g_sum), "grad_nsum": torch.as_tensor(ng_sum),
                "grad_n": torch.tensor(float(sizes[self.clients].sum()), dtype=torch.float64),
                "grad_clients": torch.tensor(float(len(self.clients)), dtype=torch.float64)}

    def _client_gradient(self, params: Pytree, client: int) -> torch.Tensor:
        """Full-batch gradient of client `client`'s mean training loss, flattened, in float64."""
        x, y = self.data.client_train(client)
        no_key = torch.zeros(2, dtype=torch.int64)
        grads = self.oracle.grad(params, Batch(x, y, torch.ones(len(y)), no_key, torch.zeros((), dtype=torch.int64)))
        return torch.cat([g.reshape(-1) for g in grads.values()]).double()


def zero_sums(metrics: Sequence[str]) -> Sums:
    return {k: torch.zeros((), dtype=torch.float64) for k in ("loss", "count", *metrics)}


def split_sums(objective: Objective, params: Pytree, x: torch.Tensor, y: torch.Tensor) -> Sums:
    """The task's sums (loss, its metrics) over (x, y) and the row count, in float64, chunked to bound memory."""
    out = zero_sums(objective.task.metrics)
    for start in range(0, len(y), CHUNK_ROWS):
        outputs = objective.model.forward(params, x[start : start + CHUNK_ROWS])
        chunk = objective.task.eval_sums(outputs, y[start : start + CHUNK_ROWS])
        out = _add(out, {**chunk, "count": torch.tensor(float(len(y[start : start + CHUNK_ROWS])),
                                                        dtype=torch.float64)})
    return out


def dissimilarity_from_sums(sums: Sums) -> float:
    mean = sums["grad_nsum"] / sums["grad_n"]
    total = sums["grad_sq"] - 2 * mean @ sums["grad_sum"] + sums["grad_clients"] * (mean @ mean)
    return float(total / sums["grad_clients"])


def linear_optimum(objective: Objective, data: ClientDataSource) -> torch.Tensor | None:
    """The closed-form minimiser of the pooled training objective (float64, flattened like the parameters) for a
    regression task on the `linear` model; None for anything else. With sample weighting, FedAvg's objective
    sum_k (n_k / n) f_k is exactly this pooled least-squares (ridge) problem."""
    layers = list(objective.model.template.children())
    task = objective.task
    if not (isinstance(task, Regression) and isinstance(data, FederatedData) and len(layers) == 2
            and isinstance(layers[1], torch.nn.Linear) and layers[1].out_features == 1):
        return None
    x = data.x_train.reshape(len(data.x_train), -1)
    return least_squares_optimum(x, data.y_train, task.ridge, bias=layers[1].bias is not None)


def _add(a: Sums, b: Sums) -> Sums:
    return {k: a[k] + b[k] for k in a}
