"""Node transports: how a gossip protocol reaches the nodes it does not hold.

A gossip protocol holds the rows (models) of the nodes its process owns and mixes each with its graph neighbours'.
The transport tells it which nodes it owns (a contiguous block of node ids, so that on graphs numbered with locality
few edges cross processes), brings it its neighbours' rows from the processes holding them (the halo), and adds up
sums over processes (network averages, evaluation sums). One process owns every node and the halo is empty
(`LocalTransport`); MPI ranks exchange halos with neighbour collectives (`fedsim.runtime.mpi.MPINodeTransport`); a
peer process per node is a block of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import networkx as nx
import torch

from fedsim.params import Pytree, tree_map
from fedsim.topologies.mixing import mix


def block_partition(num_nodes: int, parts: int) -> list[range]:
    """Nodes 0..num_nodes-1 cut into `parts` contiguous blocks whose sizes differ by at most one."""
    if not 1 <= parts <= num_nodes:
        raise ValueError(f"cannot cut {num_nodes} nodes into {parts} non-empty blocks")
    bounds = [p * num_nodes // parts for p in range(parts + 1)]
    return [range(bounds[p], bounds[p + 1]) for p in range(parts)]


@dataclass(frozen=True)
class HaloPlan:
    """One process's side of a graph under a block partition: the processes sharing an edge with it (`peers`,
    ascending), and per peer the owned nodes it sends (`sends`) and the peer's nodes it receives (`receives`),
    each ascending. A node goes to a peer once, however many of the peer's nodes it neighbours."""

    owned: range
    peers: tuple[int, ...]
    sends: tuple[tuple[int, ...], ...]
    receives: tuple[tuple[int, ...], ...]

    @property
    def halo(self) -> list[int]:
        """Every received node, in arrival order (peers ascending, then node ids): ascending node ids."""
        return [node for nodes in self.receives for node in nodes]


def halo_plan(graph: nx.Graph, blocks: list[range], me: int) -> HaloPlan:
    """Process `me`'s halo plan for `graph` (nodes 0..n-1) over `blocks`. On a directed graph an edge j -> i brings
    j's row to i; a process exchanges with every process it sends to or hears from (one direction may be empty).
    Plans of two processes agree: what one sends the other is what the other receives from it."""
    owner = [p for p, block in enumerate(blocks) for _ in block]
    owned = blocks[me]
    hears, tells = (graph.pred, graph.succ) if graph.is_directed() else (graph.adj, graph.adj)
    sends: dict[int, set[int]] = {}
    receives: dict[int, set[int]] = {}
    for i in owned:
        for j in tells[i]:
            if owner[j] != me:
                sends.setdefault(owner[j], set()).add(i)
                receives.setdefault(owner[j], set())
        for j in hears[i]:
            if owner[j] != me:
                receives.setdefault(owner[j], set()).add(j)
                sends.setdefault(owner[j], set())
    peers = tuple(sorted(sends))
    return HaloPlan(owned, peers, tuple(tuple(sorted(sends[p])) for p in peers),
                    tuple(tuple(sorted(receives[p])) for p in peers))


class Neighbourhood(Protocol):
    """A graph connected over the transport: its halo plan and one gossip step along it."""

    plan: HaloPlan

    def gossip(self, rows: Pytree, W: torch.Tensor) -> Pytree:
        """The owned nodes' rows after one gossip step x_i <- sum_j W_ij x_j (W the n x n CSR mixing matrix),
        given their rows now (leaves shaped (len(owned), ...), in owned order). Every process calls it at the
        same point, with the same W."""
        ...

    def release(self) -> None:
        """Free what the connection holds (an MPI communicator) once the protocol moved to another graph."""
        ...


