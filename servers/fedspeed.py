"""FedSpeed's servers (Sun et al., ICLR 2023): the paper's x^{t+1} = (1/|P|) sum_{i in P} x^_i over the active
clients' hat variables, and FL-Simulator's x^{t+1} = mean_P x_{i,K} + mean over all N clients of h_i
(server/FedSpeed.py global_update), which keeps the summed displacements h_i of clients not sampled in the sum.
They are the defaults of algorithm `fedspeed`'s two forms, `form: paper` and `form: fl_simulator`."""

from __future__ import annotations

from typing import Literal

from fedsim.aggregation import Aggregate
from fedsim.params import Pytree, tree_zeros_like
from fedsim.servers import SERVERS, ServerParams, ServerState
from fedsim.servers.fedavg import FedOpt


class FedSpeedServerParams(ServerParams):
    """The paper and FL-Simulator average uniformly (1/|P|); `weighting: samples` weights by n_k instead."""

    weighting: Literal["samples", "uniform"] = "uniform"


@SERVERS.register("fedspeed", params=FedSpeedServerParams)
class FedSpeedServer(FedOpt):
    """x <- x + lr mean_P(x^_i - x^t): with lr = 1 the mean of the hat variables, Algorithm 1's aggregation."""

    hp: FedSpeedServerParams


class FedSpeedFLSimulatorServerParams(ServerParams):
    """Uniform only: one mean of the model changes serves both the model and the all-client sum of h_i."""

    weighting: Literal["uniform"] = "uniform"


@SERVERS.register("fedspeed_fl_simulator", params=FedSpeedFLSimulatorServerParams)
class FedSpeedFLSimulatorServer(FedOpt):
    """x <- x + lr mean_P(x_K - x^t) + H, H the mean of h_i over all N clients (zeros at first): each active client's
    h_i grew by its x_K - x^t, so H grows by |P|/N times their mean, as SCAFFOLD's control variate does."""

    hp: FedSpeedFLSimulatorServerParams

    def init(self, params: Pytree) -> ServerState:
        return {**super().init(params), "correction": tree_zeros_like(params)}

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        state = super().update(state, aggregate)
        fraction = aggregate.count / aggregate.population
        mean = aggregate.mean["delta"]
        correction = {k: h + fraction * mean[k] for k, h in state["correction"].items()}
        return {**state, "params": {k: w + correction[k] for k, w in state["params"].items()},
                "correction": correction}
