"""Evaluation of the global model with the FedProx paper's conventions (`flearn/trainers/fedbase.py`): test
accuracy = sum of correct / sum of test samples over the evaluated clients (sample-weighted); training loss =
sample-weighted mean of their full-data losses; dissimilarity = (1/N) sum_k ||grad f - grad F_k||^2 with
grad f = sum_k n_k grad F_k / sum_k n_k, from full-batch local gradients (the paper's "variance of local
gradients").

Every metric is computed from sums over clients, so shards of clients (MPI ranks) evaluate their own clients
and a `reduce` adds the sums up; `clients` restricts evaluation to a fixed set (a sample of a huge population).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fedsim.data.base import ClientDataSource, FederatedData
from fedsim.models import Model
from fedsim.params import Pytree
from fedsim.runtime.sequential import autograd_grad

CHUNK_ROWS = 8192
Sums = dict[str, torch.Tensor]


def no_reduce(sums: Sums) -> Sums:
    return sums


class Evaluator:
    """Computes accuracy, losses and (optionally) gradient dissimilarity of a global model."""

    def __init__(self, model: Model, data: ClientDataSource, dissimilarity: bool,
                 clients: Sequence[int] | None = None, reduce: Callable[[Sums], Sums] = no_reduce) -> None:
        self.model, self.data, self.dissimilarity, self.reduce = model, data, dissimilarity, reduce
        self.clients = list(range(data.num_clients)) if clients is None else list(clients)
        self.whole = clients is None and isinstance(data, FederatedData)
        self.grad = autograd_grad(model)

    def __call__(self, params: Pytree) -> dict[str, float]:
        sums = self.reduce(self.local_sums(params))
        metrics = {
            "accuracy": float(sums["correct"] / sums["test_count"].clamp_min(1)),
            "loss": float(sums["train_loss"] / sums["train_count"].clamp_min(1)),
            "test_loss": float(sums["test_loss"] / sums["test_count"].clamp_min(1)),
        }
        if self.dissimilarity:
            metrics["dissimilarity"] = dissimilarity_from_sums(sums)
        return metrics

    def local_sums(self, params: Pytree) -> Sums:
        """Sums over this evaluator's clients, in float64: losses, correct predictions, sample counts."""
        with torch.no_grad():
            if self.whole:
                d = self.data
                train = self._loss_and_correct(params, d.x_train, d.y_train)
                test = self._loss_and_correct(params, d.x_test, d.y_test)
            else:
                train, test = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
                for k in self.clients:
                    train += self._loss_and_correct(params, *self.data.client_train(k))
                    test += self._loss_and_correct(params, *self.data.client_test(k))
        sums = {"train_loss": train[0], "train_count": train[2], "test_loss": test[0], "correct": test[1],
                "test_count": test[2]}
        if self.dissimilarity:
            sums.update(self._gradient_sums(params))
        return sums

    def _loss_and_correct(self, params: Pytree, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[summed cross-entropy, correct predictions, samples], chunked to bound memory."""
        out = torch.zeros(3, dtype=torch.float64)
        for start in range(0, len(y), CHUNK_ROWS):
            logits = self.model.forward(params, x[start : start + CHUNK_ROWS])
            target = y[start : start + CHUNK_ROWS]
            out[0] += nn.functional.cross_entropy(logits.double(), target, reduction="sum")
            out[1] += (logits.argmax(1) == target).sum()
            out[2] += len(target)
        return out

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
        grads = self.grad(params, *self.data.client_train(client))
        return torch.cat([g.reshape(-1) for g in grads.values()]).double()


def dissimilarity_from_sums(sums: Sums) -> float:
    mean = sums["grad_nsum"] / sums["grad_n"]
    total = sums["grad_sq"] - 2 * mean @ sums["grad_sum"] + sums["grad_clients"] * (mean @ mean)
    return float(total / sums["grad_clients"])
