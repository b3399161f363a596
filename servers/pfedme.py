"""pFedMe's server (Dinh, Tran, Nguyen, NeurIPS 2020, Algorithm 1, line 10): w <- (1 - beta) w + beta mean_S(w_loc),
which with clients sending delta = w_loc - w is w + beta mean_S(delta): FedOpt with server step beta."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedsim.optim import Transform, scale
from fedsim.registry import Params
from fedsim.servers import SERVERS
from fedsim.servers.fedavg import FedOpt


class PFedMeServerParams(Params):
    """beta = 1 is plain averaging, beta > 1 extrapolates (the paper's tuned runs use 2). The paper averages
    uniformly over the sampled clients (1/S); `weighting: samples` weights by n_i as the authors' code does."""

    beta: float = Field(1.0, gt=0, le=2, description="the mixing weight of the clients' mean local model")
    weighting: Literal["samples", "uniform"] = "uniform"


@SERVERS.register("pfedme", params=PFedMeServerParams)
class PFedMeServer(FedOpt):
    """w <- w + beta * mean(delta) = (1 - beta) w + beta * mean(w_loc)."""

    hp: PFedMeServerParams

    def optimizer(self) -> Transform:
        return scale(self.hp.beta)
