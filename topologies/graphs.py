"""The peer-to-peer topology zoo: fixed graphs (path, peer star, grid, torus, barbell, exponential), random graphs
(Erdős–Rényi, random geometric, Watts–Strogatz, power-law cluster) and graphs that change with the round
(one-peer exponential, random k in-neighbours, DADAO's random geometric sequence, a sequence of named topologies).

Nodes are 0..n-1. Random graphs are networkx's generators (or numpy draws) seeded from the topology's `seed` (and
the graph's index in a sequence), so a seed gives the same graphs in every process. Directed graphs follow the
package's orientation: an edge j -> i means i hears j. Mistakes that depend on the number of nodes (a k too large,
a grid that does not fit) are one ScenarioError line naming the field, raised when the topology is built (at
validation, for protocols that build it then).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import networkx as nx
import numpy as np
from pydantic import Field

from fedsim.errors import ScenarioError
from fedsim.seeding import Stream, derive_seed
from fedsim.strict_input import shorten
from fedsim.topologies import TOPOLOGIES, GraphSequence, TopologyParams

PREFIX = "topology"
"""The scenario field every topology's settings live under (errors name `topology.<field>`)."""
MAX_PERIOD = 10_000
"""Most graphs in one period of a sequence: connectivity is checked over a whole period, graph by graph."""


def _graph(num_nodes: int, edges: Iterable[tuple[int, int]], directed: bool = False) -> nx.Graph:
    """A graph on nodes 0..num_nodes-1 (isolated ones too) with `edges`, self-loops left out."""
    graph = nx.DiGraph() if directed else nx.Graph()
    graph.add_nodes_from(range(num_nodes))
    graph.add_edges_from((i, j) for i, j in edges if i != j)
    return graph


