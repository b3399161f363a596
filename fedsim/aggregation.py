"""Weighted mean of client messages: the reduction every server rule starts from.

It is a sum of weight * message and of weights, so it reduces the same way across devices or MPI ranks. Clients
are summed in their draw order, so the simulated timing never changes the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from fedsim.params import Pytree, tree_map

if TYPE_CHECKING:
    from fedsim.runtime import JobResult


def client_weight(result: JobResult, weighting: str) -> float:
    """n_k (FedProx and FedAvg's experiments weight by local training samples) or 1 (uniform)."""
    return float(result.num_samples) if weighting == "samples" else 1.0


BLOCK = 256
"""Messages stacked per leaf at a time when summing: few large ops instead of one per client and leaf."""


def weighted_sum(results: Sequence[JobResult], weighting: str, template: Pytree) -> Pytree:
    """sum_k w_k m_k leaf-wise in float64, over the results whose message is here (shaped like `template`)."""
    here = [r for r in results if r.message is not None]
    weights = torch.tensor([client_weight(r, weighting) for r in here], dtype=torch.float64)
    acc = tree_map(lambda v: torch.zeros_like(v, dtype=torch.float64), template)
    for start in range(0, len(here), BLOCK):
        w = weights[start : start + BLOCK]
        block = [r.message for r in here[start : start + BLOCK]]
        acc = tree_map(lambda a, *leaves, w=w: a + torch.tensordot(w, torch.stack(leaves).double(), dims=1),
                       acc, *block)
    return acc


def total_weight(results: Sequence[JobResult], weighting: str) -> float:
    return sum(client_weight(r, weighting) for r in results)


def finish_mean(weighted: Pytree, total: float, template: Pytree) -> Pytree:
    """Divide a weighted sum by the total weight, back in the messages' dtype."""
    return tree_map(lambda a, v: (a / total).to(v.dtype), weighted, template)


def weighted_mean(results: Sequence[JobResult], weighting: str) -> Pytree:
    """sum_k w_k m_k / sum_k w_k leaf-wise, accumulated in float64 as FedProx's code does."""
    template = results[0].message
    return finish_mean(weighted_sum(results, weighting, template), total_weight(results, weighting), template)
