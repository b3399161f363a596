"""Evaluation of the global model over all clients, with the FedProx paper's conventions (`flearn/trainers/
fedbase.py`): test accuracy = sum of correct / sum of test samples over all clients (sample-weighted); training
loss = sample-weighted mean of the clients' full-data losses; dissimilarity = (1/N) sum_k ||grad f - grad F_k||^2
with grad f = sum_k n_k grad F_k / sum_k n_k, from full-batch local gradients (the paper's "variance of local
gradients").
"""

from __future__ import annotations

import torch
from torch import nn

from fedsim.data.base import FederatedData
from fedsim.models import Model
from fedsim.params import Pytree
from fedsim.runtime.sequential import autograd_grad

CHUNK_ROWS = 8192


class Evaluator:
    """Computes accuracy, losses and (optionally) gradient dissimilarity of a global model."""

    def __init__(self, model: Model, data: FederatedData, dissimilarity: bool) -> None:
        self.model, self.data, self.dissimilarity = model, data, dissimilarity
        self.grad = autograd_grad(model)

    def __call__(self, params: Pytree) -> dict[str, float]:
        d = self.data
        with torch.no_grad():
            train_loss, _ = self._loss_and_correct(params, d.x_train, d.y_train)
            test_loss, correct = self._loss_and_correct(params, d.x_test, d.y_test)
        metrics = {
            "accuracy": correct / max(len(d.y_test), 1),
            "loss": train_loss / max(len(d.y_train), 1),
            "test_loss": test_loss / max(len(d.y_test), 1),
        }
        if self.dissimilarity:
            metrics["dissimilarity"] = self._dissimilarity(params)
        return metrics

    def _loss_and_correct(self, params: Pytree, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """Summed cross-entropy (float64) and number of correct predictions, in chunks to bound memory."""
        total, correct = 0.0, 0
        for start in range(0, len(y), CHUNK_ROWS):
            logits = self.model.forward(params, x[start : start + CHUNK_ROWS])
            target = y[start : start + CHUNK_ROWS]
            total += float(nn.functional.cross_entropy(logits.double(), target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
        return total, correct

    def _dissimilarity(self, params: Pytree) -> float:
        d = self.data
        sizes = torch.as_tensor(d.train_sizes, dtype=torch.float64)
        grads = torch.stack([self._client_gradient(params, k) for k in range(d.num_clients)])
        mean = (sizes[:, None] * grads).sum(0) / sizes.sum()
        return float(((grads - mean) ** 2).sum(1).mean())

    def _client_gradient(self, params: Pytree, client: int) -> torch.Tensor:
        """Full-batch gradient of client `client`'s mean training loss, flattened, in float64."""
        grads = self.grad(params, *self.data.client_train(client))
        return torch.cat([g.reshape(-1) for g in grads.values()]).double()
