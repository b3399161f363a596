"""MPI: `mpiexec -n R fedsim run scenario.yaml` shards the clients (or gossip nodes) over R ranks.

Rank 0 builds the data and sends each rank its clients' share (`distribute_data`); every rank builds the rest of
the same simulation and follows the same protocol and clock (all draws are seeded, so they agree).

Client/server protocols: client k belongs to rank k mod R, which runs that client's jobs with the scenario's own
runtime (vectorized or sequential) and keeps its state. Per round the ranks exchange each job's small bookkeeping
(sizes, work, bytes) with `allgather`, and the weighted sum of messages and the evaluation sums with `Allreduce`.

Gossip (peer-to-peer) protocols: rank r owns a contiguous block of nodes (`node_transport.block_partition`), holds
only their rows and data, and runs only their jobs; `MPINodeTransport` sends neighbours' rows across ranks with
`Neighbor_alltoallv` on a distributed graph communicator over the ranks whose blocks share an edge, and adds sums
up with `Allreduce`.

Nothing else crosses ranks. Only rank 0 writes outputs. An error on any rank aborts the whole job (`MPI_Abort`),
so a failing rank never leaves the others waiting in a collective.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import networkx as nx
import numpy as np
import torch

from fedsim.aggregation import Sums, weighted_sums
from fedsim.data.base import ClientDataSource, FederatedData
from fedsim.errors import FedsimError, ScenarioError
from fedsim.params import Pytree, tree_leaves, tree_map
from fedsim.runtime import Job, JobResult, Runtime, Stacked, Starts, jobs_starts
from fedsim.runtime.node_transport import HaloNeighbourhood, HaloPlan, block_partition, halo_plan

WORLD_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_world_size() -> int:
    """How many ranks `mpiexec` started (1 when fedsim was not started by an MPI launcher)."""
    for var in WORLD_SIZE_VARIABLES:
        if var in os.environ:
            return int(os.environ[var])
    return 1


def world() -> Any | None:
    """MPI.COMM_WORLD when launched on more than one rank, else None."""
    if launched_world_size() <= 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise FedsimError(
            "fedsim was started by mpiexec on several ranks, but mpi4py is not installed "
            "(pip install 'fedsim-lab[mpi]')"
        ) from None
    return MPI.COMM_WORLD


def rank() -> int:
    comm = world()
    return comm.Get_rank() if comm is not None else 0


def owned_by(rank: int, size: int, num_clients: int, blocks: bool = False) -> list[int]:
    """The clients of `rank` among `size` ranks: k mod size == rank, or with `blocks` (gossip nodes) the rank's
    contiguous block."""
    return list(block_partition(num_clients, size)[rank]) if blocks else list(range(rank, num_clients, size))


def owned_clients(num_clients: int, comm: Any, blocks: bool = False) -> list[int]:
    """This rank's clients (see `owned_by`). More ranks than clients is an error."""
    size = comm.Get_size()
    if size > num_clients:
        raise ScenarioError(f"mpiexec -n {size}: more ranks than clients (num_clients: {num_clients})")
    return owned_by(comm.Get_rank(), size, num_clients, blocks)


def every_rank_holds(comm: Any, data: ClientDataSource, clients: Sequence[int]) -> bool:
    """Whether on every rank `data` holds that rank's `clients` (a data set built for another variant was cut
    for the ownership of its protocol); a generated population holds every client."""
    here = not isinstance(data, FederatedData) or bool((data.train_starts[list(clients)] >= 0).all())
    return all(comm.allgather(here))


SHARD_TENSORS = ("x_train", "y_train", "x_test", "y_test")


def send_shard(comm: Any, shard: FederatedData, dest: int) -> None:
    """The shard's layout (pickled, small), then its four tensors as raw buffers (no pickled copy of the data)."""
    tensors = [getattr(shard, name).numpy() for name in SHARD_TENSORS]
    layout = {"arrays": [(t.shape, t.dtype.str) for t in tensors], "num_classes": shard.num_classes,
              **{k: getattr(shard, k) for k in ("train_starts", "train_sizes", "test_starts", "test_sizes")}}
    comm.send(layout, dest=dest)
    for t in tensors:
        comm.Send(np.ascontiguousarray(t), dest=dest)


