"""Random walks on a communication graph, vectorized over many independent walkers (tokens, repetitions).

Kernels (`Walk`, `WALKS`): the simple random walk (P_ij = 1/d_i), the Metropolis-Hastings walk to any target mu
(P_ij = (1/d_i) min(1, mu_j d_i / (mu_i d_j)) on edges, the rest on the self-loop), the non-backtracking walk (never
back along the edge it came by, unless the node has degree 1) and the self-repellent random walk (SRRW; Doshi, Hu,
Eun, ICML 2023) over the Metropolis-Hastings chain P to mu:

    K_ij[x] proportional to P_ij (x_j / mu_j)^(-alpha)   over j in N(i) and i itself,

computed in log space (log P_ij - alpha (log x_j - log mu_j), then log-sum-exp), x the walker's empirical measure.
Every walker keeps x: x_0 uniform, x_{n+1} = x_n + gamma_{n+1} (delta_{X_{n+1}} - x_n), gamma_n = (n+1)^(-a) (a = 1:
the ICML paper's running average, x_0 counting as one visit). Graphs are held as CSR neighbour lists, so a step costs
O(sum of the walkers' degrees) plus the measure update, never n x n. Each step takes one uniform per walker, drawn
by the caller (`walk_uniforms`: keyed by seed and step), so a walk is a pure function of its draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from fedsim.errors import ScenarioError
from fedsim.seeding import Stream, numpy_rng

WALKS = ("simple", "mhrw", "non_backtracking", "srrw")
"""Walk kinds: the first and third visit nodes in proportion to their degree, the others follow their target."""
TARGET_TOLERANCE = 1e-6
"""Largest |sum - 1| accepted of a target distribution given as numbers (it is then scaled to sum to one)."""
WALK_KEY = 0x57414C4B
"""Key of the walks' draws within the protocol stream."""


@dataclass(frozen=True)
class Adjacency:
    """An undirected graph's neighbour lists in CSR form: node i's neighbours (itself excluded) are
    `indices[indptr[i]:indptr[i + 1]]`, ascending."""

    indptr: np.ndarray
    indices: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.indptr) - 1

    @property
    def degrees(self) -> np.ndarray:
        return np.diff(self.indptr)

    @classmethod
    def of(cls, graph: nx.Graph, what: str = "topology") -> Adjacency:
        """The neighbour lists of `graph` (nodes 0..n-1, self-loops ignored); a one-line ScenarioError naming `what`
        for a directed graph or one a walk cannot cover (disconnected, or a single node)."""
        n = graph.number_of_nodes()
        if set(graph.nodes) != set(range(n)):
            raise ScenarioError(f"{what}: a random walk needs a graph on nodes 0..{n - 1}")
        if graph.is_directed():
            raise ScenarioError(f"{what}: a random walk needs an undirected graph; this one is directed")
        if n < 2:
            raise ScenarioError(f"{what}: a random walk needs at least two nodes, got {n}")
        components = list(nx.connected_components(graph))
        if len(components) > 1:
            smallest = sorted(min(components, key=len))
            shown = ", ".join(map(str, smallest[:10])) + (", ..." if len(smallest) > 10 else "")
            raise ScenarioError(f"{what}: a random walk needs a connected graph; this one has {len(components)} "
                                f"components (smallest has {len(smallest)} nodes: {shown})")
        edges = np.array([(i, j) for i, j in graph.edges if i != j], dtype=np.int64).reshape(-1, 2)
        keys = np.unique(np.concatenate([edges[:, 0] * n + edges[:, 1], edges[:, 1] * n + edges[:, 0]]))
        rows, cols = keys // n, keys % n
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
        return cls(indptr, cols.astype(np.int64))


@dataclass(frozen=True)
class Chain:
    """A Markov chain on a graph in CSR form, self-loops included where their probability is positive: row i's
    entries are `probs[indptr[i]:indptr[i + 1]]` on nodes `indices[...]`, ascending; each row sums to one."""

    indptr: np.ndarray
    indices: np.ndarray
    probs: np.ndarray

    def dense(self) -> np.ndarray:
        """The n x n transition matrix (for small graphs: tests, `srrw_covariance`)."""
        n = len(self.indptr) - 1
        P = np.zeros((n, n))
        P[np.repeat(np.arange(n), np.diff(self.indptr)), self.indices] = self.probs
        return P


def simple_chain(adjacency: Adjacency) -> Chain:
    """The simple random walk: P_ij = 1/d_i on edges (stationary distribution proportional to degree)."""
    degrees = adjacency.degrees
    return Chain(adjacency.indptr, adjacency.indices, np.repeat(1.0 / degrees, degrees))


