"""pFedMe's client (Dinh, Tran, Nguyen, NeurIPS 2020, "Personalized Federated Learning with Moreau Envelopes",
Algorithm 1): each local round approximately solves the Moreau-envelope sub-problem
theta = argmin f_i(theta; D) + lam/2 ||theta - w_loc||^2 with K gradient steps, then moves the local copy of the
global model along the envelope's gradient, w_loc <- w_loc - lr lam (w_loc - theta). theta is the personal model."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedsim.clients import ALGORITHMS, Batch, JobInfo, LocalTrainingParams, Oracle, StepState
from fedsim.params import Pytree, tree_sub


class PFedMeParams(LocalTrainingParams):
    """`lr` is the paper's eta (the local copy's step), `personal_lr` the inner step on theta."""

    lam: float = Field(15.0, gt=0, description="lambda: the Moreau envelope's regularization strength")
    K: int = Field(5, ge=1, description="gradient steps on theta per local round (the inner loop)")
    personal_lr: float = Field(0.09, gt=0, description="the inner loop's step size on theta; it converges for "
                                                       "personal_lr * (lam + L) < 2 on an L-smooth loss")
    personal_l2: float = Field(0.0, ge=0, description="extra L2 term personal_l2 * theta in the inner gradient: the "
                                                      "authors' pFedMeOptimizer adds 0.001 * theta; not in the paper")
    personal_model: Literal["theta", "local_copy"] = Field(
        "theta", description="the model a client evaluates as its own: theta (the paper's personal model) or "
                             "local_copy, w_loc after local training (what the authors' code evaluates, issue #5)")


@ALGORITHMS.register("pfedme", params=PFedMeParams, stragglers="drop", server="pfedme",
                     no_dpsgd="each step takes K + 1 gradients")
class PFedMe:
    """pFedMe's client: one fedsim local step is one local round (a minibatch, K inner steps on theta, the w_loc
    update), so a step costs K + 1. theta and w_loc start at the received w every job, theta warm-started across
    local rounds (the authors' `userpFedMe.py`); it sends w_loc - w and keeps its personal model as its state."""

    def __init__(self, hp: PFedMeParams) -> None:
        self.hp = hp
        self.step_cost = hp.K + 1

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        return server_message["params"]

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        params = server_message["params"]
        return {"theta": params, "local": params, "anchor": params}

    def prox(self, theta: Pytree, local: Pytree, batch: Batch, oracle: Oracle) -> Pytree:
        """K gradient steps from theta on f(theta; batch) + lam/2 ||theta - local||^2 (+ personal_l2/2 ||theta||^2):
        the authors' pFedMeOptimizer.step, theta <- theta - plr (g + lam (theta - w_loc) + mu theta), K times."""
        hp = self.hp
        for _ in range(hp.K):
            grads = oracle.grad(theta, batch)
            direction = {k: torch.add(g, theta[k] - local[k], alpha=hp.lam) for k, g in grads.items()}
            if hp.personal_l2:
                direction = {k: torch.add(d, theta[k], alpha=hp.personal_l2) for k, d in direction.items()}
            theta = {k: torch.add(t, direction[k], alpha=-hp.personal_lr) for k, t in theta.items()}
        return theta

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        local = state["local"]
        theta = self.prox(state["theta"], local, batch, oracle)
        # Algorithm 1: w_{i,r+1} = w_{i,r} - eta lam (w_{i,r} - theta), a step along grad F_i(w) = lam (w - theta).
        step = self.hp.lr * self.hp.lam
        local = {k: torch.add(w, w - theta[k], alpha=-step) for k, w in local.items()}
        return {**state, "theta": theta, "local": local}

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        personal = state["theta"] if self.hp.personal_model == "theta" else state["local"]
        return {"delta": tree_sub(state["local"], state["anchor"])}, personal

    def personalize(self, server_message: Pytree, client_state: Pytree | None, data: Batch, oracle: Oracle) -> Pytree:
        """The client's model as of its last job (theta_i, or w_loc under `personal_model: local_copy`). A client
        that never trained has w as its local copy and the prox of w on its training split as theta."""
        if client_state is not None:
            return client_state
        w = server_message["params"]
        return w if self.hp.personal_model == "local_copy" else self.prox(w, w, data, oracle)
