"""SCAFFOLD's server (Karimireddy et al., ICML 2020, Algorithm 1, lines 16-17): x <- x + lr mean_S(delta y) and
c <- c + |S|/N mean_S(delta c); it broadcasts the control variate c with the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from fedsim.aggregation import Aggregate
from fedsim.params import Pytree, tree_zeros_like
from fedsim.servers import SERVERS, ServerParams, ServerState
from fedsim.servers.fedavg import FedOpt


class ScaffoldServerParams(ServerParams):
    """The paper averages model changes uniformly (1/|S|); `weighting: samples` weights them by n_k instead."""

    weighting: Literal["samples", "uniform"] = "uniform"


@SERVERS.register("scaffold", params=ScaffoldServerParams, broadcasts=("params", "control"),
                  aggregates=("delta", "control"))
class ScaffoldServer(FedOpt):
    """Global step lr (eta_g) on the mean model change; the control variate moves by the mean control change scaled
    by the sampled fraction |S|/N, so c stays the mean of all N clients' c_i (clients not sampled keep theirs)."""

    hp: ScaffoldServerParams
    key_weighting: Mapping[str, str] = {"control": "uniform"}

    def init(self, params: Pytree) -> ServerState:
        return {**super().init(params), "control": tree_zeros_like(params)}

    def broadcast(self, state: ServerState) -> Pytree:
        return {"params": state["params"], "control": state["control"]}

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        state = super().update(state, aggregate)
        fraction = aggregate.count / aggregate.population
        mean = aggregate.mean["control"]
        return {**state, "control": {k: c + fraction * mean[k] for k, c in state["control"].items()}}