def _nx_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed for a networkx generator (those built on numpy's RandomState take no larger one), keyed by the
    topology's `seed` and `keys`."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def _below_nodes(field: str, value: int, num_nodes: int) -> None:
    """One line naming `topology.<field>` unless value < num_nodes."""
    if value >= num_nodes:
        raise ScenarioError(f"{PREFIX}.{field}: must be less than the number of nodes (num_clients: {num_nodes}), "
                            f"got {shorten(value)}")


@TOPOLOGIES.register("path", params=TopologyParams, client_server=False)
def path(params: TopologyParams, num_nodes: int, seed: int) -> nx.Graph:
    """Node i linked to i + 1: a ring with one link cut (the slowest-mixing connected graph)."""
    return nx.path_graph(num_nodes)


@TOPOLOGIES.register("peer_star", params=TopologyParams, client_server=False)
def peer_star(params: TopologyParams, num_nodes: int, seed: int) -> nx.Graph:
    """Node 0 linked to every other node, among peers (the `star` topology is client/server FL's)."""
    return _graph(num_nodes, ((0, i) for i in range(1, num_nodes)))


class GridParams(TopologyParams):
    """A rows x cols layout of the nodes; either or both may be left out."""

    rows: int | None = Field(None, ge=1, description="rows of the grid (default: the most square factorization "
                                                     "of the number of nodes, rows <= cols)")
    cols: int | None = Field(None, ge=1, description="columns of the grid (default: number of nodes / rows)")


def grid_shape(params: GridParams, num_nodes: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols = num_nodes: as given, the missing one filled in, or the most square
    factorization (rows the largest divisor <= sqrt(n))."""
    rows, cols = params.rows, params.cols
    nodes = f"the {num_nodes} nodes (num_clients)"
    if rows is None and cols is None:
        rows = max(d for d in range(1, math.isqrt(num_nodes) + 1) if num_nodes % d == 0)
    if rows is not None and cols is None:
        if num_nodes % rows:
            raise ScenarioError(f"{PREFIX}.rows: {shorten(rows)} rows do not divide {nodes}")
        cols = num_nodes // rows
    if rows is None:
        if num_nodes % cols:
            raise ScenarioError(f"{PREFIX}.cols: {shorten(cols)} columns do not divide {nodes}")
        rows = num_nodes // cols
    if rows * cols != num_nodes:
        raise ScenarioError(f"{PREFIX}.rows: rows x cols = {shorten(rows)} x {shorten(cols)} = "
                            f"{shorten(rows * cols)}, not {nodes}")
    return rows, cols


def _lattice(params: GridParams, num_nodes: int, periodic: bool) -> nx.Graph:
    """The 2-D lattice, node (r, c) numbered r * cols + c (row by row)."""
    rows, cols = grid_shape(params, num_nodes)
    lattice = nx.grid_2d_graph(rows, cols, periodic=periodic)
    return _graph(num_nodes, ((r * cols + c, s * cols + d) for (r, c), (s, d) in lattice.edges))


@TOPOLOGIES.register("grid", params=GridParams, client_server=False)
def grid(params: GridParams, num_nodes: int, seed: int) -> nx.Graph:
    """A 2-D grid: node r * cols + c linked to its neighbours up, down, left and right (no wrap-around)."""
    return _lattice(params, num_nodes, periodic=False)


@TOPOLOGIES.register("torus", params=GridParams, client_server=False)
def torus(params: GridParams, num_nodes: int, seed: int) -> nx.Graph:
    """A 2-D grid whose rows and columns wrap around (every node of degree 4 when rows, cols >= 3)."""
    return _lattice(params, num_nodes, periodic=True)


class BarbellParams(TopologyParams):
    """How many nodes the path between the two cliques has."""

    path_nodes: int = Field(0, ge=0, description="nodes on the path joining the two cliques (0: the cliques are "
                                                 "joined by one edge); the rest split into two cliques")


@TOPOLOGIES.register("barbell", params=BarbellParams, client_server=False)
def barbell(params: BarbellParams, num_nodes: int, seed: int) -> nx.Graph:
    """Two cliques joined by a path of `path_nodes` nodes: a bottleneck that mixes slowly.
    Clique 0..a-1, path a..a+p-1, clique a+p..n-1, a = ceil((n-p)/2) (networkx's barbell_graph when n-p is even)."""
    bells = num_nodes - params.path_nodes
    if bells < 4:
        raise ScenarioError(f"{PREFIX}.path_nodes: {shorten(params.path_nodes)} path nodes leave {shorten(bells)} "
                            f"of the {num_nodes} nodes (num_clients) for the two cliques, which need at least 2 each")
    a = (bells + 1) // 2
    first, chain, second = range(a), range(a, a + params.path_nodes), range(a + params.path_nodes, num_nodes)
    links = [first[-1], *chain, second[0]]
    edges = [*_clique(first), *zip(links, links[1:], strict=False), *_clique(second)]
    return _graph(num_nodes, edges)


def _clique(nodes: range) -> list[tuple[int, int]]:
    return [(i, j) for i in nodes for j in nodes if i < j]


def _powers_of_two(num_nodes: int) -> list[int]:
    """1, 2, 4, ... below num_nodes: the offsets of the exponential graphs (ceil(log2 n) of them)."""
    return [1 << k for k in range(max(num_nodes - 1, 0).bit_length())]


def _hears_ahead(num_nodes: int, offsets: Iterable[int]) -> nx.DiGraph:
    """The directed graph where node i hears (i + o) mod n for every offset o."""
    return _graph(num_nodes, (((i + o) % num_nodes, i) for o in offsets for i in range(num_nodes)), directed=True)


@TOPOLOGIES.register("exponential", params=TopologyParams, client_server=False)
def exponential(params: TopologyParams, num_nodes: int, seed: int) -> nx.DiGraph:
    """Static exponential graph (Ying et al., NeurIPS 2021): node i hears (i + 2^k) mod n for every 2^k < n.
    ceil(log2 n) peers each, in- and out-regular, so uniform_neighbour weights are doubly stochastic."""
    # Orientation: i hears i + 2^k here and in the one-peer sequence below (one period's union is this graph).
    # BlueFog, the paper's library (`topology_util.PowerTwoRingGraph`, `GetDynamicSendRecvRanks`), has i send to
    # i + 2^k, i.e. hear i - 2^k: the mirror image under i -> -i mod n, with the same spectrum and exact averaging.
    return _hears_ahead(num_nodes, _powers_of_two(num_nodes))


@TOPOLOGIES.register("one_peer_exponential", params=TopologyParams, client_server=False)
def one_peer_exponential(params: TopologyParams, num_nodes: int, seed: int) -> GraphSequence:
    """One-peer exponential graphs (Ying et al. 2021): round t, node i hears (i + 2^(t mod tau)) mod n.
    tau = ceil(log2 n) is the period; with n a power of two, tau rounds of 1/2 weights average all nodes exactly."""
    offsets = _powers_of_two(num_nodes)
    if not offsets:
        return GraphSequence(lambda _: _graph(num_nodes, (), directed=True), 1)
    return GraphSequence(lambda k: _hears_ahead(num_nodes, [offsets[k]]), len(offsets))


class ErdosRenyiParams(TopologyParams):
    """G(n, p)."""

    p: float = Field(ge=0, le=1, description="probability of each edge, independently")


@TOPOLOGIES.register("erdos_renyi", params=ErdosRenyiParams, client_server=False)
def erdos_renyi(params: ErdosRenyiParams, num_nodes: int, seed: int) -> nx.Graph:
    """Erdős–Rényi G(n, p): every pair linked independently with probability p (connected whp for p > ln n / n)."""
    return nx.fast_gnp_random_graph(num_nodes, params.p, seed=_nx_seed(seed))


class RandomGeometricParams(TopologyParams):
    """Nodes uniform in the unit square, linked within a radius."""

    radius: float = Field(gt=0, description="nodes at most this far apart (Euclidean, unit square) are linked; "
                                            "connected whp above sqrt(ln n / (pi n))")
    connect: bool = Field(False, description="link consecutive connected components by one edge between random "
                                             "nodes until the graph is connected (as DADAO's code does)")


def geometric(num_nodes: int, radius: float, rng: np.random.Generator, connect: bool) -> nx.Graph:
    """A random geometric graph (positions uniform in the unit square drawn from `rng`, kept as node attribute
    `pos`); with `connect`, consecutive components (ordered by smallest node) joined by one edge between uniformly
    drawn nodes of each (DADAO, `data.py: create_random_connected_geometric_graph`)."""
    positions = rng.random((num_nodes, 2))
    graph = nx.random_geometric_graph(num_nodes, radius, pos={i: tuple(p) for i, p in enumerate(positions)})
    if connect:
        parts = [sorted(c) for c in sorted(nx.connected_components(graph), key=min)]
        graph.add_edges_from((int(rng.choice(a)), int(rng.choice(b))) for a, b in zip(parts, parts[1:],
                                                                                       strict=False))
    return graph


@TOPOLOGIES.register("random_geometric", params=RandomGeometricParams, client_server=False)
def random_geometric(params: RandomGeometricParams, num_nodes: int, seed: int) -> nx.Graph:
    """Nodes placed uniformly in the unit square, keyed by the seed, linked when within `radius`."""
    return geometric(num_nodes, params.radius, np.random.default_rng([seed]), params.connect)


class GeometricSequenceParams(TopologyParams):
    """DADAO's time-varying graphs."""

    radius: float = Field(gt=0, description="radius of every random geometric graph (DADAO: 0.4; its notebook "
                                            "0.15)")
    count: int = Field(50, ge=1, le=MAX_PERIOD, description="how many graphs; round t uses graph t mod count "
                                                            "(DADAO: 50)")


@TOPOLOGIES.register("geometric_sequence", params=GeometricSequenceParams, client_server=False)
def geometric_sequence(params: GeometricSequenceParams, num_nodes: int, seed: int) -> GraphSequence:
    """DADAO's time-varying graphs: `count` random geometric graphs, each made connected, in turn.
    Nabli & Oyallon 2023: consecutive components linked by an edge between random nodes; drawn keyed by (seed,
    graph index); round t uses graph t mod count."""
    return GraphSequence(lambda k: geometric(num_nodes, params.radius, np.random.default_rng([seed, k]), True),
                         params.count)


class WattsStrogatzParams(TopologyParams):
    """A ring lattice with rewired edges."""

    k: int = Field(4, ge=2, description="each node linked to its k nearest ring neighbours (k/2 per side; even)")
    p: float = Field(0.1, ge=0, le=1, description="probability of rewiring each lattice edge")


@TOPOLOGIES.register("watts_strogatz", params=WattsStrogatzParams, client_server=False)
def watts_strogatz(params: WattsStrogatzParams, num_nodes: int, seed: int) -> nx.Graph:
    """Watts–Strogatz small world: a ring lattice of degree k, each edge rewired with probability p."""
    if params.k % 2:
        raise ScenarioError(f"{PREFIX}.k: {shorten(params.k)} is odd; each node links to k/2 ring neighbours on each "
                            f"side, so k must be even")
    _below_nodes("k", params.k, num_nodes)
    return nx.watts_strogatz_graph(num_nodes, params.k, params.p, seed=_nx_seed(seed))


class PowerlawClusterParams(TopologyParams):
    """Holme–Kim growth."""

    m: int = Field(2, ge=1, description="edges from each new node to existing ones")
    p: float = Field(0.1, ge=0, le=1, description="probability of closing a triangle after each edge")


@TOPOLOGIES.register("powerlaw_cluster", params=PowerlawClusterParams, client_server=False)
def powerlaw_cluster(params: PowerlawClusterParams, num_nodes: int, seed: int) -> nx.Graph:
    """Holme–Kim power-law cluster graph: preferential attachment that closes triangles (always connected).
    m edges per new node, each followed by a triangle-closing edge with probability p: heavy-tailed degrees, high
    clustering."""
    _below_nodes("m", params.m, num_nodes)
    return nx.powerlaw_cluster_graph(num_nodes, params.m, params.p, seed=_nx_seed(seed))


class RandomKParams(TopologyParams):
    """How many peers each node hears per round."""

    k: int = Field(1, ge=1, description="peers each node hears per round, drawn afresh every round")


def random_in_neighbours(num_nodes: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n, k): row i holds k distinct nodes other than i, a uniformly random k-subset (Floyd's sampling algorithm,
    vectorized over the nodes: k draws of n numbers, no n x n array)."""
    chosen = np.empty((num_nodes, k), dtype=np.int64)
    for c, top in enumerate(range(num_nodes - 1 - k, num_nodes - 1)):
        draw = rng.integers(0, top + 1, size=num_nodes)
        taken = (chosen[:, :c] == draw[:, None]).any(axis=1)
        chosen[:, c] = np.where(taken, top, draw)
    return chosen + (chosen >= np.arange(num_nodes)[:, None])


@TOPOLOGIES.register("random_k", params=RandomKParams, client_server=False)
def random_k(params: RandomKParams, num_nodes: int, seed: int) -> GraphSequence:
    """Every round, each node hears k other nodes drawn uniformly afresh (DisPFL's `random` topology).
    Drawn without replacement, keyed by (seed, round), as DFedSAM's code family does: directed, no period."""
    _below_nodes("k", params.k, num_nodes)

    def draw(t: int) -> nx.DiGraph:
        heard = random_in_neighbours(num_nodes, params.k, np.random.default_rng([seed, t]))
        return _graph(num_nodes, ((int(j), i) for i, row in enumerate(heard) for j in row), directed=True)

    return GraphSequence(draw, None)


class SequenceParams(TopologyParams):
    """A time-varying sequence of named topologies."""

    graphs: list[dict[str, Any]] = Field(min_length=1, description="topologies in turn, each {name: ..., "
                                                                   "**params} (peer-to-peer, not a sequence)")
    rounds_each: int = Field(1, ge=1, description="rounds each topology lasts before the next one")


def _part(spec: dict[str, Any], index: int, num_nodes: int, seed: int) -> GraphSequence:
    """The sequence's `index`-th topology, built with its own seed; its mistakes name `topology.graphs[index]`."""
    where = f"{PREFIX}.graphs[{index}]"
    entry, params = TOPOLOGIES.resolve(spec, where)
    if entry.meta.get("client_server") or entry.name == "sequence":
        what = "the client/server star (peer_star is the star among peers)" if entry.meta.get("client_server") \
            else "a sequence itself; list its graphs here instead"
        raise ScenarioError(f"{where}.name: {entry.name!r} is {what}")
    if "allow_disconnected" in spec:
        raise ScenarioError(f"{where}.allow_disconnected: set {PREFIX}.allow_disconnected on the sequence, whose "
                            f"graphs are checked for connectivity together")
    try:
        built = entry.obj(params, num_nodes, derive_seed(seed, Stream.TOPOLOGY, index))
    except ScenarioError as exc:
        message = str(exc)
        raise ScenarioError(where + message.removeprefix(PREFIX) if message.startswith(PREFIX) else message) \
            from None
    return built if isinstance(built, GraphSequence) else GraphSequence(lambda _: built, 1)


@TOPOLOGIES.register("sequence", params=SequenceParams, client_server=False)
def sequence(params: SequenceParams, num_nodes: int, seed: int) -> GraphSequence:
    """The listed topologies in turn, `rounds_each` rounds each, cycling.
    A part that changes with the round keeps its own schedule (round t uses its graph t). Periodic when every part
    is (the lcm of the cycle and the parts' periods), else a fresh graph per round."""
    parts = [_part(spec, i, num_nodes, seed) for i, spec in enumerate(params.graphs)]
    directed = [part.graph(0).is_directed() for part in parts]
    if len(set(directed)) > 1:
        odd = directed.index(not directed[0])
        raise ScenarioError(f"{PREFIX}.graphs[{odd}].name: {params.graphs[odd]['name']!r} is "
                            f"{'' if directed[odd] else 'un'}directed and {params.graphs[0]['name']!r} is not; a "
                            f"sequence's graphs must all be directed or all undirected")
    cycle = len(parts) * params.rounds_each
    periods = [part.period for part in parts]
    period = None if None in periods else math.lcm(cycle, *periods)
    if period is not None and period > MAX_PERIOD:
        field = "rounds_each" if cycle > MAX_PERIOD else "graphs"
        raise ScenarioError(f"{PREFIX}.{field}: the sequence repeats every {shorten(period)} rounds (the least "
                            f"common multiple of its {shorten(cycle)} rounds per cycle and its graphs' periods); at "
                            f"most {MAX_PERIOD}")

    def graph(t: int) -> nx.Graph:
        part = parts[t % cycle // params.rounds_each]
        return part.graph(t if part.period is None else t % part.period)

    return GraphSequence(graph, period)
