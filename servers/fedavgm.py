"""FedAvgM (Hsu, Qi, Brown 2019, arXiv 1909.06335): server momentum on the mean client change."""

from __future__ import annotations

from pydantic import Field

from fedsim.optim import Transform, chain, scale, trace
from fedsim.servers import SERVERS, ServerParams
from fedsim.servers.fedavg import FedOpt


class FedAvgMParams(ServerParams):
    momentum: float = Field(0.9, ge=0, lt=1)


@SERVERS.register("fedavgm", params=FedAvgMParams)
class FedAvgMServer(FedOpt):
    """Server momentum: v <- beta v + mean(delta); w <- w + lr v."""

    hp: FedAvgMParams

    def optimizer(self) -> Transform:
        return chain(trace(self.hp.momentum), scale(self.hp.lr))
