"""FedSpeed's client (Sun et al., ICLR 2023, Algorithm 1): local steps on the perturbed quasi-gradient plus a prox pull
toward the round's global model x^t, corrected by the client's prox-correction term, and the hat variable sent up.

Per step, on one minibatch: g1 = grad(x), g2 = grad(x + rho g1 / ||g1||), g~ = (1 - alpha) g1 + alpha g2 and
x <- x - lr (g~ - g^_i + (x - x^t) / lambda); after K steps g^_i <- g^_i - (x_K - x^t) / lambda, and the client
sends x^_i = x_K - lambda g^_i, which the server averages. The state kept is h_i = -lambda g^_i (the client's summed
displacements x_K - x^t over its rounds): the same algorithm, with x^_i = x_K + h_i formed without a lambda (1/lambda)
round trip, and lambda = inf (no prox pull) its limit rather than inf * 0.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from fedsim.clients import ALGORITHMS, Batch, JobInfo, LocalTrainingParams, Oracle, StepState
from fedsim.clients.fedsam import ascent_point
from fedsim.params import Pytree, tree_map, tree_sub, tree_zeros_like


class FedSpeedBaseParams(LocalTrainingParams):
    """What both forms share; defaults are FL-Simulator's README values (rho 0.1, prox coefficient lamb = 1/lambda =
    0.1)."""

    rho: float = Field(0.1, ge=0, description="radius of the extra ascent step (0: no perturbation)")
    lam: float = Field(10.0, gt=0, allow_inf_nan=True,
                       description="lambda: the prox term is (1 / lambda) ||x - x^t||^2 / 2 (FL-Simulator's lamb is "
                                   "1 / lambda); inf: no prox pull")


class FedSpeedParams(FedSpeedBaseParams):
    alpha: float = Field(0.9, ge=0, le=1,
                         description="weight of the gradient at the ascent point in the quasi-gradient (0.9 as FLGo's "
                                     "port of FedSpeed defaults to; FL-Simulator's code uses 1)")
    correction: bool = Field(True, description="keep the prox-correction term g^_i (false: g^_i = 0 and x_K is sent: "
                                               "FedProx-style steps on the quasi-gradient)")


@ALGORITHMS.register("fedspeed", params=FedSpeedParams, stragglers="drop", server="fedspeed")
class FedSpeed:
    """FedSpeed as in the paper's Algorithm 1: SAM-mixed quasi-gradient, prox pull with the prox-correction term, and
    the hat variable x^_i = x_K + h_i sent as x^_i - x^t. Its persistent state is h_i (zeros at first; none when
    `correction` is off)."""

    hp: FedSpeedBaseParams
    step_cost = 2

    def __init__(self, hp: FedSpeedBaseParams) -> None:
        self.hp = hp
        self.correction = getattr(hp, "correction", True)
        self.prox = 0.0 if math.isinf(hp.lam) else 1.0 / hp.lam

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        return tree_zeros_like(server_message["params"]) if self.correction else None

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        params = server_message["params"]
        state = {"params": params, "anchor": params}
        if self.correction:
            state["h"] = tree_zeros_like(params) if client_state is None else client_state
        return state

    def quasi_gradient(self, g1: Pytree, g2: Pytree) -> Pytree:
        """(1 - alpha) g1 + alpha g2, written g1 + alpha (g2 - g1) so that it is g1 bit for bit when rho = 0."""
        return {k: torch.add(g, g2[k] - g, alpha=self.hp.alpha) for k, g in g1.items()}

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        params, anchor = state["params"], state["anchor"]
        g1 = oracle.grad(params, batch)
        d = self.quasi_gradient(g1, oracle.grad(ascent_point(params, g1, self.hp.rho), batch))
        if self.prox:
            # -g^_i + (x - x^t) / lambda = (x - x^t + h_i) / lambda (FL-Simulator client/fedspeed.py: the gradient of
            # lamb <x, h_i - x^t> plus weight decay lamb x).
            pull = tree_sub(params, anchor)
            if self.correction:
                pull = tree_map(torch.add, pull, state["h"])
            d = {k: torch.add(g, pull[k], alpha=self.prox) for k, g in d.items()}
        return {**state, "params": {k: torch.add(w, d[k], alpha=-self.hp.lr) for k, w in params.items()}}

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        delta = tree_sub(state["params"], state["anchor"])
        if not self.correction:
            return {"delta": delta}, None
        # g^_i <- g^_i - (x_K - x^t) / lambda is h_i <- h_i + (x_K - x^t); x^_i - x^t = (x_K - x^t) + h_i.
        h = tree_map(torch.add, state["h"], delta)
        return {"delta": tree_map(torch.add, delta, h)}, h


@ALGORITHMS.register("fedspeed_fl_simulator", params=FedSpeedBaseParams, stragglers="drop",
                     server="fedspeed_fl_simulator")
class FedSpeedFLSimulator(FedSpeed):
    """FedSpeed as FL-Simulator runs it (client/fedspeed.py, server/FedSpeed.py): the gradient at the ascent point
    alone (alpha = 1), and x_K - x^t sent; its server adds the mean of h_i over all clients."""

    def quasi_gradient(self, g1: Pytree, g2: Pytree) -> Pytree:
        return g2

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        delta = tree_sub(state["params"], state["anchor"])
        return {"delta": delta}, tree_map(torch.add, state["h"], delta)
