"""`PeerTransport`: the node transport (`fedsim.runtime.node_transport.NodeTransport`) of a deployment with one
gossip node per process, over gRPC links (`fedsim.peers.link`): the process owns a block of one node, its halo is
its graph neighbours' rows, and sums over processes (network averages, evaluation) go to every peer and are added
in node order, so every process gets the same totals.

A peer that cannot be reached or sends nothing within the timeout is taken as lost (`lost`): it is not waited for
again, its halo rows come back as zeros (the protocol drops it from the mixing and re-normalizes), and sums leave
it out. A node whose every neighbour is lost has nobody left to gossip with: that ends its run with one line."""

from __future__ import annotations

import networkx as nx
import torch

from fedsim.params import Pytree, tree_map
from fedsim.peers.link import PeerError, PeerNode
from fedsim.peers.wire import decode_payload, encode_payload
from fedsim.runtime.node_transport import HaloNeighbourhood, HaloPlan, halo_plan


class PeerTransport:
    """This process is node `link.node` of `num_nodes`; `link` is connected to every other node."""

    def __init__(self, link: PeerNode, num_nodes: int) -> None:
        self.link, self.num_nodes = link, num_nodes
        self.owned = range(link.node, link.node + 1)
        self.lost: frozenset[int] = frozenset()
        self.exchanges = {"rows": 0, "sum": 0}
        """Exchanges of each kind so far: the round number both ends of a link agree on."""

    def connect(self, graph: nx.Graph) -> PeerNeighbourhood:
        return PeerNeighbourhood(halo_plan(graph, [range(i, i + 1) for i in range(self.num_nodes)], self.link.node),
                                 self)

    def send_and_receive(self, kind: str, tree: Pytree, peers: list[int]) -> dict[int, Pytree]:
        """Exchange `tree` with the peers not lost, as the next exchange of `kind`; peers that fail to take it or
        to send theirs in time join `lost`."""
        count = self.exchanges[kind]
        self.exchanges[kind] += 1
        payload, alive, failed = encode_payload(tree), [p for p in peers if p not in self.lost], set()
        for peer in alive:
            try:
                self.link.deliver(peer, count, kind, payload)
            except PeerError:
                failed.add(peer)
        waiting = [p for p in alive if p not in failed]
        received = self.link.mailbox.collect(count, kind, waiting, self.link.timeout)
        self.lost = self.lost | failed | {p for p in waiting if p not in received}
        return {peer: decode_payload(data) for peer, data in received.items()}

    def sum(self, tree: Pytree) -> Pytree:
        mine = tree_map(lambda v: v.detach().double().cpu(), tree)
        others = [i for i in range(self.num_nodes) if i != self.link.node]
        parts = {self.link.node: mine, **self.send_and_receive("sum", mine, others)}
        nodes = sorted(parts)
        total = parts[nodes[0]]
        for node in nodes[1:]:
            total = tree_map(torch.add, total, parts[node])
        return total


class PeerNeighbourhood(HaloNeighbourhood):
    """The halo of one node: its graph neighbours' rows, one gRPC exchange per call (zeros for lost ones)."""

    def __init__(self, plan: HaloPlan, transport: PeerTransport) -> None:
        super().__init__(plan)
        self.transport = transport

    def exchange(self, rows: Pytree) -> Pytree:
        received = self.transport.send_and_receive("rows", rows, list(self.plan.peers))
        if self.plan.halo and not received:
            link = self.transport.link
            silent = ", ".join(f"peer {p} at {link.peers[p]}" for p in self.plan.halo)
            raise PeerError(f"node {link.node}: no neighbour answers within {link.timeout:g} s ({silent}); nobody is "
                            f"left to gossip with")
        halo = [received.get(node, tree_map(torch.zeros_like, rows)) for node in self.plan.halo]
        if not halo:
            return tree_map(lambda v: v[:0], rows)
        return tree_map(lambda *parts: torch.cat(parts), *halo)
