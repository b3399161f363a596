"""`PeerTransport`: the node transport (`fedsim.runtime.node_transport.NodeTransport`) of a deployment with one
gossip node per process, over gRPC links (`fedsim.peers.link`): the process owns a block of one node, its halo is
its graph neighbours' rows, and sums over processes (network averages, evaluation) go to every peer and are added
in node order, so every process gets the same totals."""

from __future__ import annotations

import networkx as nx
import torch

from fedsim.params import Pytree, tree_map
from fedsim.peers.link import PeerNode
from fedsim.runtime.node_transport import HaloPlan, halo_plan


class PeerTransport:
    """This process is node `link.node` of `num_nodes`; `link` is connected to every other node."""

    def __init__(self, link: PeerNode, num_nodes: int) -> None:
        self.link, self.num_nodes = link, num_nodes
        self.owned = range(link.node, link.node + 1)
        self.exchanges = {"rows": 0, "sum": 0}
        """Exchanges of each kind so far: the round number both ends of a link agree on."""
        self.bytes_sent = 0

    def connect(self, graph: nx.Graph) -> PeerNeighbourhood:
        return PeerNeighbourhood(halo_plan(graph, [range(i, i + 1) for i in range(self.num_nodes)], self.link.node),
                                 self)

    def send_and_receive(self, kind: str, tree: Pytree, peers: list[int]) -> dict[int, Pytree]:
        """Exchange `tree` with `peers` as the next exchange of `kind`."""
        count = self.exchanges[kind]
        self.exchanges[kind] += 1
        received, sent = self.link.exchange(count, kind, tree, peers)
        self.bytes_sent += sent
        return received

    def sum(self, tree: Pytree) -> Pytree:
        mine = tree_map(lambda v: v.detach().double().cpu(), tree)
        others = [i for i in range(self.num_nodes) if i != self.link.node]
        parts = {self.link.node: mine, **self.send_and_receive("sum", mine, others)}
        total = parts[0]
        for node in range(1, self.num_nodes):
            total = tree_map(torch.add, total, parts[node])
        return total


class PeerNeighbourhood:
    """The halo of one node: its graph neighbours' rows, one gRPC exchange per call."""

    def __init__(self, plan: HaloPlan, transport: PeerTransport) -> None:
        self.plan, self.transport = plan, transport

    def exchange(self, rows: Pytree) -> Pytree:
        received = self.transport.send_and_receive("rows", rows, list(self.plan.peers))
        halo = [received[node] for node in self.plan.halo]
        if not halo:
            return tree_map(lambda v: v[:0], rows)
        return tree_map(lambda *parts: torch.cat(parts), *halo)
