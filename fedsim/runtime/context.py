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

    def client_state(self, client: int, global_params: Pytree) -> Pytree | None:
        """The client's stored state, or the rule's initial state for a client seen for the first time."""
        state = self.states.get(client)
        return self.rule.initial_state(global_params) if state is None else state


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


def padded_schedule(num_samples: int, batch_size: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """The same minibatches as `local_batches`, as one (steps, batch_size) index tensor padded with -1, for
    runtimes that run many clients' steps at once; draws the same permutations from the generator."""
    per_epoch = -(-num_samples // batch_size)
    epochs = -(-steps // per_epoch)
    rows = []
    for _ in range(epochs):
        perm = torch.randperm(num_samples, generator=generator)
        padded = torch.full((per_epoch * batch_size,), -1, dtype=torch.long)
        padded[:num_samples] = perm
        rows.append(padded.view(per_epoch, batch_size))
    return torch.cat(rows)[:steps]
