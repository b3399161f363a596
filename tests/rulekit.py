"""Helpers for calling rules directly in tests: aggregates, batches and oracle stand-ins."""

from __future__ import annotations

import torch

from fedsim import api
from fedsim.aggregation import Aggregate
from fedsim.clients import Batch
from fedsim.simulation import build_simulation


def aggregate_of(mean, count: int = 1, population: int = 10, round_index: int = 0) -> Aggregate:
    """An aggregate of `count` results with the given per-key mean (sample weighting, one sample each)."""
    weighting = {key: "samples" for key in mean}
    return Aggregate(mean, weighting, {key: float(count) for key in mean}, count, population, round_index, [], None,
                     torch.zeros(2, dtype=torch.int64))


def batch_of(x, y) -> Batch:
    """A Batch of weight-1 samples with a fixed key, for calling a rule's step directly."""
    return Batch(x, y, torch.ones(len(y)), torch.zeros(2, dtype=torch.int64), torch.zeros((), dtype=torch.int64))


class FixedGradient:
    """An oracle stand-in whose gradient is a fixed pytree (to check a rule's update arithmetic)."""

    def __init__(self, grads):
        self.grads = grads

    def grad(self, params, batch):
        return self.grads


def spy_on_run(monkeypatch, server_class) -> tuple[list, list]:
    """Lists that fill, as a run goes, with the simulations it builds and every state `server_class.update` returns
    (to check a server's state against the clients' states end to end)."""
    sims, servers = [], []
    original_update = server_class.update

    def keep_sim(scenario, data=None):
        sims.append(build_simulation(scenario, data))
        return sims[-1]

    def keep_state(self, state, aggregate):
        servers.append(original_update(self, state, aggregate))
        return servers[-1]

    monkeypatch.setattr(api, "build_simulation", keep_sim)
    monkeypatch.setattr(server_class, "update", keep_state)
    return sims, servers
