"""SpiderBoost's client side (Wang, Ji, Zhou, Liang, Tarokh, NeurIPS 2019; the SPIDER estimator of Fang et al. 2018),
in the form private SpiderBoost needs (Arora, Bassily, González, Guzmán, Menart, Ullah, ICML 2023, Algorithm 2).

A job is one pass over the client's data. Each record joins the round's sample independently with the probability
the server broadcasts (a Poisson sample: b1 / n at a checkpoint, b2 / n in between). The client sends the sum over
its sampled records of
  - at a checkpoint: the record's gradient at the broadcast model w_t (Alg. 2 line 9);
  - otherwise: its gradient difference at w_t and at the previous model w_{t-1} (line 13);
each clipped to the bound the broadcast carries (`clip`, set by `private_spiderboost`; no clipping without it).
The server (`servers/spiderboost.py`) sums the clients' sums, divides by the expected sample size and steps.

With `tree` in the broadcast (private SpiderBoost's tree aggregation) a difference step's sample is instead the
records whose phase draw falls in the step's slot, [(leaf - 1) r, leaf r): each record draws one uniform per phase,
keyed by the broadcast `phase_key`, the client and the record's position (batches come in the stored order), so it
joins at most one leaf of the phase, with probability r each.

With `level: user` in the broadcast (user-level privacy, our federated extension) the client sends instead the mean
of its records' terms over its whole data, and the bound clips that mean: one client is one record.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from fedsim import keyed_random
from fedsim.clients import ALGORITHMS, Batch, BatchingParams, JobInfo, Oracle, StepState
from fedsim.clients.dpsgd import clip_factors
from fedsim.errors import ScenarioError
from fedsim.params import Pytree, tree_map, tree_zeros_like


class SpiderBoostParams(BatchingParams):
    """A job is one pass over the client's data in minibatches of `batch_size` rows. Each record's draw is keyed by
    its batch and its position in it, so another batch_size draws another sample, with the same distribution."""

    batch_size: int = Field(64, ge=1, description="rows whose per-record gradients are held at once")
    local_epochs: int = Field(1, ge=1, le=1, description="one pass over the data per job (fixed)")
    local_steps: None = Field(None, description="not used: a job is one pass over the data")
    sampling: Literal["ordered"] = Field("ordered", description="the pass goes in the stored order (fixed), so a "
                                                                "record's position names it; records are sampled "
                                                                "by the rates the server broadcasts")


def check_spiderboost(hp: SpiderBoostParams, spec: Any, components: dict[str, Any]) -> None:
    """The broadcast carries the step's kind, its rates and (private runs) bounds and keys, which a downlink codec
    would garble; and the messages are sums whose privacy is private_spiderboost's, which other mechanisms would
    read as model changes."""
    if spec.compression.downlink is not None:
        raise ScenarioError("compression.downlink: spiderboost's broadcast carries the step's kind, sampling rate "
                            "and clipping bound, which a codec would distort; remove the downlink codec")
    privacy = components.get("privacy")
    if privacy is not None and privacy.name != "private_spiderboost":
        raise ScenarioError(f"privacy.name: spiderboost's messages are sums of its records' terms; its privacy "
                            f"mechanism is private_spiderboost, not {privacy.name!r}")


@ALGORITHMS.register("spiderboost", params=SpiderBoostParams, server="spiderboost", stragglers="drop",
                     receives=("params", "previous", "checkpoint", "rate"), sends=("sum",), check=check_spiderboost,
                     no_dpsgd="its privacy is its own: privacy: {name: private_spiderboost}")
class SpiderBoostClient:
    """Sends {"sum": the sum over its sampled records of their (clipped) gradient or gradient difference}."""

    step_cost = 2
    """Per-record gradients at w_t and w_{t-1} each step (a checkpoint discards the second)."""

    def __init__(self, hp: SpiderBoostParams) -> None:
        self.hp = hp

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        return None

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        params, device = server_message["params"], server_message["rate"].device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return {"params": params, "previous": server_message["previous"],
                "checkpoint": server_message["checkpoint"], "rate": server_message["rate"],
                "clip": server_message.get("clip", zero + torch.inf), "user": server_message.get("user", zero),
                "tree": server_message.get("tree", zero), "leaf": server_message.get("leaf", zero + 1),
                "phase_key": server_message.get("phase_key", torch.zeros(2, dtype=torch.int64, device=device)),
                "client": info["client"], "samples": info["num_samples"], "sum": tree_zeros_like(params)}

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        # Each record is drawn once per job (one pass), so its draw is a Poisson sample's; at the user level every
        # record takes part (rate 1 is the broadcast's then). Tree differences use the record's phase draw.
        kept = batch.w != 0
        job_draw = oracle.uniform(batch, {"u": batch.w})["u"]
        record_key = keyed_random.fold_in(state["phase_key"], state["client"])
        phase_draw = keyed_random.uniform(record_key, batch.step, batch.w.shape, batch.w.dtype)
        tree = (state["tree"] > 0) & (state["checkpoint"] == 0)
        draw = torch.where(tree, phase_draw, job_draw)
        lower = torch.where(tree, (state["leaf"] - 1) * state["rate"], 0.0)
        sampled = kept & (lower <= draw) & (draw < lower + state["rate"])
        current = oracle.per_sample_grads(state["params"], batch)
        earlier = oracle.per_sample_grads(state["previous"], batch)
        checkpoint = state["checkpoint"] != 0
        terms = tree_map(lambda g, h: torch.where(checkpoint, g, g - h), current, earlier)
        # At the user level the bound clips the client's mean, not each record: per-record factors are 1 there.
        record_clip = torch.where(state["user"] > 0, torch.inf, state["clip"])
        factors = clip_factors(terms, record_clip, "flat")

        def add(total: torch.Tensor, term: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
            # Selected, not multiplied by a 0/1 mask: a record left out (or a padding row) adds nothing, whatever it is.
            axes = (-1, *[1] * (term.dim() - 1))
            scaled = factor.to(term.dtype).reshape(axes) * term
            zero = torch.zeros((), dtype=term.dtype, device=term.device)
            return total + torch.where(sampled.reshape(axes), scaled, zero).sum(0)

        return {**state, "sum": tree_map(add, state["sum"], terms, factors)}

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        total = state["sum"]
        mean = tree_map(lambda s: s / state["samples"].clamp_min(1).to(s.dtype), total)
        factor = clip_factors(tree_map(lambda m: m.unsqueeze(0), mean), state["clip"], "flat")
        clipped = tree_map(lambda m, f: m * f[0].to(m.dtype), mean, factor)
        user = state["user"] > 0
        return {"sum": tree_map(lambda c, s: torch.where(user, c, s), clipped, total)}, None
