"""Ditto's client (Li, Hu, Beirami, Smith, ICML 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization", Algorithm 1): besides FedAvg's local SGD on the global model, each sampled client takes SGD steps
on its personal objective h_k(v; w^t) = F_k(v) + lam/2 ||v - w^t||^2, w^t the received global model. The personal
model v_k persists between the client's jobs and is its own model; the server only ever sees FedAvg's update."""

from __future__ import annotations

import torch
from pydantic import Field

from fedsim.clients import ALGORITHMS, Batch, JobInfo, LocalTrainingParams, Oracle, StepState
from fedsim.clients.fedavg import LocalSGD
from fedsim.params import Pytree


class DittoParams(LocalTrainingParams):
    """`lr` is the global model's local step; the personal model's step is `personal_lr` (default: the same `lr`, as
    the authors' code uses one learning rate for both)."""

    lam: float = Field(1.0, ge=0, description="lambda: how strongly the personal model is pulled to the global one "
                                              "(0: purely local training; large: the global model)")
    personal_lr: float | None = Field(None, gt=0, description="step size of the personal model's SGD; default: lr")
    personal_steps: int = Field(1, ge=1, le=1000, description="personal SGD steps per minibatch, on the same "
                                                              "minibatch as the global model's step (the code: 1)")


@ALGORITHMS.register("ditto", params=DittoParams, stragglers="drop", server="fedavg",
                     no_dpsgd="each step takes 1 + personal_steps gradients")
class Ditto(LocalSGD):
    """Ditto's client: each step is FedAvg's SGD step on the global model and `personal_steps` SGD steps
    v <- v - personal_lr (grad F_k(v) + lam (v - w^t)) on the same minibatch, as the authors' code interleaves them
    (`flearn/trainers_MTL/ditto.py`), so a step costs 1 + personal_steps minibatch gradients. It sends the global
    model's change and keeps v_k, which starts as the global model the client first receives."""

    hp: DittoParams

    def __init__(self, hp: DittoParams) -> None:
        super().__init__(hp)
        self.step_cost = 1 + hp.personal_steps
        self.personal_lr = hp.lr if hp.personal_lr is None else hp.personal_lr

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        return server_message["params"]

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        personal = server_message["params"] if client_state is None else client_state
        return {**super().init(server_message, client_state, info), "personal": personal}

    def personal_step(self, personal: Pytree, anchor: Pytree, batch: Batch, oracle: Oracle) -> Pytree:
        """One SGD step on h_k(v; w^t) (Algorithm 1's inner loop; the code's `eff_grad`). With lam = 0 it is
        LocalSGD's step, operation for operation."""
        grads = oracle.grad(personal, batch)
        lam = self.hp.lam
        if lam != 0.0:
            grads = {k: torch.add(g, personal[k] - anchor[k], alpha=lam) for k, g in grads.items()}
        return {k: torch.add(v, grads[k], alpha=-self.personal_lr) for k, v in personal.items()}

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        personal = state["personal"]
        for _ in range(self.hp.personal_steps):
            personal = self.personal_step(personal, state["anchor"], batch, oracle)
        return {**super().step(state, batch, oracle), "personal": personal}

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        message, _ = super().final(state)
        return message, state["personal"]

    def personalize(self, server_message: Pytree, client_state: Pytree | None, data: Batch, oracle: Oracle) -> Pytree:
        """The client's personal model v_k as of its last job (the received global model for one that never
        trained)."""
        return server_message["params"] if client_state is None else client_state
