"""User-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, "Learning Differentially Private Recurrent
Language Models", Algorithm 1) as a privacy mechanism around any client rule and any server rule.

Each round the protocol samples every client independently with probability q (`protocol: {name: synchronous,
client_sampling: poisson}`, q = clients_per_round / num_clients). A sampled client's whole message (its model delta,
and what else it sends: SCAFFOLD's control delta) is clipped to norm S (flat, or S / sqrt(L) per tensor:
PerLayerClip with equal S_j), optionally after every local step as the paper's UserUpdate does, and weighted by
w_k = min(n_k / w_cap, 1). The server estimates the weighted mean with the fixed-denominator estimator
f_f = sum_k w_k D_k / (q W) or the bounded one f_c = sum_k w_k D_k / max(q W_min, sum_k w_k) (W = sum over all
clients of w_k), adds N(0, sigma^2 I) with sigma = z S / (q W) (f_f) or 2 z S / (q W_min) (f_c), and hands that to
the wrapped server rule as its mean (FedAvg at lr 1 is the paper's theta + Delta; FedAdam makes it DP-FedAdam).
Each round is one Poisson-subsampled Gaussian release with (z, q) for every user, which is what the run accounts.
A round that samples no client still adds its noise and counts: skipping it would tell that no one was sampled.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fedsim.aggregation import Aggregate
from fedsim.clients import Batch, ClientRule, JobInfo, Oracle, RuleWrapper, StepState
from fedsim.clients.dpsgd import clip_factors
from fedsim.errors import ScenarioError
from fedsim.keyed_random import tree_normal
from fedsim.params import Pytree, tree_map, tree_sub
from fedsim.privacy import PRIVACY, AccountingParams, Population
from fedsim.servers import ServerRule, ServerState

NOISE_SALT = 0x44504641
"""The server key's stream DP-FedAvg's noise is drawn from ("DPFA"), apart from any draw of the wrapped rule."""


class DPFedAvgParams(AccountingParams):
    """DP-FedAvg's clipping, estimator and noise, and how its run is accounted (`AccountingParams`)."""

    clip: float = Field(1.0, gt=0, description="S: the bound on the norm of a client's whole message")
    noise_multiplier: float = Field(1.0, ge=0, description="z: the noise's std is z times the estimator's "
                                                           "sensitivity")
    clipping: Literal["flat", "per_layer"] = Field(
        "flat", description="flat: clip the whole message to S; per_layer: each of its L tensors to S / sqrt(L)")
    clip_every_step: bool = Field(False, description="also project the local model onto the ball of radius S "
                                                     "around the round's model after every local step (the paper's "
                                                     "UserUpdate); needs a rule whose step state holds params")
    estimator: Literal["fixed", "bounded"] = Field(
        "fixed", description="fixed: f_f = sum w_k D_k / (q W); bounded: f_c = sum w_k D_k / max(q W_min, sum w_k)")
    weight_cap: float | None = Field(None, gt=0, description="w_cap: client k weighs min(n_k / w_cap, 1); none: "
                                                             "every client weighs 1")
    min_weight: float | None = Field(None, gt=0, description="W_min of the bounded estimator (default W)")

    @model_validator(mode="after")
    def _min_weight_only_when_bounded(self) -> DPFedAvgParams:
        if self.min_weight is not None and self.estimator != "bounded":
            raise ValueError("min_weight is the bounded estimator's; set estimator: bounded")
        return self


def client_weights(train_sizes: np.ndarray, weight_cap: float | None) -> np.ndarray:
    """w_k = min(n_k / w_cap, 1), or 1 for every client without a cap."""
    sizes = np.asarray(train_sizes, dtype=np.float64)
    return np.ones_like(sizes) if weight_cap is None else np.minimum(sizes / weight_cap, 1.0)


def clipped(tree: Pytree, clip: float, clipping: str) -> Pytree:
    """`tree` scaled to norm at most `clip` (flat), or each tensor to clip / sqrt(L) (per layer): DP-SGD's clipping
    of one sample, the whole message being the sample."""
    factors = clip_factors(tree_map(lambda v: v.unsqueeze(0), tree), clip, clipping)
    return tree_map(lambda v, c: v * c.squeeze(0).to(v.dtype), tree, factors)


