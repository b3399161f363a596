"""FedAdam (Reddi et al., ICLR 2021, "Adaptive Federated Optimization", Algorithm 2 with the Adam update)."""

from __future__ import annotations

from pydantic import Field

from fedsim.optim import Transform, adam
from fedsim.servers import SERVERS, ServerParams
from fedsim.servers.fedavg import FedOpt


class FedAdamParams(ServerParams):
    lr: float = Field(0.01, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    bias_correction: bool = Field(False, description="divide the moments by 1 - beta^t (the Keras Adam of the "
                                                     "authors' code); the paper's Algorithm 2 has none")


@SERVERS.register("fedadam", params=FedAdamParams)
class FedAdamServer(FedOpt):
    """Adam on the pseudo-gradient mean(delta) with adaptivity tau; no bias correction unless asked (the paper)."""

    hp: FedAdamParams

    def optimizer(self) -> Transform:
        hp = self.hp
        return adam(hp.lr, hp.beta1, hp.beta2, hp.tau, hp.bias_correction)