class HaloNeighbourhood:
    """Gossip by exchanging halos: the neighbours' rows come to this process (`exchange`, per transport) and the
    owned rows are mixed here, one sparse product per leaf over [halo below the block, owned block, halo above]."""

    plan: HaloPlan

    def __init__(self, plan: HaloPlan) -> None:
        self.plan = plan
        self.below = sum(j < plan.owned.start for j in plan.halo)
        """Halo nodes numbered below the owned block: the owned rows' offset in the mixed rows."""
        self.mixing: tuple[torch.Tensor, torch.Tensor] | None = None
        """The last W seen and its local rows (`local_mixing`), reused while W stays the same."""

    def exchange(self, rows: Pytree) -> Pytree:
        """Given this process's rows (leaves shaped (len(owned), ...), in owned order), the halo's rows (leaves
        shaped (len(plan.halo), ...), in `plan.halo` order). Every process calls it at the same point."""
        raise NotImplementedError

    def release(self) -> None:
        """Nothing to free (transports holding resources override it)."""

    def gossip(self, rows: Pytree, W: torch.Tensor) -> Pytree:
        return self.mix(rows, self.exchange(rows), W)

    def mix(self, rows: Pytree, halo: Pytree, W: torch.Tensor) -> Pytree:
        """The owned rows after one step x_i <- sum_j W_ij x_j, given theirs and the halo's (`exchange`'s order)."""
        if self.mixing is None or self.mixing[0] is not W:
            self.mixing = W, local_mixing(W, self.plan)
        below, owned = self.below, len(self.plan.owned)
        stacked = tree_map(lambda h, x: torch.cat([h[:below], x, h[below:]]), halo, rows) if self.plan.halo else rows
        return tree_map(lambda v: v[below : below + owned], mix(self.mixing[1], stacked))


class NodeTransport(Protocol):
    """What a gossip protocol needs from the processes it runs on."""

    num_nodes: int
    owned: range
    """The nodes whose rows (and data) this process holds."""
    lost: frozenset[int]
    """Nodes that stopped answering (peer deployments: their halo rows come back as zeros and sums leave them
    out); always empty in one process and under MPI, where a dead rank ends the run."""

    def connect(self, graph: nx.Graph) -> Neighbourhood:
        """Prepare exchanges along `graph` (every process calls it with the same graph, again whenever a
        time-varying topology changes it)."""
        ...

    def sum(self, tree: Pytree) -> Pytree:
        """Leaf-wise sum over processes of a pytree of tensors, in float64 (every process gets the total)."""
        ...


class LocalNeighbourhood(HaloNeighbourhood):
    """One process: no halo."""

    def exchange(self, rows: Pytree) -> Pytree:
        return tree_map(lambda v: v[:0], rows)


class LocalTransport:
    """Every node in this process: the halo is empty and sums are this process's."""

    def __init__(self, num_nodes: int) -> None:
        self.num_nodes = num_nodes
        self.owned = range(num_nodes)
        self.lost: frozenset[int] = frozenset()

    def connect(self, graph: nx.Graph) -> LocalNeighbourhood:
        return LocalNeighbourhood(halo_plan(graph, [self.owned], 0))

    def sum(self, tree: Pytree) -> Pytree:
        return tree_map(lambda v: v.double(), tree)


def local_mixing(W: torch.Tensor, plan: HaloPlan) -> torch.Tensor:
    """The rows of the sparse mixing matrix W (n x n, CSR) for the owned nodes, on this process's rows: a square
    CSR matrix over [halo below the block, owned block, halo above it] (ascending node ids, so each row keeps W's
    order of terms), zero on the halo's rows. A weight on a node outside that set is an error (W off the graph)."""
    lo, hi = plan.owned.start, plan.owned.stop
    below = [j for j in plan.halo if j < lo]
    columns = [*below, *plan.owned, *(j for j in plan.halo if j >= hi)]
    k = len(columns)
    local = torch.full((W.shape[1],), -1, dtype=torch.long)
    local[torch.tensor(columns, dtype=torch.long)] = torch.arange(k)
    crow = W.crow_indices()
    first, last = int(crow[lo]), int(crow[hi])
    mapped = local[W.col_indices()[first:last]]
    if (mapped < 0).any():
        raise ValueError("local_mixing: the mixing matrix has a weight between nodes the graph does not link")
    rows = torch.cat([torch.zeros(len(below), dtype=torch.long), crow[lo : hi + 1] - first,
                      torch.full((k - len(below) - len(plan.owned),), last - first, dtype=torch.long)])
    return torch.sparse_csr_tensor(rows, mapped, W.values()[first:last], (k, k), check_invariants=True)
