"""User-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, "Learning Differentially Private Recurrent
Language Models", Algorithm 1) as a privacy mechanism around any client rule and any server rule, optionally with
adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, "Differentially Private Learning with Adaptive
Clipping", arXiv 1905.03871, Algorithm 1).

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

With `adaptive_clip`, S is the server's current clip C, broadcast each round. Each sampled client also reports
b_k = 1 if clipping left its message unchanged (flat: ||Delta_k|| <= C), else 0; the server releases
b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / M + 1/2 (M = q N, the expected clients per round; centring the bits
makes one user's effect on the sum 1/2, as the authors' TF Privacy `QuantileEstimatorQuery` does) and moves the clip
geometrically, C <- C exp(-eta_C (b~ - gamma)), so that a fraction gamma of updates go unclipped. The update's
noise multiplier drops to z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the two releases together are one Gaussian
mechanism of noise multiplier z on the same Poisson sample (Andrew et al., Section 3), so the accounting is
unchanged, one Poisson-subsampled Gaussian with (z, q) per round.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator

from fedsim.aggregation import Aggregate
from fedsim.clients import Batch, ClientRule, JobInfo, Oracle, RuleWrapper, StepState
from fedsim.clients.dpsgd import clip_factors
from fedsim.errors import ScenarioError
from fedsim.keyed_random import normal, tree_normal
from fedsim.params import Pytree, tree_leaves, tree_map, tree_sub
from fedsim.privacy import PRIVACY, AccountingParams, Population
from fedsim.servers import ServerRule, ServerState

NOISE_SALT = 0x44504641
"""The server key's stream DP-FedAvg's noise is drawn from ("DPFA"), apart from any draw of the wrapped rule."""
QUANTILE_SALT = 0x44504143
"""The server key's stream the noise of the unclipped count is drawn from ("DPAC"), apart from the update's."""
CLIP_KEY = "dp_clip"
"""The server state's and broadcast's key of the current clip C (adaptive clipping)."""
BIT_KEY = "dp_unclipped"
"""The client message's key of the bit b_k (adaptive clipping; a tree like every message key, {"bit": b_k}),
removed before the wrapped server rule sees it."""


class DPFedAvgParams(AccountingParams):
    """DP-FedAvg's clipping, estimator and noise, and how its run is accounted (`AccountingParams`)."""

    clip: float = Field(1.0, gt=0, description="S: the bound on the norm of a client's whole message (with "
                                               "adaptive_clip, the initial clip)")
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
    adaptive_clip: bool = Field(False, description="move the clip each round toward the target_quantile of the "
                                                   "clients' update norms (Andrew et al., NeurIPS 2021)")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="gamma: the fraction of updates to leave unclipped")
    clip_lr: float = Field(0.2, gt=0, description="eta_C: the clip changes by a factor of at most exp(eta_C) a "
                                                  "round")
    quantile_noise: float | None = Field(None, ge=0, description="sigma_b: the std of the noise on the count of "
                                                                 "unclipped updates (default: the expected clients "
                                                                 "per round / 20)")

    @field_validator("target_quantile", "clip_lr", "quantile_noise")
    @classmethod
    def _only_when_adaptive(cls, value: Any, info: ValidationInfo) -> Any:
        """Adaptive settings other than their defaults need adaptive_clip (resolved scenarios write the defaults)."""
        if not info.data.get("adaptive_clip") and value != cls.model_fields[info.field_name].default:
            raise ValueError(f"{info.field_name} is adaptive clipping's; set adaptive_clip: true")
        return value

    @model_validator(mode="after")
    def _min_weight_only_when_bounded(self) -> DPFedAvgParams:
        if self.min_weight is not None and self.estimator != "bounded":
            raise ValueError("min_weight is the bounded estimator's; set estimator: bounded")
        return self


def client_weights(train_sizes: np.ndarray, weight_cap: float | None) -> np.ndarray:
    """w_k = min(n_k / w_cap, 1), or 1 for every client without a cap."""
    sizes = np.asarray(train_sizes, dtype=np.float64)
    return np.ones_like(sizes) if weight_cap is None else np.minimum(sizes / weight_cap, 1.0)


def update_noise_multiplier(z: float, quantile_noise: float) -> float:
    """z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), the update's noise multiplier that, with the count's noise sigma_b
    at sensitivity 1/2, makes a round one Gaussian release of noise multiplier z (Andrew et al., Section 3); 0 for
    z = 0 (no privacy to keep). Needs 2 sigma_b > z."""
    if z == 0:
        return 0.0
    return (z ** -2 - (2 * quantile_noise) ** -2) ** -0.5


