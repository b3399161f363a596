"""DP-SGD (Abadi et al., CCS 2016, Algorithm 1) as a wrapper around any client rule: every gradient the rule asks
its oracle for is replaced by the sum of per-sample gradients clipped to norm C plus Gaussian noise N(0, s^2 C^2 I),
divided by the expected batch size. Batches are Poisson samples (`algorithm.sampling: poisson`, refused otherwise),
as the accountant assumes; the accounting itself (epsilon, delta) is the run's (`fedsim.privacy`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from fedsim.clients import Batch, ClientRule, Oracle, RuleWrapper, StepState
from fedsim.params import Pytree, tree_leaves, tree_map
from fedsim.privacy import PRIVACY, AccountingParams, Population

if TYPE_CHECKING:  # servers/ import the clients package: no runtime import back
    from fedsim.servers import ServerRule

NOISE_STREAMS = 1 << 15
"""The oracle's random streams from here up (to `fedsim.oracle.STREAMS_PER_STEP`, 2^16; not imported, as the oracle
module imports this package) are DP-SGD's noise, stream NOISE_STREAMS + k for the k-th gradient of a step; the wrapped
rule keeps the streams below for its own draws, so its randomness never correlates with the noise."""


class DPSGDParams(AccountingParams):
    """The mechanism's parameters and how its run is accounted (`AccountingParams`)."""

    clip: float = Field(1.0, gt=0, description="C: the bound on each sample's gradient norm")
    noise_multiplier: float = Field(1.0, ge=0, description="sigma: the noise's std is sigma * C (before dividing by "
                                                           "the batch size)")
    clipping: Literal["flat", "per_layer"] = Field(
        "flat", description="flat: clip the whole per-sample gradient to C; per_layer: clip each of the L parameter "
                            "tensors to C / sqrt(L), so the whole stays within C")


def clip_factors(per_sample: Pytree, clip: float, clipping: str) -> Pytree:
    """Each sample's clipping factor min(1, C / ||g_i||) per leaf (a (batch,) tensor): the same for every leaf under
    flat clipping, and with each leaf's own norm and bound C / sqrt(L) under per-layer clipping. Exactly 1.0 where
    the norm is within the bound (C / norm >= 1 clamps to 1), so unclipped samples leave the gradient bit for bit."""
    squares = tree_map(lambda g: g.reshape(g.shape[0], -1).square().sum(1), per_sample)

    def factor(square: torch.Tensor, bound: float) -> torch.Tensor:
        norm = square.sqrt().clamp_min(torch.finfo(square.dtype).tiny)
        return torch.clamp(bound / norm, max=1.0)

    if clipping == "flat":
        flat = factor(sum(tree_leaves(squares)), clip)
        return tree_map(lambda _: flat, squares)
    # Per-layer clipping splits C equally in squared norm, C_l = C / sqrt(L), as McMahan et al. (ICLR 2018, "Learning
    # differentially private recurrent language models") and Opacus' per-layer clipping with equal thresholds do.
    bound = clip / len(list(tree_leaves(squares))) ** 0.5
    return tree_map(lambda square: factor(square, bound), squares)


def clipping_correction(per_sample: Pytree, factors: Pytree, w: torch.Tensor) -> Pytree:
    """sum_i w_i (c_i - 1) g_i per leaf: what clipping changes in the weighted sum of per-sample gradients. Padding
    rows (w_i = 0) are selected away, so whatever their inputs, even non-finite gradients, they add nothing."""
    kept = w != 0

    def leaf(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        axes = (-1, *[1] * (g.dim() - 1))
        scaled = (w * (c - 1)).reshape(axes) * g
        return torch.where(kept.reshape(axes), scaled, torch.zeros((), dtype=g.dtype, device=g.device)).sum(0)

    return tree_map(leaf, per_sample, factors)


class PrivateOracle:
    """One step's oracle for the wrapped rule: gradients privatized, everything else passed through. Made afresh for
    every step, it counts the rule's gradient calls in Python (the same trace in every runtime and under vmap) so
    that each call draws its own noise stream."""

    def __init__(self, oracle: Oracle, params: DPSGDParams, expected_batch: float) -> None:
        self.oracle, self.params, self.expected_batch, self.calls = oracle, params, expected_batch, 0

    def private(self, grads: Pytree, params: Pytree, batch: Batch) -> Pytree:
        """g + (sum_i w_i (c_i - 1) g_i + sigma C z) / L for the oracle's gradient g = sum_i w_i g_i / L of a Poisson
        sample of expected size L (Abadi et al.'s lot): mathematically (sum_i w_i c_i g_i + sigma C z) / L, and exactly
        g when no clipping binds and sigma = 0. Each g_i is its sample's whole loss gradient, the task's penalty
        (ridge) included, so that is clipped too."""
        clip, sigma = self.params.clip, self.params.noise_multiplier
        per_sample = self.oracle.per_sample_grads(params, batch)
        correction = clipping_correction(per_sample, clip_factors(per_sample, clip, self.params.clipping), batch.w)
        if sigma > 0:
            noise = self.oracle.normal(batch, like=params, stream=NOISE_STREAMS + self.calls)
            correction = tree_map(lambda c, z: c + (sigma * clip) * z, correction, noise)
        self.calls += 1
        return tree_map(lambda g, c: g + c / self.expected_batch, grads, correction)

    def grad(self, params: Pytree, batch: Batch) -> Pytree:
        return self.private(self.oracle.grad(params, batch), params, batch)

    def value_and_grad(self, params: Pytree, batch: Batch) -> tuple[torch.Tensor, Pytree]:
        """The plain minibatch loss with the private gradient."""
        value, grads = self.oracle.value_and_grad(params, batch)
        return value, self.private(grads, params, batch)

    def per_sample_grads(self, params: Pytree, batch: Batch) -> Pytree:
        return self.oracle.per_sample_grads(params, batch)

    def normal(self, batch: Batch, like: Pytree, stream: int = 0) -> Pytree:
        return self.oracle.normal(batch, like, _rule_stream(stream))

    def uniform(self, batch: Batch, like: Pytree, stream: int = 0) -> Pytree:
        return self.oracle.uniform(batch, like, _rule_stream(stream))


def _rule_stream(stream: int) -> int:
    if not 0 <= stream < NOISE_STREAMS:
        raise ValueError(f"dpsgd: random stream {stream} of the wrapped rule is outside [0, {NOISE_STREAMS}) (the "
                         "streams above are DP-SGD's noise)")
    return stream


class DPSGD(RuleWrapper):
    """A client rule whose steps see a `PrivateOracle`; everything else is the wrapped rule's (per-sample gradients
    of a minibatch cost about one minibatch gradient, so the step cost too)."""

    def __init__(self, params: DPSGDParams, rule: ClientRule) -> None:
        super().__init__(rule)
        self.params = params

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        return self.rule.step(state, batch, PrivateOracle(oracle, self.params, float(self.rule.hp.batch_size)))


@PRIVACY.register("dpsgd", params=DPSGDParams, wraps="client", unit="sample")
def dpsgd(params: DPSGDParams, rule: ClientRule, server: ServerRule, population: Population) -> tuple[DPSGD,
                                                                                                   ServerRule]:
    """DP-SGD: clip each sample's gradient to C and add N(0, sigma^2 C^2) noise, around any client rule whose
    batches are Poisson samples (`fedsim.privacy.check_privacy` refuses others)."""
    return DPSGD(params, rule), server
