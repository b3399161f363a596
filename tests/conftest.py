"""Shared fixtures: a tiny scenario that trains in well under a second."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedsim.clients import ALGORITHMS, LocalTrainingParams
from fedsim.clients.fedavg import LocalSGD
from fedsim.registry import Entry


@pytest.fixture
def tiny() -> dict[str, Any]:
    """10 digits clients, 4 sampled per round, 3 rounds of FedProx on logistic regression."""
    return {
        "name": "tiny",
        "seed": 0,
        "rounds": 3,
        "num_clients": 10,
        "clients_per_round": 4,
        "data": {"name": "digits"},
        "partition": {"name": "iid"},
        "model": {"name": "logreg"},
        "algorithm": {"name": "fedprox", "lr": 0.05, "batch_size": 20, "local_epochs": 1, "mu": 0.1},
    }



class CarrySGD(LocalSGD):
    """Test rule with persistent client state: the sum of the client's past model changes."""

    def initial_state(self, server_message):
        return {k: torch.zeros_like(v) for k, v in server_message["params"].items()}

    def init(self, server_message, client_state, info):
        return {**super().init(server_message, client_state, info), "carried": client_state}

    def final(self, state):
        message, _ = super().final(state)
        return message, {k: state["carried"][k] + message["delta"][k] for k in state["carried"]}


@pytest.fixture
def carry_rule(monkeypatch) -> str:
    """Registers CarrySGD as algorithm 'carry' for the test."""
    monkeypatch.setitem(ALGORITHMS._entries, "carry",
                        Entry("carry", CarrySGD, LocalTrainingParams, {"stragglers": "keep", "server": "fedavg"}))
    return "carry"

