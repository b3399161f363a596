"""FedDyn's server (Acar et al., ICLR 2021, Algorithm 1): h^t = h^{t-1} - alpha (1/m) sum_{k in P_t} (theta_k^t -
theta^{t-1}) and theta^t = (1/|P_t|) sum_{k in P_t} theta_k^t - h^t / alpha, m the population, P_t the round's clients.

alpha cancels: h^t / alpha moves by -(1/m) sum_{P_t} delta_k whatever alpha is. So the state keeps `drift` = -h / alpha,
the mean over all m clients of their summed model changes (what the authors' utils_methods.py adds to the model as
np.mean(local_param_list)), and the server needs no alpha, also under the code's per-client alpha."""

from __future__ import annotations

from typing import Literal

from fedsim.aggregation import Aggregate
from fedsim.params import Pytree, tree_zeros_like
from fedsim.registry import Params
from fedsim.servers import SERVERS, ServerBase, ServerState


class FedDynServerParams(Params):
    """The paper and the authors' code average the clients' models uniformly (1/|P_t|), and the drift is a sum over
    clients, so model changes are weighted uniformly."""

    weighting: Literal["uniform"] = "uniform"


@SERVERS.register("feddyn", params=FedDynServerParams)
class FedDynServer(ServerBase):
    """theta^t = theta^{t-1} + mean_{P_t}(delta) + drift^t, drift^t = drift^{t-1} + (|P_t| / m) mean_{P_t}(delta)."""

    def __init__(self, hp: FedDynServerParams) -> None:
        self.hp = hp

    def init(self, params: Pytree) -> ServerState:
        return {"params": params, "drift": tree_zeros_like(params)}

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        mean = aggregate.mean["delta"]
        fraction = aggregate.count / aggregate.population
        drift = {k: h + fraction * mean[k] for k, h in state["drift"].items()}
        return {**state, "params": {k: w + mean[k] + drift[k] for k, w in state["params"].items()}, "drift": drift}
