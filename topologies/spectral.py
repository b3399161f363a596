"""Spectral figures of a communication graph and its mixing matrix (dense numpy; n up to a few thousand).

- Of a mixing matrix W: lambda, the eigenvalue of second-largest magnitude (max(|lambda_2|, |lambda_n|) for a
  symmetric W), and the spectral gap 1 - lambda that gossip theory (D-SGD, DFedSAM's 1 - lambda) is stated in.
- Of the graph with a rate per edge (DADAO, Nabli & Oyallon 2023, Section 3; the authors' `utils.py:
  compute_spectral_quantities`): the edge-rate Laplacian L = sum_ij p_ij (e_i - e_j)(e_i - e_j)^T, p_ij = 1/|E| by
  default (an edge drawn uniformly), chi_1 = 1 / lambda_2(L) (its smallest nonzero eigenvalue on a connected graph)
  and chi_2 = max over edges of (1/2) (e_i - e_j)^T L^+ (e_i - e_j) (half the largest effective resistance).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch


def _dense(W: torch.Tensor) -> np.ndarray:
    return (W.to_dense() if W.layout != torch.strided else W).double().cpu().numpy()


def second_eigenvalue(W: torch.Tensor) -> float:
    """lambda: the magnitude of W's eigenvalue of second-largest magnitude (0 for one node)."""
    dense = _dense(W)
    if dense.shape[0] < 2:
        return 0.0
    symmetric = np.array_equal(dense, dense.T)
    magnitudes = np.sort(np.abs(np.linalg.eigvalsh(dense) if symmetric else np.linalg.eigvals(dense)))[::-1]
    return float(magnitudes[1])


def spectral_gap(W: torch.Tensor) -> float:
    """1 - lambda. Consensus error of symmetric doubly stochastic mixing shrinks by about (1 - gap)^2 per step."""
    return 1.0 - second_eigenvalue(W)


def edge_rate_laplacian(graph: nx.Graph, rates: dict[tuple[int, int], float] | None = None) -> np.ndarray:
    """L = sum over undirected edges (i, j) of p_ij (e_i - e_j)(e_i - e_j)^T, p_ij = rates[(i, j)] or 1/|E|."""
    n, edges = graph.number_of_nodes(), [(i, j) for i, j in graph.edges if i != j]
    L = np.zeros((n, n))
    for i, j in edges:
        p = rates[(i, j)] if rates is not None else 1.0 / len(edges)
        L[i, i] += p
        L[j, j] += p
        L[i, j] -= p
        L[j, i] -= p
    return L


def chi_1(graph: nx.Graph, rates: dict[tuple[int, int], float] | None = None) -> float:
    """1 / lambda_2(L) of the edge-rate Laplacian: how slowly the graph's communications mix (inf if
    disconnected)."""
    eigenvalues = np.linalg.eigvalsh(edge_rate_laplacian(graph, rates))
    algebraic_connectivity = eigenvalues[1] if len(eigenvalues) > 1 else 0.0
    return float("inf") if algebraic_connectivity <= 1e-12 * max(eigenvalues[-1], 1.0) else \
        float(1.0 / algebraic_connectivity)


def chi_2(graph: nx.Graph, rates: dict[tuple[int, int], float] | None = None) -> float:
    """max over edges of (1/2) (e_i - e_j)^T L^+ (e_i - e_j), L the edge-rate Laplacian."""
    pinv = np.linalg.pinv(edge_rate_laplacian(graph, rates), hermitian=True)
    return max(0.5 * float(pinv[i, i] + pinv[j, j] - 2 * pinv[i, j]) for i, j in graph.edges if i != j)
