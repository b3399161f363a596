"""Mixing (gossip) matrices of a communication graph, and mixing of stacked node states with them.

Decentralized SGD keeps every node's parameters stacked (leading node axis) and averages neighbours with a sparse
stochastic matrix W: x <- W x, one sparse product per leaf. Entries are `fn(params, graph) -> W`, W sparse CSR
float64 (n x n) indexed by the graph's nodes 0..n-1. Metadata: `doubly_stochastic` (checked) and `directed` (True:
it takes directed graphs, weighting what each node hears).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection
from typing import Any

import networkx as nx
import numpy as np
import torch
from pydantic import Field

from fedsim.errors import ScenarioError
from fedsim.node_store import tree_flatten, tree_map_keyed
from fedsim.params import Pytree
from fedsim.registry import NoParams, Params, Registry, validate_params
from fedsim.strict_input import shorten

MIXING: Registry = Registry("mixing matrix")
DEFAULT_MIXING = "metropolis_hastings"
TOLERANCE = 1e-9
"""Largest error allowed in a row or column sum of a stochastic matrix."""


def _neighbours(graph: nx.Graph) -> list[set[int]]:
    """Each node's neighbours without itself (self-loops ignored): those it hears from (in-neighbours) on a
    directed graph; nodes must be exactly 0..n-1."""
    n = graph.number_of_nodes()
    if set(graph.nodes) != set(range(n)):
        raise ScenarioError(f"topology: a mixing matrix needs a graph on nodes 0..{n - 1}, got nodes "
                            f"{shorten(sorted(graph.nodes, key=str))}")
    adjacency = graph.pred if graph.is_directed() else graph.adj
    return [set(adjacency[i]) - {i} for i in range(n)]


def _undirected_neighbours(graph: nx.Graph, name: str) -> list[set[int]]:
    """`_neighbours` of an undirected graph; a directed one is refused naming the matrices that take it."""
    if graph.is_directed():
        fitting = [e.name for e in MIXING if e.meta.get("directed")]
        raise ScenarioError(f"protocol.mixing.name: {name!r} needs an undirected graph and the topology is "
                            f"directed; use {' or '.join(fitting)}")
    return _neighbours(graph)


def _matrix(n: int, entries: dict[tuple[int, int], float]) -> torch.Tensor:
    """A sparse CSR float64 (n x n) matrix of the nonzero `entries`."""
    kept = {ij: w for ij, w in entries.items() if w != 0.0}
    index = torch.tensor(list(kept), dtype=torch.long).reshape(-1, 2).T
    values = torch.tensor(list(kept.values()), dtype=torch.float64)
    coo = torch.sparse_coo_tensor(index, values, (n, n), check_invariants=True).coalesce()
    with warnings.catch_warnings():  # torch warns that CSR support is "in beta" on every conversion; we rely on
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # matmul only
        return coo.to_sparse_csr()


def _with_diagonal(nbrs: list[set[int]], weight: Any) -> torch.Tensor:
    """Off-diagonal W_ij = weight(i, j) on edges and W_ii = 1 - sum_j W_ij (rows sum to one)."""
    entries = {(i, j): weight(i, j) for i, js in enumerate(nbrs) for j in js}
    for i, js in enumerate(nbrs):
        entries[i, i] = 1.0 - math.fsum(entries[i, j] for j in js)
    return _matrix(len(nbrs), entries)


@MIXING.register("metropolis_hastings", params=NoParams, doubly_stochastic=True, directed=False)
def metropolis_hastings(params: NoParams, graph: nx.Graph) -> torch.Tensor:
    """W_ij = 1 / (1 + max(deg_i, deg_j)) on edges: symmetric and doubly stochastic on any undirected graph."""
    # Metropolis weights: Xiao & Boyd 2004 (eq. 12), as used by D-PSGD (Lian et al. 2017) and Koloskova et al. 2020.
    nbrs = _undirected_neighbours(graph, "metropolis_hastings")
    return _with_diagonal(nbrs, lambda i, j: 1.0 / (1 + max(len(nbrs[i]), len(nbrs[j]))))


@MIXING.register("uniform_neighbour", params=NoParams, doubly_stochastic=False, directed=True)
def uniform_neighbour(params: NoParams, graph: nx.Graph) -> torch.Tensor:
    """W_ij = 1 / (deg_i + 1) over i's neighbours (in-neighbours if directed) and itself: row stochastic, doubly
    only on (in- and out-) regular graphs, such as the exponential graphs."""
    nbrs = _neighbours(graph)
    return _matrix(len(nbrs), {(i, j): 1.0 / (len(js) + 1) for i, js in enumerate(nbrs) for j in js | {i}})


@MIXING.register("max_degree", params=NoParams, doubly_stochastic=True, directed=False)
def max_degree(params: NoParams, graph: nx.Graph) -> torch.Tensor:
    """W_ij = 1 / (d_max + 1) on every edge, the rest on the diagonal: symmetric and doubly stochastic."""
    nbrs = _undirected_neighbours(graph, "max_degree")
    d_max = max((len(js) for js in nbrs), default=0)
    return _with_diagonal(nbrs, lambda i, j: 1.0 / (d_max + 1))


class LaplacianParams(Params):
    """The step of Laplacian gossip."""

    step: float | None = Field(None, gt=0, description="W = I - step L; default 1 / lambda_max(L) (at most "
                                                        "1 / max degree keeps W non-negative)")


DENSE_EIGEN_NODES = 256
"""Largest graph whose Laplacian's lambda_max is computed densely (numpy); larger ones use sparse Lanczos."""


