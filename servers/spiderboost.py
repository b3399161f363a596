"""SpiderBoost's server rule (Wang et al., NeurIPS 2019), as private SpiderBoost runs it (Arora et al., ICML 2023,
Algorithm 2): phases of `phase_length` steps; each opens with a checkpoint estimate of the gradient and adds
estimates of the gradient's change, nabla_t = nabla_{t-1} + Delta_t (line 14); the step is w_{t+1} = w_t - eta
nabla_t (line 16), or of length eta along nabla_t (`step: normalized`, Algorithm 1's step rule, which makes every
step's length, and so every difference's sensitivity, the same).

Algorithm 2 outputs an iterate drawn uniformly from w_1, ..., w_T, so its expected gradient norm is the mean of
`grad_norm` (`evaluation.gradient_norm`) over the iterates; metrics rows score each iterate as it comes, and the run
ends at w_T.

The clients (`clients/spiderboost.py`) send sums over Poisson samples of their records; the server divides the sum
over clients by the expected sample size, rate x n (n the records of every client, known to the server as the
clients' sample counts): the unbiased estimate, as DP-SGD divides by its expected lot size. `private_spiderboost`
adds the noise around this rule (`servers/private_spiderboost.py`).

`theorem_b3_settings` gives the paper's step rules (Theorem B.3) for a problem's constants.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from fedsim.aggregation import Aggregate
from fedsim.params import Pytree, tree_leaves, tree_map, tree_zeros_like
from fedsim.servers import SERVERS, ServerBase, ServerParams, ServerState


class SpiderBoostServerParams(ServerParams):
    """eta (`lr`), the phase length q and the Poisson rates of the checkpoint and difference samples."""

    lr: float = Field(0.1, gt=0, description="eta: the step size (step: gradient) or the step's length (normalized)")
    phase_length: int = Field(10, ge=1, description="q: steps per phase, the first a checkpoint")
    checkpoint_rate: float = Field(1.0, gt=0, le=1, description="b1 / n: the probability each record joins a "
                                                                "checkpoint's sample (1: the full gradient, as "
                                                                "Theorem B.3 sets b1 = n)")
    difference_rate: float = Field(1.0, gt=0, le=1, description="b2 / n: the probability each record joins a "
                                                                "difference's sample")
    step: Literal["gradient", "normalized"] = Field(
        "gradient", description="gradient: w - eta nabla (Alg. 2 line 16); normalized: w - eta nabla / ||nabla|| "
                                "(Alg. 1's step, a fixed step length)")


def _norm(tree: Pytree) -> torch.Tensor:
    return torch.sqrt(sum(torch.sum(torch.square(v.double())) for v in tree_leaves(tree)))


@SERVERS.register("spiderboost", params=SpiderBoostServerParams,
                  broadcasts=("params", "previous", "checkpoint", "rate"), aggregates=("sum",))
class SpiderBoostServer(ServerBase):
    """State: the model w_t, the previous model w_{t-1}, the estimate nabla_{t-1} and the step t; the broadcast
    carries w_t, w_{t-1}, whether step t is a checkpoint and its sampling rate."""

    def __init__(self, hp: SpiderBoostServerParams) -> None:
        self.hp = hp

    def init(self, params: Pytree) -> ServerState:
        device = next(tree_leaves(params)).device
        return {"params": params, "previous": params, "nabla": tree_zeros_like(params),
                "step": torch.zeros((), dtype=torch.int64, device=device)}

    def is_checkpoint(self, state: ServerState) -> bool:
        return int(state["step"]) % self.hp.phase_length == 0

    def rate(self, state: ServerState) -> float:
        """The Poisson rate of step t's sample."""
        return self.hp.checkpoint_rate if self.is_checkpoint(state) else self.hp.difference_rate

    def broadcast(self, state: ServerState) -> Pytree:
        dtype = next(tree_leaves(state["params"])).dtype
        device = state["step"].device
        return {"params": state["params"], "previous": state["previous"],
                "checkpoint": torch.tensor(float(self.is_checkpoint(state)), dtype=dtype, device=device),
                "rate": torch.tensor(self.rate(state), dtype=torch.float64, device=device)}

    def weighting(self, template: Pytree) -> dict[str, str]:
        """The clients' sums are added up as they are (a mean over results times their count)."""
        return {key: "uniform" for key in template}

    def estimate(self, state: ServerState, aggregate: Aggregate, records: float) -> Pytree:
        """nabla_t: the checkpoint (line 9) or nabla_{t-1} + Delta_t (lines 13-14), the clients' summed terms divided by
        rate x `records`."""
        expected = self.rate(state) * records
        term = tree_map(lambda s: s / expected, aggregate.sum("sum")) if aggregate.count else \
            tree_zeros_like(state["nabla"])
        return term if self.is_checkpoint(state) else tree_map(torch.add, state["nabla"], term)

    def advance(self, state: ServerState, nabla: Pytree) -> ServerState:
        """w_{t+1} = w_t - eta nabla_t (or eta along nabla_t's direction), and t + 1."""
        scale = self.hp.lr
        if self.hp.step == "normalized":
            scale = self.hp.lr / _norm(nabla).clamp_min(torch.finfo(torch.float64).tiny)
        params = tree_map(lambda w, g: w - (scale * g).to(w.dtype), state["params"], nabla)
        return {"params": params, "previous": state["params"], "nabla": nabla, "step": state["step"] + 1}

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        records = float(sum(result.num_samples for result in aggregate.results))
        return self.advance(state, self.estimate(state, aggregate, records))


def theorem_b3_settings(lipschitz: float, smoothness: float, initial_gap: float, dimension: int, records: int,
                        epsilon: float, delta: float) -> dict[str, float | int]:
    """Private SpiderBoost's parameters by Arora et al. (ICML 2023), Theorem B.3, for an L0-Lipschitz (`lipschitz`),
    L1-smooth (`smoothness`) loss with F(w_0) - min F <= F0 (`initial_gap`) in d dimensions on n records:
    eta = 1 / (2 L1), b1 = n, with alpha = sqrt(d log(1/delta)) / (n epsilon)
      b2 = max((L0 / (sqrt(F0 L1) alpha))^(2/3), L0^(1/3) n alpha^(2/3) / (L1 F0)^(1/6)),
      T = max(((L1 F0)^(1/4) / (sqrt(L0) alpha))^(4/3), 1 / alpha),
      q = n^2 epsilon^2 / (T d log(1/delta))   (= 1 / (T alpha^2), the proof's setting),
    rounded down to integers (b2 and q at least 1, b2 at most n). Returns lr, checkpoint_rate (b1 / n = 1),
    difference_rate (b2 / n), phase_length and rounds (T)."""
    alpha = math.sqrt(dimension * math.log(1 / delta)) / (records * epsilon)
    l0, l1, f0 = lipschitz, smoothness, initial_gap
    b2 = max((l0 / (math.sqrt(f0 * l1) * alpha)) ** (2 / 3),
             l0 ** (1 / 3) * records * alpha ** (2 / 3) / (l1 * f0) ** (1 / 6))
    rounds = max(((l1 * f0) ** 0.25 / (math.sqrt(l0) * alpha)) ** (4 / 3), 1 / alpha)
    phase = 1 / (math.floor(rounds) * alpha ** 2)
    b2 = min(max(1, math.floor(b2)), records)
    return {"lr": 1 / (2 * l1), "checkpoint_rate": 1.0, "difference_rate": b2 / records,
            "phase_length": max(1, math.floor(phase)), "rounds": max(1, math.floor(rounds))}