class ClippedClient(RuleWrapper):
    """The client side: the wrapped rule's message clipped to S and weighted by w_k (and with `clip_every_step` its
    local model kept within S of the round's model); everything else is the wrapped rule's."""

    def __init__(self, params: DPFedAvgParams, rule: ClientRule) -> None:
        super().__init__(rule)
        self.params = params

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        samples = info["num_samples"].to(torch.float64)
        cap = self.params.weight_cap
        weight = torch.ones_like(samples) if cap is None else torch.clamp(samples / cap, max=1.0)
        return {"inner": self.rule.init(server_message, client_state, info), "weight": weight,
                "start": server_message["params"]}

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        inner = self.rule.step(state["inner"], batch, oracle)
        if self.params.clip_every_step:
            if not isinstance(inner, dict) or "params" not in inner:
                raise ScenarioError("privacy.clip_every_step: the algorithm's step state holds no params to project; "
                                    "set clip_every_step: false")
            moved = clipped(tree_sub(inner["params"], state["start"]), self.params.clip, self.params.clipping)
            inner = {**inner, "params": tree_map(torch.add, state["start"], moved)}
        return {**state, "inner": inner}

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        message, client_state = self.rule.final(state["inner"])
        weight = state["weight"]
        return tree_map(lambda v: v * weight.to(v.dtype),
                        clipped(message, self.params.clip, self.params.clipping)), client_state


class NoisyServer:
    """The server side: the clients' clipped, weighted messages summed, divided by the estimator's denominator,
    Gaussian noise added, and the result handed to the wrapped server rule as its mean."""

    steps_without_results = True
    """A round that sampled no client still releases its noise and counts as a step."""

    def __init__(self, params: DPFedAvgParams, server: ServerRule, population: Population) -> None:
        self.params, self.server = params, server
        self.rate = population.client_rate
        self.total = float(client_weights(population.train_sizes, params.weight_cap).sum())
        self.min_total = self.total if params.min_weight is None else params.min_weight

    @property
    def hp(self) -> Any:
        return self.server.hp

    def init(self, params: Pytree) -> ServerState:
        return self.server.init(params)

    def broadcast(self, state: ServerState) -> Pytree:
        return self.server.broadcast(state)

    def weighting(self, template: Pytree) -> dict[str, str]:
        """Every key weighs its clients alike: the clients have weighted their messages by w_k themselves."""
        return {key: "uniform" for key in template}

    @property
    def sensitivity(self) -> float:
        """S / (q W) for f_f, 2 S / (q W_min) for f_c (the paper's bounds on one user's effect on the estimate)."""
        if self.params.estimator == "fixed":
            return self.params.clip / (self.rate * self.total)
        return 2 * self.params.clip / (self.rate * self.min_total)

    def denominator(self, aggregate: Aggregate) -> float:
        if self.params.estimator == "fixed":
            return self.rate * self.total
        weights = client_weights(np.array([r.num_samples for r in aggregate.results]), self.params.weight_cap)
        return max(self.rate * self.min_total, float(weights.sum()))

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        count, sigma = aggregate.count, self.params.noise_multiplier * self.sensitivity
        sums = {key: aggregate.sum(key) if count else tree_map(torch.zeros_like, mean)
                for key, mean in aggregate.mean.items()}
        noise = tree_normal(aggregate.key, NOISE_SALT, sums)
        denominator = self.denominator(aggregate)
        estimate = tree_map(lambda s, z: s / denominator + sigma * z, sums, noise)
        return self.server.update(state, replace(aggregate, mean=estimate))

    def __getattr__(self, name: str) -> Any:
        if name == "server":
            raise AttributeError(name)
        return getattr(self.server, name)


@PRIVACY.register("dpfedavg", params=DPFedAvgParams, wraps="both", unit="user")
def dpfedavg(params: DPFedAvgParams, rule: ClientRule, server: ServerRule,
             population: Population) -> tuple[ClippedClient, NoisyServer]:
    """User-level DP-FedAvg: clip each client's update to S, average by a fixed or bounded denominator and add
    Gaussian noise at the server, around any client and server rule, over Poisson-sampled clients."""
    return ClippedClient(params, rule), NoisyServer(params, server, population)