def receive_shard(comm: Any) -> FederatedData:
    layout = comm.recv(source=0)
    tensors = []
    for shape, dtype in layout.pop("arrays"):
        buffer = np.empty(shape, dtype=np.dtype(dtype))
        comm.Recv(buffer, source=0)
        tensors.append(torch.from_numpy(buffer))
    return FederatedData(**dict(zip(SHARD_TENSORS, tensors, strict=True)), **layout)


def distribute_data(comm: Any, build: Callable[[], ClientDataSource], blocks: bool = False) -> ClientDataSource:
    """Rank 0 builds the data set and every rank gets what it needs: an in-memory set is cut into shards and
    each rank receives only its own clients' rows (`owned_by`, so ranks other than 0 never hold the whole set),
    while a generated population, which holds no samples, is handed over whole."""
    size, me = comm.Get_size(), comm.Get_rank()
    data = build() if me == 0 else None
    population = comm.bcast(None if isinstance(data, FederatedData) else data, root=0)
    if population is not None:
        return population
    if me != 0:
        return receive_shard(comm)
    assert isinstance(data, FederatedData)
    for r in range(1, size):
        send_shard(comm, data.shard(owned_by(r, size, data.num_clients, blocks)), r)
    return data.shard(owned_by(0, size, data.num_clients, blocks))


def allreduce_tree(comm: Any, tree: Pytree) -> Pytree:
    """Leaf-wise sum of a float64 pytree over all ranks, in one flat `Allreduce`."""
    from mpi4py import MPI

    leaves = list(tree_leaves(tree))
    flat = np.concatenate([leaf.reshape(-1).numpy() for leaf in leaves]) if leaves else np.zeros(0)
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    out, start = [], 0
    for leaf in leaves:
        out.append(torch.from_numpy(flat[start : start + leaf.numel()].copy()).reshape(leaf.shape))
        start += leaf.numel()
    it = iter(out)
    return tree_map(lambda _: next(it), tree)


