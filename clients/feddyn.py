"""FedDyn's client (Acar et al., ICLR 2021, "Federated Learning Based on Dynamic Regularization", Algorithm 1):
local SGD on L_k(theta) - <grad_k, theta> + alpha/2 ||theta - theta^{t-1}||^2, then the dual state moves by
grad_k <- grad_k - alpha (theta_k^t - theta^{t-1}); at a consensus the local stationary points are the global one."""

from __future__ import annotations

import torch
from pydantic import Field

from fedsim.clients import ALGORITHMS, Batch, JobInfo, LocalTrainingParams, Oracle, StepState
from fedsim.params import Pytree, tree_sub, tree_zeros_like


class FedDynParams(LocalTrainingParams):
    """alpha is the paper's regularization strength (their grid 0.1, 0.01, 0.001; their code's examples 0.01)."""

    alpha: float = Field(0.01, gt=0, description="alpha: the weight of the dynamic regularizer "
                                                  "alpha/2 ||theta - theta^{t-1}||^2")
    alpha_samples: float | None = Field(
        None, gt=0, description="the authors' adaptive alpha (utils_methods.py train_FedDyn): client k uses "
                                "alpha * alpha_samples / n_k; their code's alpha_samples is the mean training-set size "
                                "over all clients. None: every client uses alpha (the paper)")


@ALGORITHMS.register("feddyn", params=FedDynParams, stragglers="drop", server="feddyn")
class FedDyn:
    """FedDyn's client: minibatch SGD on the dynamically regularized local objective from the server's model; it sends
    its model change and keeps grad_k (the gradient of its linear term, zeros at first) as its persistent state."""

    step_cost = 1

    def __init__(self, hp: FedDynParams) -> None:
        self.hp = hp

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        return tree_zeros_like(server_message["params"])

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        params = server_message["params"]
        dual = tree_zeros_like(params) if client_state is None else client_state
        samples = info["num_samples"].to(next(iter(params.values())).dtype)
        scale = self.hp.alpha_samples / samples if self.hp.alpha_samples is not None else torch.ones_like(samples)
        return {"params": params, "anchor": params, "dual": dual, "alpha": self.hp.alpha * scale}

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        params, anchor, dual, alpha = state["params"], state["anchor"], state["dual"], state["alpha"]
        grads = oracle.grad(params, batch)
        # The gradient of the local objective: g - grad_k + alpha (theta - theta^{t-1}) (Algorithm 1, client line).
        new = {k: torch.add(w, grads[k] - dual[k] + alpha * (w - anchor[k]), alpha=-self.hp.lr)
               for k, w in params.items()}
        return {**state, "params": new}

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        delta = tree_sub(state["params"], state["anchor"])
        # First-order condition of the local problem: grad L_k(theta_k^t) = grad_k - alpha (theta_k^t - theta^{t-1}).
        dual = {k: g - state["alpha"] * delta[k] for k, g in state["dual"].items()}
        return {"delta": delta}, dual
