"""Weighted mean of client messages: the reduction every server rule starts from.

It is a sum of weight * message and of weights, so it reduces the same way across devices or MPI ranks. Clients
are summed in their draw order, so the simulated timing never changes the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.params import Pytree, tree_map
from fedsim.runtime import JobResult


def client_weight(result: JobResult, weighting: str) -> float:
    """n_k (FedProx and FedAvg's experiments weight by local training samples) or 1 (uniform)."""
    return float(result.num_samples) if weighting == "samples" else 1.0


def weighted_mean(results: Sequence[JobResult], weighting: str) -> Pytree:
    """sum_k w_k m_k / sum_k w_k leaf-wise, accumulated in float64 as FedProx's code does."""
    weights = [client_weight(r, weighting) for r in results]
    total = sum(weights)
    acc = tree_map(lambda v: torch.zeros_like(v, dtype=torch.float64), results[0].message)
    for w, r in zip(weights, results, strict=True):
        tree_map(lambda a, v, w=w: a.add_(v.double(), alpha=w), acc, r.message)
    return tree_map(lambda a, v: (a / total).to(v.dtype), acc, results[0].message)