def metropolis_hastings_chain(adjacency: Adjacency, mu: np.ndarray) -> Chain:
    """The Metropolis-Hastings walk to `mu` proposing a uniform neighbour: P_ij = min(1/d_i, mu_j / (mu_i d_j)) on
    edges and the rest on the self-loop; reversible with respect to mu."""
    n, degrees = adjacency.num_nodes, adjacency.degrees
    rows, cols = np.repeat(np.arange(n), degrees), adjacency.indices
    moves = np.minimum(1.0 / degrees[rows], mu[cols] / (mu[rows] * degrees[cols]))
    stay = np.array([1.0 - math.fsum(moves[adjacency.indptr[i]:adjacency.indptr[i + 1]]) for i in range(n)])
    loops = np.flatnonzero(stay > 1e-12)
    rows, cols = np.concatenate([rows, loops]), np.concatenate([cols, loops])
    probs = np.concatenate([moves, stay[loops]])
    order = np.lexsort((cols, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
    return Chain(indptr, cols[order], probs[order])


def target_distribution(target: str | Sequence[float], adjacency: Adjacency, field: str = "target") -> np.ndarray:
    """The target mu over the graph's nodes: "uniform", "degree" (proportional to degree) or one positive number per
    node summing to one within TARGET_TOLERANCE (scaled to sum to one exactly); else a ScenarioError naming `field`."""
    n = adjacency.num_nodes
    if isinstance(target, str):
        if target == "uniform":
            return np.full(n, 1.0 / n)
        if target == "degree":
            return adjacency.degrees / adjacency.degrees.sum()
        raise ScenarioError(f"{field}: unknown target {target!r}; allowed: uniform, degree, or one number per node")
    mu = np.asarray(target, dtype=np.float64)
    if mu.shape != (n,):
        raise ScenarioError(f"{field}: needs one number per node ({n}), got {mu.size}")
    bad = np.flatnonzero(~(np.isfinite(mu) & (mu > 0)))
    if bad.size:
        k = int(bad[0])
        raise ScenarioError(f"{field}: every node needs a positive finite probability; node {k} has {float(mu[k])!r}")
    total = math.fsum(mu)
    if abs(total - 1.0) > TARGET_TOLERANCE:
        raise ScenarioError(f"{field}: the probabilities sum to {total!r}, not 1")
    return mu / total


def step_size(n: int, exponent: float, scale: float = 1.0) -> float:
    """The n-th step size of a Robbins-Monro sequence, scale * (n + 1)^(-exponent) (gamma_n, beta_n)."""
    return scale * (n + 1.0) ** -exponent


def walk_uniforms(seed: int, step: int, count: int) -> np.ndarray:
    """The `count` uniforms in [0, 1) that drive step `step` of `count` walkers (step 0: their start), keyed by
    (seed, step): the same walk in every runtime and process, and after a resume."""
    return numpy_rng(seed, Stream.PROTOCOL, WALK_KEY, step).random(count)


def nodes_from(mu: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """A node drawn from `mu` per uniform (inverse CDF): walkers' starting nodes."""
    return np.minimum(np.searchsorted(np.cumsum(mu), uniforms, side="right"), len(mu) - 1).astype(np.int64)


def total_variation(measure: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """(1/2) sum_i |x_i - mu_i| per walker (rows of `measure`)."""
    return 0.5 * np.abs(measure - mu).sum(axis=-1)


@dataclass
class WalkState:
    """Walkers' state: where each is, where it came from (-1 before its first move), its empirical measure x (one
    row per walker) and the steps taken (the same for all). `Walk.advance` updates it in place."""

    position: np.ndarray
    previous: np.ndarray
    measure: np.ndarray
    steps: int


class Walk:
    """One walk kernel on one graph, stepping any number of independent walkers at once."""

    def __init__(self, kind: str, adjacency: Adjacency, target: str | Sequence[float] | None = None,
                 alpha: float = 0.0, a: float = 1.0, where: str = "") -> None:
        """`target`: the walk's own by default (degree for simple and non_backtracking, else uniform); `alpha`
        (srrw only) >= 0; `a` in (0.5, 1] the exponent of gamma_n. Errors name the field, prefixed by `where`."""
        if kind not in WALKS:
            raise ScenarioError(f"{where}walk: unknown walk {kind!r}; allowed: {', '.join(WALKS)}")
        if not alpha >= 0 or not math.isfinite(alpha):
            raise ScenarioError(f"{where}alpha: the self-repellence must be finite and at least 0, got {alpha!r}")
        if alpha and kind != "srrw":
            raise ScenarioError(f"{where}alpha: only the srrw walk is self-repellent; set walk: srrw or leave alpha "
                                f"out")
        if not 0.5 < a <= 1:
            raise ScenarioError(f"{where}a: the measure's step-size exponent must lie in (0.5, 1], got {a!r}")
        degree_walk = kind in ("simple", "non_backtracking")
        default = "degree" if degree_walk else "uniform"
        self.mu = target_distribution(default if target is None else target, adjacency, f"{where}target")
        if degree_walk and not np.allclose(self.mu, adjacency.degrees / adjacency.degrees.sum(), rtol=1e-9,
                                           atol=0):
            raise ScenarioError(f"{where}target: a {kind} walk visits nodes in proportion to their degree; for "
                                f"another target use walk mhrw or srrw")
        self.kind, self.adjacency, self.alpha, self.a = kind, adjacency, float(alpha), float(a)
        self.chain = simple_chain(adjacency) if degree_walk else metropolis_hastings_chain(adjacency, self.mu)
        self.log_probs = np.log(self.chain.probs)
        self.log_mu = np.log(self.mu)
        n = adjacency.num_nodes
        self.edge_keys = np.repeat(np.arange(n), adjacency.degrees) * n + adjacency.indices
        """Row-major keys i * n + j of the adjacency's entries, ascending: where j sits in i's list."""

    @property
    def num_nodes(self) -> int:
        return self.adjacency.num_nodes

    def start(self, positions: np.ndarray) -> WalkState:
        """Walkers at `positions`, before their first move, each with the uniform measure."""
        positions = np.asarray(positions, dtype=np.int64)
        return WalkState(positions.copy(), np.full_like(positions, -1),
                         np.full((len(positions), self.num_nodes), 1.0 / self.num_nodes), 0)

    def advance(self, state: WalkState, uniforms: np.ndarray) -> None:
        """One step of every walker (uniforms: one per walker), then each measure's update with gamma_{n+1}."""
        here = state.position
        if self.kind == "non_backtracking":
            there = self._non_backtracking(here, state.previous, uniforms)
        else:
            there = self._from_chain(here, state.measure, uniforms)
        state.steps += 1
        gamma = step_size(state.steps, self.a)
        state.measure *= 1.0 - gamma
        state.measure[np.arange(len(there)), there] += gamma
        state.previous, state.position = here, there

    def _from_chain(self, here: np.ndarray, measure: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """Next nodes by inverse CDF over each walker's row of P (SRRW: of K[x]), all rows in one flat array."""
        chain = self.chain
        first, lengths = chain.indptr[here], np.diff(chain.indptr)[here]
        offsets = np.cumsum(lengths) - lengths
        owner = np.repeat(np.arange(len(here)), lengths)
        entries = np.arange(lengths.sum()) - offsets[owner] + first[owner]
        nodes = chain.indices[entries]
        if self.alpha == 0.0:
            weights = chain.probs[entries]
        else:
            logits = self.log_probs[entries] - self.alpha * (np.log(measure[owner, nodes]) - self.log_mu[nodes])
            weights = np.exp(logits - np.maximum.reduceat(logits, offsets)[owner])
        cumulative = np.cumsum(weights)
        before = np.concatenate([[0.0], cumulative])[offsets]
        total = cumulative[offsets + lengths - 1] - before
        picked = np.searchsorted(cumulative, before + uniforms * total, side="right")
        return nodes[np.clip(picked, offsets, offsets + lengths - 1)]

    def _non_backtracking(self, here: np.ndarray, previous: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """A uniform neighbour other than the one each walker came from (any neighbour on the first move or at a
        node of degree 1)."""
        adjacency = self.adjacency
        degrees = adjacency.degrees[here]
        free = (previous < 0) | (degrees == 1)
        choices = np.where(free, degrees, degrees - 1)
        k = np.minimum((uniforms * choices).astype(np.int64), choices - 1)
        back = np.searchsorted(self.edge_keys, here * self.num_nodes + previous) - adjacency.indptr[here]
        k += ~free & (k >= back)
        return adjacency.indices[adjacency.indptr[here] + k]


def srrw_covariance(P: np.ndarray, mu: np.ndarray, alpha: float) -> np.ndarray:
    """V(alpha), the limit covariance of sqrt(n) (x_n - mu) of an SRRW over a chain P reversible with respect to
    mu (gamma_n = 1/(n+1)): sum over P's non-unit eigenvalues lambda_i of (1 + lambda_i) / (1 - lambda_i) /
    (2 alpha (1 + lambda_i) + 1) u_i u_i^T, u_i the left eigenvectors D_mu^(1/2) v_i, v_i orthonormal eigenvectors of
    D_mu^(1/2) P D_mu^(-1/2) (Doshi et al. 2023; alpha = 0: the base chain's covariance)."""
    root = np.sqrt(mu)
    symmetric = root[:, None] * P / root[None, :]
    eigenvalues, vectors = np.linalg.eigh((symmetric + symmetric.T) / 2)
    keep = np.arange(len(mu)) != np.argmax(eigenvalues)
    lam, u = eigenvalues[keep], root[:, None] * vectors[:, keep]
    weights = (1 + lam) / (1 - lam) / (2 * alpha * (1 + lam) + 1)
    return (u * weights) @ u.T
