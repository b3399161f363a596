"""Gossip relayed through a Flower ServerApp, for devices that only speak Flower (Flower delivers messages between
the ServerApp and nodes, never from node to node).

Node K (the SuperNode whose `partition-id` is K) holds gossip node K's model in its `context.state`: its local
steps start from that model (jobs carry no start) and add the change they made; a gossip step sends node K exactly
its graph neighbours' models and its row of the mixing matrix, and node K mixes them with its own model. The
ServerApp runs the gossip protocol unchanged (the order of local steps and mixing, the clock, evaluation of the
network average) over a mirror of every node's model, kept equal to the nodes' by taking each node's mixed model
from its reply. A node that stops answering ends the run: its model lives only on that node.
"""

from __future__ import annotations

import networkx as nx
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fedsim.flower.client import MIX, ROW, neighbour_key
from fedsim.flower.records import get_tree, put_tree
from fedsim.flower.runtime import FlowerError, FlowerRuntime
from fedsim.params import Pytree, tree_map, tree_unstack
from fedsim.runtime.node_transport import HaloPlan, halo_plan


class RelayNeighbourhood:
    """One graph's gossip steps, each node mixing on its own SuperNode."""

    def __init__(self, plan: HaloPlan, runtime: FlowerRuntime) -> None:
        self.plan, self.runtime = plan, runtime

    def release(self) -> None:
        """Nothing held: each step names its neighbours in its messages."""

    def gossip(self, rows: Pytree, W: torch.Tensor) -> Pytree:
        runtime = self.runtime
        if not runtime.nodes:
            runtime.nodes = runtime.discover()
        crow, columns, weights = W.crow_indices().tolist(), W.col_indices().tolist(), W.values().tolist()
        models = tree_unstack(rows, len(self.plan.owned))
        messages = []
        for i in self.plan.owned:
            row = slice(crow[i], crow[i + 1])
            content = RecordDict({MIX: ConfigRecord({"node": i, "columns": columns[row], "weights": weights[row]})})
            for j in columns[row]:
                if j != i:
                    put_tree(content, neighbour_key(j), models[j])
            messages.append(Message(content, runtime.nodes[i], f"train.{MIX}", group_id=f"mix.{i}"))
        mixed: dict[int, Pytree] = {}
        for _, content in runtime.answers(messages):
            mixed[int(content.config_records[MIX]["node"])] = get_tree(content, ROW)
        missing = [i for i in self.plan.owned if i not in mixed]
        if missing:
            raise FlowerError(f"nodes: gossip node(s) {missing} (Flower node(s) "
                              f"{[runtime.nodes[i] for i in missing]}) did not answer a gossip step within "
                              f"{runtime.timeout:g} s; a relayed gossip run cannot go on without them")
        return tree_map(lambda *leaves: torch.stack(leaves), *(mixed[i] for i in self.plan.owned))


class RelayTransport:
    """The node transport of a ServerApp relaying gossip: it drives every node (owns all rows, as their mirror),
    sums are its own, and gossip steps go to the nodes through the FlowerRuntime's grid."""

    def __init__(self, num_nodes: int) -> None:
        self.num_nodes = num_nodes
        self.runtime: FlowerRuntime | None = None
        """The ServerApp's runtime, set once it is built (it needs the simulation this transport is part of)."""
        self.owned = range(num_nodes)
        self.lost: frozenset[int] = frozenset()

    def connect(self, graph: nx.Graph) -> RelayNeighbourhood:
        assert self.runtime is not None, "run_on_grid sets the runtime before the protocol connects"
        return RelayNeighbourhood(halo_plan(graph, [self.owned], 0), self.runtime)

    def sum(self, tree: Pytree) -> Pytree:
        return tree_map(lambda v: v.double(), tree)
