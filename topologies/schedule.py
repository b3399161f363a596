"""A scenario's communication graph round by round: static graphs and time-varying sequences behind one interface,
checked for connectivity once, built lazily and cached, so a gossip protocol asks `graph(t)` every round and
re-plans its exchanges only when the graph changes (`index(t)`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import networkx as nx

from fedsim.errors import ScenarioError
from fedsim.seeding import Stream, derive_seed
from fedsim.strict_input import shorten
from fedsim.topologies import GraphSequence

if TYPE_CHECKING:
    from fedsim.scenario import Component

APERIODIC_CHECKED = 8
"""Rounds of a sequence without a period whose union graph must be connected (its first ones)."""


class Topology:
    """The graph of every round of one run."""

    def __init__(self, built: nx.Graph | GraphSequence, num_nodes: int) -> None:
        self.sequence = built if isinstance(built, GraphSequence) else GraphSequence(lambda _: built, 1)
        self.static = not isinstance(built, GraphSequence)
        self.num_nodes = num_nodes
        self._cache: dict[int, nx.Graph] = {}

    @property
    def directed(self) -> bool:
        return self.graph(0).is_directed()

    def index(self, t: int) -> int:
        """Which graph round t uses: rounds with the same index share the graph."""
        period = self.sequence.period
        return t if period is None else t % period

    def graph(self, t: int) -> nx.Graph:
        """Round t's graph (built once per index; a sequence without a period keeps only the latest)."""
        k = self.index(t)
        if k not in self._cache:
            if self.sequence.period is None:
                self._cache.clear()
            graph = self.sequence.graph(k)
            _check_nodes(graph, self.num_nodes)
            self._cache[k] = graph
        return self._cache[k]

    def check_connected(self, what: str) -> None:
        """One-line ScenarioError naming `what` if the graph (for sequences: the union of one period's graphs, or of
        the first APERIODIC_CHECKED rounds' without a period) leaves nodes that can never agree: components of an
        undirected graph, or a directed graph that is not strongly connected."""
        rounds = self.sequence.period or APERIODIC_CHECKED
        union = nx.compose_all([self.graph(t) for t in range(rounds)]) if rounds > 1 else self.graph(0)
        if union.is_directed():
            components = list(nx.strongly_connected_components(union))
            kind = "not strongly connected"
        else:
            components = list(nx.connected_components(union))
            kind = "disconnected"
        if len(components) > 1:
            over = "" if self.static else f" over {rounds} rounds"
            smallest = sorted(min(components, key=len), key=str)
            shown = ", ".join(map(str, smallest[:10])) + (", ..." if len(smallest) > 10 else "")
            raise ScenarioError(f"{what}: the communication graph{over} is {kind} ({len(components)} components; "
                                f"smallest has {len(smallest)} nodes: {shown}); set topology.allow_disconnected: "
                                f"true to run it anyway")


def _check_nodes(graph: nx.Graph, n: int) -> None:
    if set(graph.nodes) != set(range(n)):
        raise ScenarioError(f"topology: the graph must have nodes 0..{n - 1}, got nodes "
                            f"{shorten(sorted(graph.nodes, key=str))}")


def build_topology(component: Component, num_nodes: int, seed: int) -> Topology:
    """The scenario's topology over `num_nodes` nodes, random draws keyed by the scenario's `seed`; refused with one
    line when it is disconnected and the topology does not allow it."""
    topology = Topology(component.entry.obj(component.params, num_nodes, derive_seed(seed, Stream.TOPOLOGY)),
                        num_nodes)
    if not getattr(component.params, "allow_disconnected", False):
        topology.check_connected("topology")
    return topology
