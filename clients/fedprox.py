"""FedProx's client (Li et al., MLSys 2020): SGD on F_k(w) + mu/2 ||w - w_t||^2, keeping stragglers' partial work."""

from __future__ import annotations

import torch
from pydantic import Field

from fedsim.clients import ALGORITHMS, LocalTrainingParams, StepState
from fedsim.clients.fedavg import LocalSGD
from fedsim.params import Pytree


class FedProxParams(LocalTrainingParams):
    mu: float = Field(0.0, ge=0)


@ALGORITHMS.register("fedprox", params=FedProxParams, stragglers="keep", server="fedavg")
class FedProx(LocalSGD):
    """FedProx: proximal local SGD; stragglers send whatever epochs they finished."""

    hp: FedProxParams

    def direction(self, state: StepState, grads: Pytree) -> Pytree:
        # litian96/FedProx flearn/optimizer/pgd.py: var -= lr * (grad + mu * (var - vstar)), vstar = w_t.
        mu, params, anchor = self.hp.mu, state["params"], state["anchor"]
        if mu == 0.0:
            return grads
        return {k: torch.add(g, params[k] - anchor[k], alpha=mu) for k, g in grads.items()}
