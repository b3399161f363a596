"""What a runtime needs to run client rules: the rule, the model, the clients' data, the seed and client state."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from fedsim.clients import ClientRule
from fedsim.data.base import FederatedData
from fedsim.models import Model
from fedsim.params import Pytree


class ClientStateStore:
    """Persistent per-client state, kept only for clients that have any (stateless rules store nothing)."""

    def __init__(self) -> None:
        self._states: dict[int, Pytree] = {}

    def get(self, client: int) -> Pytree | None:
        return self._states.get(client)

    def put(self, client: int, state: Pytree | None) -> None:
        if state is None:
            self._states.pop(client, None)
        else:
            self._states[client] = state

    def __len__(self) -> int:
        return len(self._states)


@dataclass
class RuntimeContext:
    rule: ClientRule
    model: Model
    data: FederatedData
    seed: int
    states: ClientStateStore = field(default_factory=ClientStateStore)


def local_batches(num_samples: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of `steps` minibatches: consecutive slices of a fresh permutation each epoch (last may be
    short), as FedProx's `batch_data` does, drawn from the client's own generator."""
    taken = 0
    while taken < steps:
        perm = torch.randperm(num_samples, generator=generator)
        for start in range(0, num_samples, batch_size):
            if taken == steps:
                return
            yield perm[start : start + batch_size]
            taken += 1
