"""Basic graphs: the star of client/server FL, and the ring and complete graph of decentralized baselines."""

from __future__ import annotations

import networkx as nx

from fedsim.registry import NoParams
from fedsim.topologies import TOPOLOGIES, TopologyParams


@TOPOLOGIES.register("star", params=NoParams, client_server=True)
def star(params: NoParams, num_nodes: int, seed: int) -> nx.Graph:
    """Server at node 0 linked to every client 1..num_nodes (client/server federated learning)."""
    return nx.star_graph(num_nodes)


@TOPOLOGIES.register("ring", params=TopologyParams, client_server=False)
def ring(params: TopologyParams, num_nodes: int, seed: int) -> nx.Graph:
    """Each node linked to its two neighbours on a cycle."""
    return nx.cycle_graph(num_nodes)


@TOPOLOGIES.register("complete", params=TopologyParams, client_server=False)
def complete(params: TopologyParams, num_nodes: int, seed: int) -> nx.Graph:
    """Every pair of nodes linked."""
    return nx.complete_graph(num_nodes)