def clipped_with_bit(tree: Pytree, clip: float | torch.Tensor, clipping: str) -> tuple[Pytree, torch.Tensor]:
    """`tree` clipped as `clipped` does, and 1.0 where clipping left it unchanged, else 0.0 (adaptive clipping's
    b = 1[||Delta|| <= C]): tensor ops only, so it runs under vmap."""
    factors = clip_factors(tree_map(lambda v: v.unsqueeze(0), tree), clip, clipping)
    bit = torch.stack([c.squeeze(0) >= 1 for c in tree_leaves(factors)]).all().to(torch.float32)
    return tree_map(lambda v, c: v * c.squeeze(0).to(v.dtype), tree, factors), bit


def clipped(tree: Pytree, clip: float | torch.Tensor, clipping: str) -> Pytree:
    """`tree` scaled to norm at most `clip` (flat), or each tensor to clip / sqrt(L) (per layer): DP-SGD's clipping
    of one sample, the whole message being the sample."""
    return clipped_with_bit(tree, clip, clipping)[0]


class ClippedClient(RuleWrapper):
    """The client side: the wrapped rule's message clipped to S and weighted by w_k (and with `clip_every_step` its
    local model kept within S of the round's model); with `adaptive_clip`, S is the broadcast clip and the message
    also carries the bit b_k, 1 when no clipping or projection changed anything; everything else is the wrapped
    rule's."""

    def __init__(self, params: DPFedAvgParams, rule: ClientRule) -> None:
        super().__init__(rule)
        self.params = params

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        samples = info["num_samples"].to(torch.float64)
        cap = self.params.weight_cap
        weight = torch.ones_like(samples) if cap is None else torch.clamp(samples / cap, max=1.0)
        state = {"inner": self.rule.init(server_message, client_state, info), "weight": weight,
                 "start": server_message["params"]}
        if self.params.adaptive_clip:
            clip = server_message[CLIP_KEY]
            state.update(clip=clip, unclipped=torch.ones_like(clip, dtype=torch.float32))
        return state

    def clip(self, state: StepState) -> float | torch.Tensor:
        """This round's clip: the broadcast one when adaptive, else S."""
        return state["clip"] if self.params.adaptive_clip else self.params.clip

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        inner = self.rule.step(state["inner"], batch, oracle)
        if not self.params.clip_every_step:
            return {**state, "inner": inner}
        if not isinstance(inner, dict) or "params" not in inner:
            raise ScenarioError("privacy.clip_every_step: the algorithm's step state holds no params to project; "
                                "set clip_every_step: false")
        moved, bit = clipped_with_bit(tree_sub(inner["params"], state["start"]), self.clip(state),
                                      self.params.clipping)
        state = {**state, "inner": {**inner, "params": tree_map(torch.add, state["start"], moved)}}
        return {**state, "unclipped": state["unclipped"] * bit} if self.params.adaptive_clip else state

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        message, client_state = self.rule.final(state["inner"])
        weight = state["weight"]
        bounded, bit = clipped_with_bit(message, self.clip(state), self.params.clipping)
        weighted = tree_map(lambda v: v * weight.to(v.dtype), bounded)
        if self.params.adaptive_clip:
            weighted[BIT_KEY] = {"bit": state["unclipped"] * bit}
        return weighted, client_state