def laplacian_lambda_max(nbrs: list[set[int]]) -> float:
    """The largest eigenvalue of the graph Laplacian L = D - A (0 without edges)."""
    n = len(nbrs)
    rows = [i for i, js in enumerate(nbrs) for _ in js]
    cols = [j for js in nbrs for j in js]
    degrees = np.array([len(js) for js in nbrs], dtype=np.float64)
    if not rows:
        return 0.0
    if n <= DENSE_EIGEN_NODES:
        L = np.diag(degrees)
        L[rows, cols] = -1.0
        return float(np.linalg.eigvalsh(L)[-1])
    from scipy.sparse import coo_array, diags_array  # scipy comes with scikit-learn; only large graphs need it
    from scipy.sparse.linalg import eigsh

    L = diags_array(degrees) - coo_array((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    start = np.random.default_rng(0).random(n)  # a fixed start: every process gets the same matrix
    return float(eigsh(L.tocsr(), k=1, which="LA", v0=start, return_eigenvectors=False)[0])


@MIXING.register("laplacian", params=LaplacianParams, doubly_stochastic=True, directed=False)
def laplacian(params: LaplacianParams, graph: nx.Graph) -> torch.Tensor:
    """W = I - L / lambda_max(L), L = D - A the graph Laplacian (ADOM+'s gossip in DADAO's code), or I - step L:
    symmetric and doubly stochastic on any undirected graph."""
    # DADAO `utils.py: compute_spectral_quantities` builds L / lambda_max and `ADOMplus_optimizer` mixes with I - it.
    nbrs = _undirected_neighbours(graph, "laplacian")
    d_max = max((len(js) for js in nbrs), default=0)
    if params.step is not None and params.step * d_max > 1.0 + TOLERANCE:
        i = max(range(len(nbrs)), key=lambda k: len(nbrs[k]))
        raise ScenarioError(f"protocol.mixing.step: {params.step!r} makes the mixing matrix negative (1 - step * "
                            f"degree < 0 at node {i}, of degree {d_max}); use at most 1 / max degree = {1 / d_max!r}")
    step = params.step
    if step is None:
        lambda_max = laplacian_lambda_max(nbrs)
        step = 1.0 / lambda_max if lambda_max > 0 else 0.0
    entries = {(i, j): step for i, js in enumerate(nbrs) for j in js}
    entries.update({(i, i): max(0.0, 1.0 - step * len(js)) for i, js in enumerate(nbrs)})
    return _matrix(len(nbrs), entries)


def check_stochastic(W: torch.Tensor, doubly: bool, what: str) -> None:
    """One-line ScenarioError naming `what` if W is not square, has a negative or non-finite entry, or a row
    (and, if `doubly`, a column) does not sum to one within TOLERANCE."""
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ScenarioError(f"{what}: a mixing matrix must be square, got shape {tuple(W.shape)}")
    coo = W.detach().to_sparse_coo().coalesce()
    values = coo.values().double()
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ScenarioError(f"{what}: mixing matrix entries must be finite and non-negative")
    for axis, kind in [(0, "row"), (1, "column")][: 1 + doubly]:
        sums = torch.zeros(W.shape[0], dtype=torch.float64, device=values.device)
        sums.index_add_(0, coo.indices()[axis], values)
        error = (sums - 1.0).abs()
        if (error > TOLERANCE).any():
            k = int(error.argmax())
            raise ScenarioError(f"{what}: {kind} {k} of the mixing matrix sums to {float(sums[k])!r}, not 1")


def mixing_matrix(name: str, params: Params | dict[str, Any] | None, graph: nx.Graph,
                  field_path: str = "mixing") -> torch.Tensor:
    """Resolve, build and check the mixing matrix `name` of `graph` (params as a model or raw mapping). Does not
    require a connected graph: a time-varying topology's single graphs need not be (see
    `fedsim.topologies.schedule.Topology.check_connected`)."""
    entry = MIXING.get(name, f"{field_path}.name")
    if not isinstance(params, entry.params):
        params = validate_params(entry.params, dict(params or {}), field_path, f"mixing matrix {name!r}")
    W = entry.obj(params, graph)
    check_stochastic(W, entry.meta["doubly_stochastic"], f"{field_path}.name")
    return W


def drop_nodes(W: torch.Tensor, nodes: Collection[int]) -> torch.Tensor:
    """W (CSR) without the weights on `nodes`' columns, each row re-normalized to sum to 1: the mixing among the
    nodes still there when some have stopped answering (the dropped nodes' own rows are re-normalized too, and go
    unused)."""
    if not nodes:
        return W
    coo = W.to_sparse_coo().coalesce()
    rows, cols = coo.indices()
    keep = ~torch.isin(cols, torch.tensor(sorted(nodes), dtype=cols.dtype))
    values = coo.values()[keep]
    totals = torch.zeros(W.shape[0], dtype=values.dtype).index_add_(0, rows[keep], values)
    scaled = values / totals[rows[keep]]
    return torch.sparse_coo_tensor(torch.stack([rows[keep], cols[keep]]), scaled, W.shape,
                                   check_invariants=True).coalesce().to_sparse_csr()


def mix(W: torch.Tensor, stacked: Pytree) -> Pytree:
    """W @ leaf for every leaf of shape (n, ...), in the leaf's dtype: one sparse product per leaf. Half-precision
    leaves are mixed in float32 (CPU sparse kernels lack them, and it sums more accurately)."""
    n, cast = W.shape[0], {}

    def mix_leaf(key: str, leaf: torch.Tensor) -> torch.Tensor:
        if leaf.ndim == 0 or leaf.shape[0] != n or not leaf.dtype.is_floating_point:
            raise ValueError(f"mix: leaf {key!r} must be floating with a leading node axis of size {n}, "
                             f"got {leaf.dtype} {tuple(leaf.shape)}")
        dtype = leaf.dtype if leaf.dtype in (torch.float32, torch.float64) else torch.float32
        if (dtype, leaf.device) not in cast:
            cast[dtype, leaf.device] = W.to(device=leaf.device, dtype=dtype)
        rows = leaf.reshape(n, math.prod(leaf.shape[1:])).to(dtype)
        return (cast[dtype, leaf.device] @ rows).reshape(leaf.shape).to(leaf.dtype)

    return tree_map_keyed(mix_leaf, stacked)


def consensus_error(stacked: Pytree) -> float:
    """(1/n) sum_i ||x_i - x_bar||^2 over all leaves, in float64: how far the nodes are from agreeing."""
    leaves = list(tree_flatten(stacked).values())
    if not leaves:
        return 0.0
    total = sum(float(((x.double() - x.double().mean(0)) ** 2).sum()) for x in leaves)
    return total / leaves[0].shape[0]
