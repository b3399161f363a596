"""FedSAM's client (Qu et al., ICML 2022, "Generalized Federated Learning via Sharpness Aware Minimization"; Caldarola
et al., ECCV 2022): each local step is a SAM step, w <- w - lr grad(w + rho g / ||g||) with g = grad(w) on the same
minibatch, so clients seek flat minima of their own loss; the server is FedAvg's."""

from __future__ import annotations

import torch
from pydantic import Field

from fedsim.clients import ALGORITHMS, Batch, LocalTrainingParams, Oracle, StepState
from fedsim.clients.fedavg import LocalSGD
from fedsim.params import Pytree, tree_leaves


def ascent_point(params: Pytree, grads: Pytree, rho: float) -> Pytree:
    """SAM's perturbed point w + rho g / ||g||, the norm taken over all leaves together (one global L2 norm, as in
    Foret et al.'s SAM and FL-Simulator's optimizer/ESAM.py); a zero gradient leaves w where it is, and rho = 0
    returns w itself, so the gradient there is the plain one bit for bit."""
    if rho == 0.0:
        return params
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in tree_leaves(grads)]))
    nonzero = norm > 0
    scale = torch.where(nonzero, rho / torch.where(nonzero, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return {k: w + scale * grads[k] for k, w in params.items()}


class FedSAMParams(LocalTrainingParams):
    rho: float = Field(0.05, ge=0, description="SAM's neighbourhood radius (0: plain SGD, FedAvg)")


@ALGORITHMS.register("fedsam", params=FedSAMParams, stragglers="drop", server="fedavg",
                     no_dpsgd="each step takes two gradients (the ascent and the descent)")
class FedSAM(LocalSGD):
    """FedSAM: FedAvg whose local steps are SAM steps (two gradients of one minibatch each); sends its model change."""

    hp: FedSAMParams
    step_cost = 2

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        params = state["params"]
        # The descent uses the gradient at the ascent point, applied at w itself (SAM's "second step").
        grads = oracle.grad(ascent_point(params, oracle.grad(params, batch), self.hp.rho), batch)
        return {**state, "params": {k: torch.add(w, grads[k], alpha=-self.hp.lr) for k, w in params.items()}}
