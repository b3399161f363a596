"""Communication graphs (networkx): entries are `fn(params, num_nodes, seed) -> networkx.Graph | GraphSequence`.

Client/server federated learning runs on the star, server at node 0 and clients 1..N; decentralized protocols run
on the other graphs, over nodes 0..n-1. A graph is undirected, or directed (`networkx.DiGraph`) where an edge j -> i
means i hears from j (the one-peer exponential graphs). `seed` keys every random draw (random graphs, the graph of
each round of a resampled sequence), so a scenario and seed give the same graphs in every runtime and process.
A topology that changes with the round returns a `GraphSequence`; `fedsim.topologies.schedule` serves each round
its graph. Metadata: `client_server` (True: the star of client/server protocols).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
from pydantic import Field

from fedsim.registry import Params, Registry, import_submodules

TOPOLOGIES: Registry = Registry("topology")


class TopologyParams(Params):
    """Parameters every peer-to-peer topology shares."""

    allow_disconnected: bool = Field(False, description="run on a disconnected graph (nodes in different "
                                                        "components never agree) instead of refusing it")


@dataclass(frozen=True)
class GraphSequence:
    """A graph per round: round t communicates over `graph(t % period)`, or over `graph(t)` when `period` is None
    (a fresh draw every round, keyed by t). Every graph has the same nodes."""

    graph: Callable[[int], nx.Graph]
    period: int | None


import_submodules(__name__, __path__)
