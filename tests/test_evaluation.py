"""Evaluation conventions of the FedProx paper: sample-weighted accuracy and loss, gradient dissimilarity."""

from __future__ import annotations

import numpy as np
import torch

from fedsim.data.base import FederatedData
from fedsim.evaluation import Evaluator
from fedsim.models import MODELS, build_model
from fedsim.registry import NoParams
from fedsim.tasks import Classification, Objective


def two_clients() -> FederatedData:
    """Client 0: 1 train / 1 test sample; client 1: 3 train / 3 test samples; 2 features, 2 classes."""
    x_train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    y_train = torch.tensor([0, 1, 1, 0])
    x_test = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [2.0, 0.0]])
    y_test = torch.tensor([1, 1, 1, 0])
    offsets = np.array([0, 1, 4])
    return FederatedData.from_offsets(x_train, y_train, offsets, x_test, y_test, offsets, 2)


def identity_model():
    model = build_model("logreg", MODELS.get("logreg").params(), (2,), 2, 0)
    params = {k: torch.eye(2) if v.dim() == 2 else torch.zeros(2) for k, v in model.init_params.items()}
    return model, params


def test_accuracy_is_sample_weighted_over_all_clients():
    model, params = identity_model()
    metrics = Evaluator(Objective(model, Classification(NoParams())), two_clients(), dissimilarity=False)(params)
    # Predictions = argmax(x): test predictions 0, 1, 1, 0 vs labels 1, 1, 1, 0 -> 3 of 4 correct, although
    # client 0 scores 0% and client 1 scores 100% (a mean of per-client accuracies would say 50%).
    assert metrics["accuracy"] == 0.75


def test_training_loss_is_the_sample_weighted_mean_of_client_losses():
    model, params = identity_model()
    data = two_clients()
    metrics = Evaluator(Objective(model, Classification(NoParams())), data, dissimilarity=False)(params)
    logits = data.x_train @ torch.eye(2)
    expected = torch.nn.functional.cross_entropy(logits.double(), data.y_train).item()
    assert abs(metrics["loss"] - expected) < 1e-12


def test_dissimilarity_matches_its_definition():
    model, params = identity_model()
    data = two_clients()
    value = Evaluator(Objective(model, Classification(NoParams())), data, dissimilarity=True)(params)["dissimilarity"]
    grads = []
    for k in range(2):
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        x, y = data.client_train(k)
        torch.autograd.backward(torch.nn.functional.cross_entropy(model.forward(leaves, x), y))
        grads.append(torch.cat([leaves[n].grad.reshape(-1) for n in params]).double())
    mean = (1 * grads[0] + 3 * grads[1]) / 4
    expected = (((grads[0] - mean) ** 2).sum() + ((grads[1] - mean) ** 2).sum()) / 2
    assert abs(value - expected.item()) < 1e-9 and value > 0
