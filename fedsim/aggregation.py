"""Weighted means of client messages: the reduction every server rule starts from.

Each top-level key of a message is weighted its own way ("samples": the client's training samples n_k, as FedAvg
and FedProx weight; "uniform": 1 per result, as SCAFFOLD's control variates). The reduction is a sum of
weight * message per key, so it reduces the same way across devices or MPI ranks. Results are summed in their job
order, so the simulated timing never changes the numbers. `Aggregate` is what a server rule's `update` receives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedsim.params import Pytree, tree_map

if TYPE_CHECKING:
    from fedsim.runtime import JobResult

Sums = Pytree
"""Per message key, the float64 weighted sum of the messages held by this process."""
WEIGHTINGS = ("samples", "uniform")


def result_weight(result: JobResult, kind: str) -> float:
    """n_k (FedProx and FedAvg's experiments weight by local training samples) or 1 (uniform)."""
    return float(result.num_samples) if kind == "samples" else 1.0


BLOCK = 256
"""Messages stacked per leaf at a time when summing: few large ops instead of one per client and leaf."""


def weighted_sum(messages: Sequence[Pytree], weights: Sequence[float], template: Pytree) -> Pytree:
    """sum_k w_k m_k leaf-wise in float64 (shaped like `template`)."""
    w_all = torch.tensor(list(weights), dtype=torch.float64)
    acc = tree_map(lambda v: torch.zeros_like(v, dtype=torch.float64), template)
    for start in range(0, len(messages), BLOCK):
        w = w_all[start : start + BLOCK]
        block = messages[start : start + BLOCK]
        acc = tree_map(lambda a, *leaves, w=w: a + torch.tensordot(w, torch.stack(leaves).double(), dims=1),
                       acc, *block)
    return acc


def weighted_sums(results: Sequence[JobResult], weighting: Mapping[str, str], template: Pytree) -> Sums:
    """Per message key, sum_k w_k m_k over the results whose message is here, w_k by that key's weighting."""
    here = [r for r in results if r.here]
    return {key: weighted_sum([r.message[key] for r in here], [result_weight(r, weighting[key]) for r in here],
                              sub) for key, sub in template.items()}


def total_weights(results: Sequence[JobResult], weighting: Mapping[str, str]) -> dict[str, float]:
    """Per message key, sum_k w_k over every result (every process knows every result's sample count)."""
    return {key: sum(result_weight(r, kind) for r in results) for key, kind in weighting.items()}


def finish_means(sums: Sums, totals: Mapping[str, float], template: Pytree) -> Pytree:
    """Divide each key's weighted sum by its total weight, back in the messages' dtype."""
    return {key: tree_map(lambda a, v, t=totals[key]: (a / t).to(v.dtype), sums[key], template[key])
            for key in template}


@dataclass(frozen=True)
class Aggregate:
    """What a server rule's `update` sees: per message key the weighted mean and its weighting and total weight,
    the number of results, the population size N, the round (server step), the results' bookkeeping (client,
    job, samples, staleness through `job.version`), their messages when the rule asked for them
    (`per_result`), and the server's random key for this step (`fedsim.keyed_random`)."""

    mean: Pytree
    weighting: Mapping[str, str]
    total_weight: Mapping[str, float]
    count: int
    population: int
    round: int
    results: Sequence[JobResult]
    messages: Sequence[Pytree] | None
    key: torch.Tensor

    def sum(self, key: str) -> Pytree:
        """The weighted sum of one message key (the mean times its total weight)."""
        total = self.total_weight[key]
        return tree_map(lambda v: v * total, self.mean[key])
