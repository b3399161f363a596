"""Node-side rules: what a client computes from its own data, as pure functions of tensors.

A rule is split the way FedJAX splits it (`fedjax/core/for_each_client.py`): `init` builds the step state from the
server's parameters and the client's persistent state, `step` consumes one minibatch, `final` returns the message
for the server and the client's new persistent state. The runtime owns the loops, so it can run clients one after
another, batch them on a vmap axis, mask clients that take fewer steps, and count their work for the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from pydantic import Field

from fedsim.params import Pytree
from fedsim.registry import Params, Registry, import_submodules

Batch = tuple[torch.Tensor, torch.Tensor]
GradFn = Callable[[Pytree, torch.Tensor, torch.Tensor], Pytree]
"""`grad(params, x, y)`: gradient of the model's mean minibatch loss; supplied by the runtime."""
StepState = dict[str, Any]


class LocalTrainingParams(Params):
    """Hyperparameters every local-training rule shares; the runtime reads them to build the batch schedule."""

    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=1)


class ClientRule(Protocol):
    """The three pure functions an algorithm's client side consists of, with its hyperparameters bound."""

    hp: LocalTrainingParams

    def initial_state(self, global_params: Pytree) -> Pytree | None:
        """A client's persistent state before its first round (control variates, personal model ...); None for
        stateless rules. Runtimes pass it to `init` for clients they have no state for."""
        ...

    def init(self, global_params: Pytree, client_state: Pytree | None) -> StepState: ...

    def step(self, state: StepState, batch: Batch, grad: GradFn) -> StepState: ...

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]: ...


ALGORITHMS: Registry = Registry("algorithm")
"""Entries: a ClientRule class constructed with its validated hyperparameters.

Metadata: `stragglers` ("drop": stragglers' work is discarded, as FedAvg in the FedProx paper; "keep": partial
work is aggregated), `server` (the default server rule's name) and `vectorizable` (default True; a rule whose
step cannot run under `torch.func.vmap` sets it False and runs sequentially, with a notice).
"""

import_submodules(__name__, __path__)
