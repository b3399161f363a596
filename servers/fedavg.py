"""FedAvg's server rule: add the (weighted) mean client change to the global model, scaled by a server lr."""

from __future__ import annotations

from fedsim.params import Pytree
from fedsim.servers import SERVERS, ServerParams, ServerState


@SERVERS.register("fedavg", params=ServerParams)
class FedAvgServer:
    """Weighted model averaging: w <- w + lr * mean(delta); lr = 1 is McMahan et al.'s FedAvg."""

    def __init__(self, hp: ServerParams) -> None:
        self.hp = hp

    def init(self, params: Pytree) -> ServerState:
        return {"params": params}

    def update(self, state: ServerState, mean_message: Pytree) -> ServerState:
        lr, delta = self.hp.lr, mean_message["delta"]
        return {**state, "params": {k: w + lr * delta[k] for k, w in state["params"].items()}}
