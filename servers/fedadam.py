"""FedAdam (Reddi et al., ICLR 2021, "Adaptive Federated Optimization", Algorithm 2 with the Adam update)."""

from __future__ import annotations

import torch
from pydantic import Field

from fedsim.params import Pytree, tree_zeros_like
from fedsim.servers import SERVERS, ServerParams, ServerState


class FedAdamParams(ServerParams):
    lr: float = Field(0.01, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


@SERVERS.register("fedadam", params=FedAdamParams)
class FedAdamServer:
    """Adam on the pseudo-gradient mean(delta), without bias correction, with adaptivity tau (Reddi et al.)."""

    def __init__(self, hp: FedAdamParams) -> None:
        self.hp = hp

    def init(self, params: Pytree) -> ServerState:
        return {"params": params, "m": tree_zeros_like(params), "v": tree_zeros_like(params)}

    def update(self, state: ServerState, mean_message: Pytree) -> ServerState:
        hp, delta = self.hp, mean_message["delta"]
        # Algorithm 2: m_t = b1 m + (1-b1) D; v_t = b2 v + (1-b2) D^2; x += lr m_t / (sqrt(v_t) + tau).
        m = {k: hp.beta1 * state["m"][k] + (1 - hp.beta1) * d for k, d in delta.items()}
        v = {k: hp.beta2 * state["v"][k] + (1 - hp.beta2) * d * d for k, d in delta.items()}
        params = {k: w + hp.lr * m[k] / (torch.sqrt(v[k]) + hp.tau) for k, w in state["params"].items()}
        return {"params": params, "m": m, "v": v}
