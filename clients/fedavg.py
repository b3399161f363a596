"""FedAvg's client (McMahan et al., 2017): plain minibatch SGD from the server's model; sends its model change."""

from __future__ import annotations

import torch

from fedsim.clients import ALGORITHMS, Batch, JobInfo, LocalTrainingParams, Oracle, StepState
from fedsim.params import Pytree, tree_sub


@ALGORITHMS.register("fedavg", params=LocalTrainingParams, stragglers="drop", server="fedavg")
class LocalSGD:
    """FedAvg: local minibatch SGD; stragglers that cannot finish E epochs are dropped (FedProx paper's baseline)."""

    step_cost = 1

    def __init__(self, hp: LocalTrainingParams) -> None:
        self.hp = hp

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        return None

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        params = server_message["params"]
        return {"params": params, "anchor": params}

    def direction(self, state: StepState, grads: Pytree) -> Pytree:
        """The descent direction of one step; subclasses add their terms to the gradient."""
        return grads

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        params = state["params"]
        d = self.direction(state, oracle.grad(params, batch))
        # w + (-lr) d in one op: the same arithmetic as torch.optim.SGD's `param.add_(grad, alpha=-lr)`.
        return {**state, "params": {k: torch.add(w, d[k], alpha=-self.hp.lr) for k, w in params.items()}}

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        return {"delta": tree_sub(state["params"], state["anchor"])}, None
