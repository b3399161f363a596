"""Local heavy-ball SGD (DFedAvgM's client: Sun, Li, Wang, "Decentralized Federated Averaging", IEEE TPAMI 2022):
y_{k+1} = y_k - lr g(y_k) + theta (y_k - y_{k-1}) with y_{-1} = y_0, so momentum starts at zero every job. Under the
`dsgd` protocol it is DFedAvgM (K local steps, then gossip); under a server, FedAvg with local momentum."""

from __future__ import annotations

import torch
from pydantic import Field

from fedsim.clients import ALGORITHMS, Batch, JobInfo, LocalTrainingParams, Oracle, StepState
from fedsim.clients.fedavg import LocalSGD
from fedsim.params import Pytree


class SGDMParams(LocalTrainingParams):
    momentum: float = Field(0.9, ge=0, lt=1, description="theta, the heavy-ball weight on the last step "
                                                         "(0: plain SGD, FedAvg bit for bit)")


@ALGORITHMS.register("sgdm", params=SGDMParams, stragglers="drop", server="fedavg")
class HeavyBallSGD(LocalSGD):
    """Local SGD with heavy-ball momentum reset at the start of every job; sends its model change."""

    hp: SGDMParams

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        state = super().init(server_message, client_state, info)
        return {**state, "previous": state["params"]}

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        params, previous, theta = state["params"], state["previous"], self.hp.momentum
        g = oracle.grad(params, batch)
        # SGD's step first, the same op as FedAvg's, so momentum 0 adds nothing and gives its numbers bit for bit.
        descended = {k: torch.add(w, g[k], alpha=-self.hp.lr) for k, w in params.items()}
        if theta != 0.0:
            descended = {k: torch.add(y, params[k] - previous[k], alpha=theta) for k, y in descended.items()}
        return {**state, "params": descended, "previous": params}