class MPIRuntime:
    """Wraps the scenario's runtime: runs this rank's jobs with it and reduces across ranks."""

    def __init__(self, inner: Runtime, comm: Any) -> None:
        self.inner, self.comm, self.threads = inner, comm, inner.threads
        self.size, self.rank = comm.Get_size(), comm.Get_rank()

    def run_jobs(self, jobs: Sequence[Job], starts: Starts) -> list[JobResult]:
        per_job = jobs_starts(jobs, starts)
        mine = [i for i, j in enumerate(jobs) if j.client % self.size == self.rank]
        if isinstance(starts, dict):
            share: Starts = starts
        else:
            share = per_job.take(mine) if isinstance(per_job, Stacked) else [per_job[i] for i in mine]
        ran = self.inner.run_jobs([jobs[i] for i in mine], share)
        local = dict(zip(mine, ran, strict=True))
        shared = self.comm.allgather([(i, r.num_samples, r.work, r.message_bytes) for i, r in local.items()])
        remote = {i: JobResult(jobs[i], None, n, w, b) for part in shared for i, n, w, b in part if i not in local}
        return [local.get(i) or remote[i] for i in range(len(jobs))]

    def broadcast_payload(self, message: Pytree, payload: Pytree) -> None:
        """Nothing: every rank decodes the broadcast itself."""

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def reduce(self, results: Sequence[JobResult], weighting: dict[str, str], template: Pytree) -> Sums:
        return allreduce_tree(self.comm, weighted_sums(results, weighting, template))

    def gather_messages(self, results: Sequence[JobResult]) -> list[Pytree]:
        """Every rank gets every result's message (per-result server rules): flat float64 arrays via allgather."""
        held = [(i, np.concatenate([leaf.reshape(-1).double().numpy() for leaf in tree_leaves(r.message)]))
                for i, r in enumerate(results) if r.here]
        template = next((r.message for r in results if r.here), None)
        templates = self.comm.allgather(None if template is None else tree_map(lambda v: (v.shape, v.dtype),
                                                                                  template))
        template = next(t for t in templates if t is not None)
        flat = {i: a for part in self.comm.allgather(held) for i, a in part}
        return [_unflatten(flat[i], template) for i in range(len(results))]

    def reduce_sums(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add up evaluation sums (float64 tensors) over ranks."""
        return allreduce_tree(self.comm, {k: v.double() for k, v in sums.items()})


class MPINodeTransport:
    """Gossip nodes in contiguous blocks over the ranks (`fedsim.runtime.node_transport.NodeTransport`)."""

    def __init__(self, comm: Any, num_nodes: int) -> None:
        self.comm, self.num_nodes = comm, num_nodes
        self.blocks = block_partition(num_nodes, comm.Get_size())
        self.owned = self.blocks[comm.Get_rank()]
        self.lost: frozenset[int] = frozenset()

    def connect(self, graph: nx.Graph) -> MPINeighbourhood:
        """A distributed graph communicator over the ranks whose blocks share an edge of `graph` (collective)."""
        plan = halo_plan(graph, self.blocks, self.comm.Get_rank())
        peers = list(plan.peers)
        return MPINeighbourhood(plan, self.comm.Create_dist_graph_adjacent(peers, peers, reorder=False))

    def sum(self, tree: Pytree) -> Pytree:
        return allreduce_tree(self.comm, tree_map(lambda v: v.detach().double().cpu(), tree))


class MPINeighbourhood(HaloNeighbourhood):
    """Halo exchange along one graph: each row travels as raw bytes (every leaf of a node, one after another),
    one `Neighbor_alltoallv` per exchange, counted in rows of a contiguous MPI datatype."""

    def __init__(self, plan: HaloPlan, graph_comm: Any) -> None:
        super().__init__(plan)
        self.graph_comm = graph_comm
        start = plan.owned.start
        self.send_index = torch.tensor([i - start for nodes in plan.sends for i in nodes], dtype=torch.long)
        self.send_counts = [len(nodes) for nodes in plan.sends]
        self.receive_counts = [len(nodes) for nodes in plan.receives]

    def release(self) -> None:
        self.graph_comm.Free()

    def exchange(self, rows: Pytree) -> Pytree:
        from mpi4py import MPI

        sent = [v.detach().cpu().index_select(0, self.send_index) for v in tree_leaves(rows)]
        send = torch.cat([v.reshape(len(v), math.prod(v.shape[1:])).view(torch.uint8) for v in sent], dim=1).numpy()
        width = sum(_row_bytes(v) for v in sent)
        received = np.empty((sum(self.receive_counts), width), dtype=np.uint8)
        row = MPI.BYTE.Create_contiguous(width).Commit()
        try:
            self.graph_comm.Neighbor_alltoallv([send, (self.send_counts, _displacements(self.send_counts)), row],
                                               [received, (self.receive_counts,
                                                           _displacements(self.receive_counts)), row])
        finally:
            row.Free()
        return _unpack_rows(torch.from_numpy(received), rows)


def _displacements(counts: Sequence[int]) -> list[int]:
    return [int(d) for d in np.cumsum([0, *counts[:-1]])] if counts else []


def _row_bytes(leaf: torch.Tensor) -> int:
    return math.prod(leaf.shape[1:]) * leaf.element_size()


def _unpack_rows(packed: torch.Tensor, like: Pytree) -> Pytree:
    """Rows of raw bytes back into a pytree shaped like `like` (leaves (rows, ...)), one leaf after another."""
    out, start = [], 0
    for leaf in tree_leaves(like):
        width = _row_bytes(leaf)
        chunk = packed[:, start : start + width].contiguous().view(leaf.dtype)
        out.append(chunk.reshape(packed.shape[0], *leaf.shape[1:]).to(leaf.device))
        start += width
    it = iter(out)
    return tree_map(lambda _: next(it), like)


def _unflatten(flat: np.ndarray, shapes: Pytree) -> Pytree:
    """A message from its flat float64 array and its leaves' (shape, dtype)."""
    out, start = {}, 0
    for key, value in shapes.items():
        if isinstance(value, dict):
            size = sum(int(np.prod(shape)) for shape, _ in _leaf_specs(value))
            out[key] = _unflatten(flat[start : start + size], value)
            start += size
        else:
            shape, dtype = value
            size = int(np.prod(shape))
            out[key] = torch.from_numpy(flat[start : start + size].copy()).reshape(shape).to(dtype)
            start += size
    return out


def _leaf_specs(shapes: Pytree) -> list[tuple[Any, Any]]:
    return [spec for v in shapes.values() for spec in (_leaf_specs(v) if isinstance(v, dict) else [v])]
