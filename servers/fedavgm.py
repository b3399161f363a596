"""FedAvgM (Hsu, Qi, Brown 2019, arXiv 1909.06335): server momentum on the mean client change."""

from __future__ import annotations

from pydantic import Field

from fedsim.params import Pytree, tree_zeros_like
from fedsim.servers import SERVERS, ServerParams, ServerState


class FedAvgMParams(ServerParams):
    momentum: float = Field(0.9, ge=0, lt=1)


@SERVERS.register("fedavgm", params=FedAvgMParams)
class FedAvgMServer:
    """Server momentum: v <- beta v + mean(delta); w <- w + lr v."""

    def __init__(self, hp: FedAvgMParams) -> None:
        self.hp = hp

    def init(self, params: Pytree) -> ServerState:
        return {"params": params, "velocity": tree_zeros_like(params)}

    def update(self, state: ServerState, mean_message: Pytree) -> ServerState:
        beta, lr, delta = self.hp.momentum, self.hp.lr, mean_message["delta"]
        v = {k: beta * state["velocity"][k] + delta[k] for k in delta}
        return {"params": {k: w + lr * v[k] for k, w in state["params"].items()}, "velocity": v}