class NoisyServer:
    """The server side: the clients' clipped, weighted messages summed, divided by the estimator's denominator,
    Gaussian noise added, and the result handed to the wrapped server rule as its mean; with `adaptive_clip`, the
    clip kept in the state under "dp_clip", broadcast with the wrapped rule's message and moved by the noisy
    fraction of unclipped updates."""

    steps_without_results = True
    """A round that sampled no client still releases its noise and counts as a step."""

    def __init__(self, params: DPFedAvgParams, server: ServerRule, population: Population) -> None:
        self.params, self.server = params, server
        self.rate = population.client_rate
        self.total = float(client_weights(population.train_sizes, params.weight_cap).sum())
        self.min_total = self.total if params.min_weight is None else params.min_weight
        self.expected_clients = self.rate * len(population.train_sizes)
        self.quantile_noise = self.expected_clients / 20 if params.quantile_noise is None else params.quantile_noise
        self.noise_multiplier = params.noise_multiplier
        """The update's noise multiplier: z, or z_Delta with adaptive clipping."""
        if params.adaptive_clip:
            self._check_quantile_noise()
            self.noise_multiplier = update_noise_multiplier(params.noise_multiplier, self.quantile_noise)

    def _check_quantile_noise(self) -> None:
        """z_Delta exists only when 2 sigma_b > z (or z = 0: no noise at all)."""
        z, sigma_b = self.params.noise_multiplier, self.quantile_noise
        if z > 0 and 2 * sigma_b <= z:
            raise ScenarioError(
                f"privacy.quantile_noise: 2 * quantile_noise ({2 * sigma_b:.4g}) must exceed noise_multiplier "
                f"({z:.4g}) for the update's noise multiplier (z^-2 - (2 quantile_noise)^-2)^-1/2 to exist; raise "
                f"quantile_noise (default: the expected clients per round / 20 = {self.expected_clients / 20:.4g})")

    @property
    def hp(self) -> Any:
        return self.server.hp

    def init(self, params: Pytree) -> ServerState:
        state = self.server.init(params)
        if not self.params.adaptive_clip:
            return state
        device = next(tree_leaves(params)).device
        return {**state, CLIP_KEY: torch.tensor(self.params.clip, dtype=torch.float64, device=device)}

    def broadcast(self, state: ServerState) -> Pytree:
        message = self.server.broadcast(self._inner(state))
        return {**message, CLIP_KEY: state[CLIP_KEY]} if self.params.adaptive_clip else message

    def weighting(self, template: Pytree) -> dict[str, str]:
        """Every key weighs its clients alike: the clients have weighted their messages by w_k themselves."""
        return {key: "uniform" for key in template}

    def sensitivity(self, clip: float) -> float:
        """S / (q W) for f_f, 2 S / (q W_min) for f_c (the paper's bounds on one user's effect on the estimate)."""
        if self.params.estimator == "fixed":
            return clip / (self.rate * self.total)
        return 2 * clip / (self.rate * self.min_total)

    def denominator(self, aggregate: Aggregate) -> float:
        if self.params.estimator == "fixed":
            return self.rate * self.total
        weights = client_weights(np.array([r.num_samples for r in aggregate.results]), self.params.weight_cap)
        return max(self.rate * self.min_total, float(weights.sum()))

    def update(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        clip = float(state[CLIP_KEY]) if self.params.adaptive_clip else self.params.clip
        keys = [key for key in aggregate.mean if key != BIT_KEY]
        count, sigma = aggregate.count, self.noise_multiplier * self.sensitivity(clip)
        sums = {key: aggregate.sum(key) if count else tree_map(torch.zeros_like, aggregate.mean[key]) for key in keys}
        noise = tree_normal(aggregate.key, NOISE_SALT, sums)
        denominator = self.denominator(aggregate)
        estimate = tree_map(lambda s, z: s / denominator + sigma * z, sums, noise)
        # The wrapped rule sees the expected number of clients, q N, not how many were drawn (SCAFFOLD, FedDyn and
        # FedSpeed scale by the count): the count is not privatized, the estimate already divides by its expectation.
        expected = self.expected_clients
        inner = replace(aggregate, mean=estimate, count=expected, weighting={k: aggregate.weighting[k] for k in keys},
                        total_weight={k: expected for k in keys})
        new = self.server.update(self._inner(state), inner)
        if not self.params.adaptive_clip:
            return new
        return {**new, CLIP_KEY: state[CLIP_KEY] * math.exp(-self.params.clip_lr * self.clip_gradient(aggregate))}

    def unclipped_fraction(self, aggregate: Aggregate) -> float:
        """b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / M + 1/2, the noisy fraction of unclipped updates (Andrew et
        al., Algorithm 1, with the bits centred to sensitivity 1/2); only noise in a round that sampled no one."""
        unclipped = round(float(aggregate.sum(BIT_KEY)["bit"])) if aggregate.count else 0
        noise = float(normal(aggregate.key, QUANTILE_SALT, (), torch.float64))
        return (unclipped - aggregate.count / 2 + self.quantile_noise * noise) / self.expected_clients + 0.5

    def clip_gradient(self, aggregate: Aggregate) -> float:
        """b~ - gamma: the clip's step in log space is -eta_C times this (Andrew et al., Algorithm 1)."""
        return self.unclipped_fraction(aggregate) - self.params.target_quantile

    def _inner(self, state: ServerState) -> ServerState:
        """The wrapped rule's own state: this one without the clip."""
        return {key: value for key, value in state.items() if key != CLIP_KEY}

    def __getattr__(self, name: str) -> Any:
        if name == "server":
            raise AttributeError(name)
        return getattr(self.server, name)


def check_dpfedavg(params: DPFedAvgParams, spec: Any, components: dict[str, Any]) -> None:
    """An adaptive clip travels in the broadcast: a lossy downlink codec would make clients clip to another value
    than the one the server's noise assumes."""
    if params.adaptive_clip and spec.compression.downlink is not None:
        raise ScenarioError("compression.downlink: dpfedavg's adaptive clip travels in the broadcast, and a lossy "
                            "codec would make clients clip to another value than the server's noise assumes; remove "
                            "the downlink codec")


@PRIVACY.register("dpfedavg", params=DPFedAvgParams, wraps="both", unit="user", check=check_dpfedavg)
def dpfedavg(params: DPFedAvgParams, rule: ClientRule, server: ServerRule,
             population: Population) -> tuple[ClippedClient, NoisyServer]:
    """User-level DP-FedAvg: clip each client's update to S (fixed, or adapted to a quantile of the update norms),
    average by a fixed or bounded denominator and add Gaussian noise at the server, around any client and server
    rule, over Poisson-sampled clients."""
    return ClippedClient(params, rule), NoisyServer(params, server, population)
