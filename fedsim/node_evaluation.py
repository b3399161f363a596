"""Per-node figures of decentralized protocols, where every node keeps its own model: each node's model scored on
its own test split (the DFedSAM family's "personal" accuracy; the network average is what the row's accuracy
scores), reported as the distribution over nodes (mean, worst 10%, pooled, histogram) like personal models are,
and, on tasks with a known optimum, the nodes' mean squared distance to it, (1/n) sum_i ||x_i - x*||^2.

Node models come stacked (leading node axis, the rows a process owns); per-node figures are laid out on one vector
over all nodes, so processes fill their own entries and the transport's sum assembles them.
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import numpy as np
import torch

from fedsim.evaluation import Evaluator, Sums, split_sums
from fedsim.node_store import StackedStore
from fedsim.params import Pytree, tree_unstack
from fedsim.personal import personal_figures
from fedsim.recording import JobLog
from fedsim.runtime.node_transport import NodeTransport


class NodeEvaluator:
    """Scores stacked node models; `per_node` keeps the last evaluation's `shown` figure (accuracy, or test loss for
    tasks without accuracy) of every node, for the topology picture."""

    def __init__(self, evaluator: Evaluator, num_nodes: int) -> None:
        self.objective, self.data, self.optimum = evaluator.objective, evaluator.data, evaluator.optimum
        self.metrics = evaluator.metrics
        self.num_nodes = num_nodes
        self.shown = "accuracy" if "accuracy" in self.metrics else "test_loss"
        self.per_node: np.ndarray | None = None

    def __call__(self, stacked: Pytree, owned: range, total: Callable[[Sums], Sums]) -> dict[str, float | list[int]]:
        """The row's node figures for the owned nodes' `stacked` models; `total` sums a dict of tensors over
        processes."""
        n = self.num_nodes
        names = [*self.metrics, "loss"]
        sums = {f"{m}_{part}": torch.zeros(n, dtype=torch.float64) for m in names for part in ("sum", "count")}
        scored = torch.zeros(n, dtype=torch.float64)
        squared = torch.zeros((), dtype=torch.float64)
        for node, params in zip(owned, tree_unstack(stacked, len(owned)), strict=True):
            with torch.no_grad():
                test = split_sums(self.objective, params, *self.data.client_test(node))
            scored[node] = 1.0
            for m in names:
                sums[f"{m}_sum"][node], sums[f"{m}_count"][node] = test[m], test["count"]
            if self.optimum is not None:
                flat = torch.cat([v.reshape(-1).double() for v in params.values()])
                squared = squared + ((flat - self.optimum) ** 2).sum()
        totals = total({"scored": scored, "squared": squared, **sums})
        shown = "loss" if self.shown == "test_loss" else self.shown
        self.per_node = (totals[f"{shown}_sum"] / totals[f"{shown}_count"].clamp_min(1)).numpy()
        figures = personal_figures(totals, self.metrics, prefix="node")
        figures.pop("node_clients", None)
        if self.optimum is not None:
            figures["node_squared_distance_to_optimum"] = float(totals["squared"]) / n
        return figures

    def report(self, stacked: Pytree, center: Pytree, transport: NodeTransport, alive: int, graph: nx.Graph,
               timeline: JobLog) -> dict[str, float | list[int]]:
        """A gossip row's node figures: the consensus error (1/n) sum_i ||x_i - x_bar||^2 over the `alive` nodes
        (x_bar = `center`, the network average) and this evaluator's figures of the owned nodes' `stacked` models;
        the per-node figure goes on `timeline`'s node map with `graph`'s edges."""
        deviation = transport.sum({"d": StackedStore(stacked).squared_deviation(center)})["d"]
        figures = self(stacked, transport.owned, transport.sum)
        timeline.map_nodes(np.array(list(graph.edges), dtype=np.int64), **{self.shown: self.per_node})
        return {"consensus_error": float(deviation) / alive, **figures}
