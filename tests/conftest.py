"""Shared fixtures: a tiny scenario that trains in well under a second."""

from __future__ import annotations

from typing import Any

import pytest


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

