"""FedSpeed's client (Sun et al., ICLR 2023): local steps on the perturbed quasi-gradient plus a prox pull toward the
round's global model x^t, corrected by the client's prox-correction term, in two forms (`form`).

`paper` (Algorithm 1), per step on one minibatch: g1 = grad(x), g2 = grad(x + rho g1 / ||g1||),
g~ = (1 - alpha) g1 + alpha g2 and x <- x - lr (g~ - g^_i + (x - x^t) / lambda); after K steps
g^_i <- g^_i - (x_K - x^t) / lambda, and the client sends x^_i = x_K - lambda g^_i, which the `fedspeed` server
averages. The state kept is h_i = -lambda g^_i (the client's summed displacements x_K - x^t over its rounds): the
same algorithm, with x^_i = x_K + h_i formed without a lambda (1/lambda) round trip, and lambda = inf (no prox pull)
its limit rather than inf * 0.
`fl_simulator` (the authors' FL-Simulator code, client/fedspeed.py and server/FedSpeed.py): the same steps on g2
alone (alpha = 1), and x_K - x^t sent; its server, `fedspeed_fl_simulator`, adds the mean of h_i over all clients.
Each form's server is the algorithm's default; the other server would give wrong numbers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from fedsim.clients import ALGORITHMS, Batch, JobInfo, LocalTrainingParams, Oracle, StepState
from fedsim.clients.fedsam import ascent_point
from fedsim.errors import ScenarioError
from fedsim.params import Pytree, tree_map, tree_sub, tree_zeros_like

PAPER_ALPHA = 0.9
"""The paper form's alpha when none is given: FLGo's port of FedSpeed defaults to it."""

if TYPE_CHECKING:
    from fedsim.scenario import Component, ScenarioSchema


class FedSpeedParams(LocalTrainingParams):
    """Defaults are FL-Simulator's README values (rho 0.1, prox coefficient lamb = 1/lambda = 0.1). A form's rules
    refer to `form`, so it comes before the fields they check."""

    rho: float = Field(0.1, ge=0, description="radius of the extra ascent step (0: no perturbation)")
    lam: float = Field(10.0, gt=0, allow_inf_nan=True,
                       description="lambda: the prox term is (1 / lambda) ||x - x^t||^2 / 2 (FL-Simulator's lamb is "
                                   "1 / lambda); inf: no prox pull")
    form: Literal["paper", "fl_simulator"] = Field(
        "paper", description="paper: Algorithm 1, the hat variable sent, server fedspeed; fl_simulator: the authors' "
                             "code, alpha 1, x_K - x^t sent, server fedspeed_fl_simulator")
    alpha: float | None = Field(None, ge=0, le=1,
                                description=f"weight of the gradient at the ascent point in the quasi-gradient (none: "
                                            f"{PAPER_ALPHA} in the paper form, 1 in the fl_simulator form, the only "
                                            f"value it takes)")
    correction: bool = Field(True, description="keep the prox-correction term g^_i (false, paper form only: g^_i = 0 "
                                               "and x_K is sent: FedProx-style steps on the quasi-gradient)")

    @field_validator("alpha")
    @classmethod
    def _fl_simulator_alpha_is_one(cls, alpha: float | None, info: ValidationInfo) -> float | None:
        if info.data.get("form") == "fl_simulator" and alpha not in (None, 1.0):
            raise ValueError("the fl_simulator form steps on the ascent-point gradient alone: alpha is 1 (or unset); "
                             "other values need form: paper")
        return alpha

    @field_validator("correction")
    @classmethod
    def _fl_simulator_keeps_correction(cls, correction: bool, info: ValidationInfo) -> bool:
        if info.data.get("form") == "fl_simulator" and not correction:
            raise ValueError("the fl_simulator form always keeps h_i, whose all-client mean its server adds; "
                             "correction: false needs form: paper")
        return correction


def default_server(hp: FedSpeedParams) -> str:
    """Each form's server: the paper's averaging of hat variables, or FL-Simulator's with its all-client correction."""
    return "fedspeed_fl_simulator" if hp.form == "fl_simulator" else "fedspeed"


def check_server(hp: FedSpeedParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Each form runs only with its own server: the other's aggregation would give wrong numbers silently."""
    server, fitting = components["server"].name, default_server(hp)
    if server in ("fedspeed", "fedspeed_fl_simulator") and server != fitting:
        raise ScenarioError(f"server.name: FedSpeed's {hp.form} form needs server {fitting!r}, not {server!r}")


@ALGORITHMS.register("fedspeed", params=FedSpeedParams, stragglers="drop", server=default_server, check=check_server,
                     no_dpsgd="each step takes two gradients (the ascent and the descent)")
class FedSpeed:
    """FedSpeed: SAM-mixed quasi-gradient steps with a prox pull and the prox-correction term; the paper form sends
    the hat variable x^_i = x_K + h_i as x^_i - x^t, the fl_simulator form x_K - x^t. Its persistent state is h_i
    (zeros at first; none when `correction` is off)."""

    hp: FedSpeedParams
    step_cost = 2

    def __init__(self, hp: FedSpeedParams) -> None:
        self.hp = hp
        self.fl_simulator = hp.form == "fl_simulator"
        self.alpha = PAPER_ALPHA if hp.alpha is None else hp.alpha
        self.prox = 0.0 if math.isinf(hp.lam) else 1.0 / hp.lam

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        return tree_zeros_like(server_message["params"]) if self.hp.correction else None

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        params = server_message["params"]
        state = {"params": params, "anchor": params}
        if self.hp.correction:
            state["h"] = tree_zeros_like(params) if client_state is None else client_state
        return state

    def quasi_gradient(self, g1: Pytree, g2: Pytree) -> Pytree:
        """(1 - alpha) g1 + alpha g2, written g1 + alpha (g2 - g1) so that it is g1 bit for bit when rho = 0; g2
        itself in the fl_simulator form, as FL-Simulator computes it."""
        if self.fl_simulator:
            return g2
        return {k: torch.add(g, g2[k] - g, alpha=self.alpha) for k, g in g1.items()}

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        params, anchor = state["params"], state["anchor"]
        g1 = oracle.grad(params, batch)
        d = self.quasi_gradient(g1, oracle.grad(ascent_point(params, g1, self.hp.rho), batch))
        if self.prox:
            # -g^_i + (x - x^t) / lambda = (x - x^t + h_i) / lambda (FL-Simulator client/fedspeed.py: the gradient of
            # lamb <x, h_i - x^t> plus weight decay lamb x).
            pull = tree_sub(params, anchor)
            if self.hp.correction:
                pull = tree_map(torch.add, pull, state["h"])
            d = {k: torch.add(g, pull[k], alpha=self.prox) for k, g in d.items()}
        return {**state, "params": {k: torch.add(w, d[k], alpha=-self.hp.lr) for k, w in params.items()}}

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        delta = tree_sub(state["params"], state["anchor"])
        if not self.hp.correction:
            return {"delta": delta}, None
        # g^_i <- g^_i - (x_K - x^t) / lambda is h_i <- h_i + (x_K - x^t); x^_i - x^t = (x_K - x^t) + h_i.
        h = tree_map(torch.add, state["h"], delta)
        return {"delta": delta if self.fl_simulator else tree_map(torch.add, delta, h)}, h
