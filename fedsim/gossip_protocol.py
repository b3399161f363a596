"""What gossip protocols share (`servers/dsgd.py`, `servers/cdproxsgt.py`): nodes that each keep their own model in
one `StackedStore` (a leading node axis over the nodes this process owns), the graph of every round with its mixing
matrix and its connection over the node transport, compressed gossip through public copies, the network average as
the evaluated model, and jobs run at every owned node in one runtime call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import torch
from pydantic import Field, field_validator
from torch.func import vmap

from fedsim import keyed_random
from fedsim.codecs import Codec, build_codec
from fedsim.errors import DivergenceError, ScenarioError
from fedsim.node_evaluation import NodeEvaluator
from fedsim.node_store import StackedStore
from fedsim.params import Pytree, tree_leaves, tree_map, tree_nbytes
from fedsim.protocol import LockstepProtocol
from fedsim.recording import Recorder, Row
from fedsim.registry import Params
from fedsim.runtime import Jobs, Stacked, run_stacked
from fedsim.runtime.node_transport import HaloNeighbourhood, Neighbourhood, NodeTransport
from fedsim.seeding import Stream, derive_seed
from fedsim.topologies.mixing import DEFAULT_MIXING, MIXING, drop_nodes, mixing_matrix
from fedsim.topologies.schedule import Topology, build_topology

if TYPE_CHECKING:
    from fedsim.scenario import Component, ScenarioSchema
    from fedsim.simulation import Simulation


class MixingParams(Params):
    """The mixing matrix gossip averages with, per round's graph."""

    mixing: dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_MIXING},
                                   description="mixing matrix {name: ..., **params}; see fedsim.topologies.mixing")

    @field_validator("mixing")
    @classmethod
    def _known_mixing(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            MIXING.resolve(value, "mixing")
        except ScenarioError as exc:
            raise ValueError(str(exc)) from None
        return value


def mixing_of(params: MixingParams, graph: nx.Graph) -> torch.Tensor:
    """The configured mixing matrix of one round's graph."""
    return mixing_matrix(params.mixing["name"], {k: v for k, v in params.mixing.items() if k != "name"}, graph,
                         "protocol.mixing")


@dataclass(frozen=True)
class RoundGraph:
    """One graph of the topology, as a round uses it: its mixing matrix, its exchanges over the transport and how
    many nodes hear each node (its sends per gossip step)."""

    W: torch.Tensor
    neighbourhood: Neighbourhood
    out_degrees: np.ndarray


class GossipGraphs:
    """The graph of every round, its mixing matrix and its connection over the transport, built when a round first
    needs a graph it has not seen (a sequence without a period: the latest only, earlier connections released)."""

    def __init__(self, params: MixingParams, topology: Topology, transport: NodeTransport) -> None:
        self.params, self.topology, self.transport = params, topology, transport
        self._built: dict[int, RoundGraph] = {}
        self._without: tuple[int, frozenset[int], torch.Tensor] | None = None
        """The last matrix with lost nodes left out: (graph index, the lost nodes, the matrix)."""

    def at(self, t: int) -> RoundGraph:
        k = self.topology.index(t)
        if k not in self._built:
            if self.topology.sequence.period is None:
                for old in self._built.values():
                    old.neighbourhood.release()
                self._built.clear()
            graph = self.topology.graph(t)
            tells = graph.succ if graph.is_directed() else graph.adj
            degrees = np.array([len(set(tells[i]) - {i}) for i in range(self.topology.num_nodes)])
            self._built[k] = RoundGraph(mixing_of(self.params, graph), self.transport.connect(graph), degrees)
        return self._built[k]

    def mixing(self, t: int) -> torch.Tensor:
        """Round t's mixing matrix without the nodes the transport lost (rows re-normalized), the same object while
        neither changes (so the transport's local rows of it are reused)."""
        k, lost = self.topology.index(t), self.transport.lost
        if self._without is None or self._without[:2] != (k, lost):
            self._without = k, lost, drop_nodes(self.at(t).W, lost)
        return self._without[2]


class PublicCopies:
    """Compressed gossip (CHOCO-SGD, Koloskova, Stich, Jaggi, ICML 2019, Algorithm 2) of one stacked quantity of the
    owned nodes (their models; CDProxSGT also their trackers): each gossip step every node sends its rows through
    the gossip codec, its receivers decode them into their copy of the node's public rows x^_j (one copy per node
    here: all receivers apply the same payload), then x_i <- x_i + gamma ((W x^)_i - x^_i). With a
    receiver-mirrored codec (`error_feedback: ef21`, first message compressed) x^_j += Q(x_j - x^_j) is the paper's
    public-copy update; the paper's order is kept (send, then mix the new copies), where the authors' code mixes
    the old copies first. Under a doubly stochastic W the network average is preserved.

    On a fixed graph the transport carries the payloads: this process decodes its halo nodes' payloads into its own
    mirrors of their shared state, as a peer would. On a graph that changes, a new neighbour's past payloads were
    never seen here, so the transport carries the decoded public rows instead (bytes count the payloads either
    way)."""

    def __init__(self, codec: Codec, gamma: float, template: Pytree, owned: range, seed: int, channel: int = 0,
                 halo: int | None = None) -> None:
        """`halo`: the halo's size on a fixed graph (its payloads then travel), None on a changing one."""
        self.codec, self.gamma, self.template, self.owned = codec, gamma, template, owned
        self.seed, self.channel = seed, channel
        self.states = _replicate(codec.init(template), len(owned))
        """The owned nodes' codec states, stacked (`{}` for a stateless codec)."""
        self.halo_mirrors = None if halo is None else _replicate(codec.shared(codec.init(template)), halo)
        """This process's mirrors of its halo nodes' shared codec states, stacked; None when rows travel."""
        self.first = True
        """Whether the next send is every node's first message."""

    @classmethod
    def build(cls, spec: ScenarioSchema, sim: Simulation, owned: range, graphs: GossipGraphs, gamma: float,
              template: Pytree, channel: int = 0) -> PublicCopies:
        """The scenario's gossip codec (identity when none: gossip with a consensus step only) for rows shaped like
        `template`, checked against the model and the transport (a relayed transport mixes on the nodes, where no
        public copy is kept)."""
        codec = build_codec(spec.compression.gossip, "compression.gossip")
        codec.check(sim.model.init_params, "compression.gossip")
        if not isinstance(graphs.at(0).neighbourhood, HaloNeighbourhood):
            field = "compression.gossip" if spec.compression.gossip is not None else "protocol"
            raise ScenarioError(f"{field}: relayed gossip mixes on the nodes, which keep no public copies; compressed "
                                f"gossip and consensus steps (consensus_step, gamma_x, gamma_y below 1) run in one "
                                f"process, under MPI or on gRPC peers")
        fixed = graphs.topology.sequence.period == 1
        return cls(codec, gamma, template, owned, spec.seed, channel,
                   len(graphs.at(0).neighbourhood.plan.halo) if fixed else None)

    def keys(self, t: int, q: int) -> torch.Tensor:
        """The owned nodes' codec keys of round t's gossip step q: fold_in(step key, node), the same however the
        nodes are split over processes."""
        key = keyed_random.key_from_seed(derive_seed(self.seed, Stream.GOSSIP, t, q, self.channel))
        return keyed_random.fold_in(key, torch.arange(self.owned.start, self.owned.stop))

    def gossip(self, rows: Pytree, t: int, q: int, neighbourhood: Neighbourhood, W: torch.Tensor) -> tuple[Pytree,
                                                                                                          int]:
        """One compressed gossip step of the owned nodes' `rows`: their new rows, and one node's payload bytes."""
        codec, first = self.codec, self.first
        payload, public, new_states = vmap(lambda m, s, k: codec.round_trip(m, s, k, first=first))(
            rows, self.states, self.keys(t, q))
        self.states, self.first = new_states, False
        if self.halo_mirrors is None:
            mixed = neighbourhood.gossip(public, W)
        else:
            mixed = neighbourhood.mix(public, self._halo_rows(neighbourhood.exchange(payload)), W)
        return tree_map(lambda v, m, p: v + self.gamma * (m - p), rows, mixed, public), \
            codec.payload_bytes(self.template, first=first)

    def _halo_rows(self, payloads: Pytree) -> Pytree:
        """The halo nodes' public rows, decoded from their payloads into this process's mirrors of them."""
        if not any(leaf.shape[0] for leaf in tree_leaves(payloads)):
            return tree_map(lambda v: v.unsqueeze(0)[:0], self.template)
        rows, self.halo_mirrors = vmap(self.codec.decode, in_dims=(0, None, 0))(payloads, self.template,
                                                                                 self.halo_mirrors)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"states": self.states, "halo_mirrors": self.halo_mirrors, "first": self.first}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.states, self.halo_mirrors, self.first = state["states"], state["halo_mirrors"], state["first"]


