"""FedAvg's server rule and the FedOpt family it anchors (Reddi et al., ICLR 2021): the mean client change is the
server's ascent direction, and a server optimizer transform (`fedsim.optim`) turns it into the model's step."""

from __future__ import annotations

from fedsim.aggregation import Aggregate
from fedsim.optim import Transform, scale
from fedsim.params import Pytree
from fedsim.servers import SERVERS, ServerBase, ServerParams, ServerState


class FedOpt(ServerBase):
    """w <- w + step, step = transform(mean(delta)); subclasses choose the transform."""

    def __init__(self, hp: ServerParams) -> None:
        self.hp = hp
        self.transform = self.optimizer()

    def optimizer(self) -> Transform:
        return scale(self.hp.lr)

    def init(self, params: Pytree) -> ServerState:
        return {"params": params, "opt": self.transform.init(params)}

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        step, opt = self.transform.update(aggregate.mean["delta"], state["opt"])
        return {**state, "params": {k: w + step[k] for k, w in state["params"].items()}, "opt": opt}


@SERVERS.register("fedavg", params=ServerParams)
class FedAvgServer(FedOpt):
    """Weighted model averaging: w <- w + lr * mean(delta); lr = 1 is McMahan et al.'s FedAvg."""