def _replicate(tree: Pytree, n: int) -> Pytree:
    """n copies of `tree` stacked on a leading axis."""
    return tree_map(lambda v: v.unsqueeze(0).repeat(n, *(1,) * v.ndim), tree)


def finite(leaf: torch.Tensor) -> bool:
    """Whether every entry of `leaf` is finite, from its least and greatest entries (both NaN if any is NaN): two
    reductions, no mask. Nodes' models are finite exactly when their average (in float64) is."""
    return not leaf.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(leaf))).all())


def refuse_client_server_settings(name: str, spec: ScenarioSchema, components: dict[str, Component], runs: str,
                                  instead: str) -> None:
    """Refuse a client sample or a server rule, which a protocol without a server would silently ignore: it `runs`
    its nodes (every one every round, ...) and does `instead` what a server would."""
    if spec.clients_per_round not in (None, spec.num_clients):
        raise ScenarioError(f"clients_per_round: protocol {name!r} {runs}; remove it or set it to num_clients "
                            f"({spec.num_clients})")
    if components["server"].name != "fedavg":
        raise ScenarioError(f"server.name: protocol {name!r} {instead} and uses no server rule; remove server (got "
                            f"{components['server'].name!r})")


def check_mixing(params: MixingParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Refuse graphs of the topology the configured mixing matrix cannot be built on."""
    topology = build_topology(components["topology"], spec.num_clients, spec.seed)
    for t in range(topology.sequence.period or 1):
        mixing_of(params, topology.graph(t))


class GossipProtocol(LockstepProtocol):
    """Base of synchronous gossip protocols on the virtual clock: every node works and mixes every round; the
    evaluated global model is the network average, and each row reports the consensus error. Subclasses implement
    `take_step` with `node_messages` (jobs at every owned node), the transport and `finish_round`."""

    step_event = "round"

    def __init__(self, params: MixingParams, sim: Simulation, recorder: Recorder, steps: np.ndarray) -> None:
        """`steps`: every node's local steps per round (its jobs' steps)."""
        super().__init__(params, sim, recorder)
        spec, components = self.spec, sim.scenario.components
        n = spec.num_clients
        assert sim.transport is not None, "build_simulation gives peer-to-peer protocols a node transport"
        self.transport = sim.transport
        self.owned = self.transport.owned
        self.topology = build_topology(components["topology"], n, spec.seed)
        self.graphs = GossipGraphs(params, self.topology, self.transport)
        self.node_evaluator = NodeEvaluator(sim.evaluator, n)
        self.nodes = StackedStore.replicate(sim.model.init_params, len(self.owned))
        """The owned nodes' models (row r is node owned[r]): the protocol's state, what a checkpoint saves."""
        self.model_bytes = tree_nbytes(sim.model.init_params)
        self.steps = steps
        self.state["params"] = tree_map(torch.clone, sim.model.init_params)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "nodes": self.nodes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.nodes.load_state_dict(state["nodes"])

    def alive(self) -> int:
        """Nodes still taking part (all of them, except in a peer deployment that lost some)."""
        return self.spec.num_clients - len(self.transport.lost)

    def evaluate_if_due(self, steps: int, now: float) -> Row | None:
        """When a row is due, the network average of the nodes still taking part becomes the evaluated model first
        (a round only checks that the nodes' models are finite: the average is a pass over every row in float64,
        so it is taken only for rows; the server state a checkpoint saves between rows is the last row's)."""
        if self.evaluation_due(steps, now):
            alive, totals = self.alive(), self.transport.sum(self.nodes.sum())
            self.state["params"] = tree_map(lambda s, v: (s / alive).to(v.dtype), totals, self.sim.model.init_params)
        return super().evaluate_if_due(steps, now)

    def extra_metrics(self) -> dict[str, float]:
        """The consensus error and the nodes' own models' figures (`NodeEvaluator.report`) over the nodes still
        taking part, and how many nodes were lost."""
        center = tree_map(lambda v: v / self.alive(), self.transport.sum(self.nodes.sum()))
        return {**self.node_evaluator.report(self.nodes.stacked, center, self.transport, self.alive(),
                                             self.topology.graph(self.server_steps), self.recorder.timeline),
                "nodes_lost": len(self.transport.lost)}

    def finish_round(self, t: int, work: np.ndarray, sends: np.ndarray) -> float:
        """Close round t: count its bytes and node updates and stop the run if a node's model is no longer finite;
        returns its simulated seconds, those of its slowest node (its `work` and the bytes it `sends`)."""
        self.traffic.up += int(sends.sum())
        diverged = torch.tensor(0.0 if all(map(finite, tree_leaves(self.nodes.stacked))) else 1.0)
        totals = self.transport.sum({"work": torch.from_numpy(work).double(), "diverged": diverged})
        if float(totals["diverged"]):
            raise DivergenceError(
                f"variant {self.sim.scenario.variant}, round {t}: the network-average model has NaN/inf "
                f"parameters; the run diverged; its metrics up to this round are kept; a smaller algorithm.lr may help"
            )
        self.client_updates += self.alive()
        n = self.spec.num_clients
        return float(self.sim.systems.jobs_seconds(t, np.arange(n), totals["work"].long().numpy(), 0, sends).max())

    def node_messages(self, t: int, key: str) -> tuple[Pytree, np.ndarray]:
        """Every owned node's message `key` from its round-t job started at its own model (zero for nodes with no
        steps), stacked on the node axis in the nodes' dtypes, and every node's work (zero for nodes another
        process owns); the owned nodes' jobs go to the runtime in one call, their starts the store's rows as they
        are and their messages taken back stacked."""
        start, owned = self.owned.start, len(self.owned)
        ids = np.flatnonzero(self.steps[start : start + owned] > 0) + start
        work = np.zeros(self.spec.num_clients, dtype=np.int64)
        if not len(ids):
            return tree_map(torch.zeros_like, self.nodes.stacked), work
        jobs = Jobs(t, ids, self.steps[ids], t)
        rows = self.nodes.stacked if len(ids) == owned else self.nodes.gather(torch.from_numpy(ids - start))
        results = run_stacked(self.sim.runtime, jobs, Stacked({"params": rows}))
        self.commit_all(results)
        clients = Jobs.of(results.jobs).clients
        work[clients] = results.work
        messages = results.messages[key]
        if len(clients) == owned:
            return tree_map(lambda d, x: d.to(x.dtype), messages, self.nodes.stacked), work
        index = torch.from_numpy(clients - start)
        return tree_map(lambda x, d: torch.zeros_like(x).index_copy_(0, index, d.to(x.dtype)), self.nodes.stacked,
                        messages), work
