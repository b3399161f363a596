"""Decentralized SGD (D-PSGD, Lian et al., NeurIPS 2017): every node keeps its own model, takes local steps on its
own data and averages with its graph neighbours through a mixing matrix W, with no server.

Two orders of the same round (Sayed's diffusion; Koloskova et al., ICML 2020, eq. 2 and its CTA form):
adapt-then-combine (ATC) x <- W (x + delta(x)), and combine-then-adapt (CTA) y = W x, x <- y + delta(y), where
delta(x_i) is node i's change from its local steps started at x_i. The nodes a process owns (all of them in one
process, a contiguous block per MPI rank: `sim.transport`) live in one `StackedStore` (a leading node axis), so
mixing is one sparse product per leaf over the owned rows and the neighbours' rows the transport brings (the halo),
and the vectorized runtime runs the owned nodes' local steps in one vmapped batch (one start per job, stacked on
the vmap axis). The network average and the consensus error are sums over processes.

Local-update gossip (DFedAvg, Sun et al. 2022; DFedSAM and DFedSAM-MGS, Shi et al., ICML 2023, Algorithm 1): the
node's local steps are the client algorithm's (`fedavg`: SGD, `fedsam`: SAM steps, `sgdm`: heavy-ball SGD), `K`
of them (`local_steps`), then `gossip_steps` Q mixing steps of the current iterate, z <- W z, Q times (MGS: Q > 1;
with Q = 1 and K = 1, D-SGD itself). The graph may change with the round (`fedsim.topologies.schedule`): each
round mixes over its own graph's matrix, and the transport re-plans its exchanges when the graph changes.

Compressed gossip (CHOCO-SGD, `compression.gossip` and `consensus_step`): each gossip step every node sends its
model through the gossip codec, receivers keep its public copy x^_j (the codec's receiver mirror, e.g. EF21's h_i),
and x_i <- x_i + gamma ((W x^)_i - x^_i) (`PublicCopies`).

Cost model: each gossip step every node sends its model (the half-step model under ATC, its current one under
CTA) to each neighbour it is heard by, counted as `bytes_up` (Q times per directed edge and round, the model's bytes
each, or the gossip codec's payload bytes; there is no download). A round t lasts as long as its slowest node's
`job_seconds(t, i, work_i, 0, bytes sent_i)`: a simplification that charges a node's sends one after another on
its uplink, plus one latency each way, and ignores that a node must wait for its neighbours' models rather than only
its own work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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
from fedsim.sampling import full_steps
from fedsim.seeding import Stream, derive_seed
from fedsim.servers import PROTOCOLS
from fedsim.topologies.mixing import DEFAULT_MIXING, MIXING, drop_nodes, mixing_matrix
from fedsim.topologies.schedule import Topology, build_topology

if TYPE_CHECKING:
    from fedsim.scenario import Component, ScenarioSchema
    from fedsim.simulation import Simulation


class DSGDParams(Params):
    """How nodes order local steps and mixing, which mixing matrix they use, and how many local steps they take."""

    order: Literal["atc", "cta"] = Field("atc", description="atc: local steps, then mix; cta: mix, then local steps")
    mixing: dict[str, Any] = Field(default_factory=lambda: {"name": DEFAULT_MIXING},
                                   description="mixing matrix {name: ..., **params}; see fedsim.topologies.mixing")
    local_steps: int | None = Field(None, ge=0, description="local steps per node and round (0: gossip only); "
                                                            "default: local_epochs * ceil(n_k / batch_size)")
    gossip_steps: int = Field(1, ge=1, description="mixing steps per round, each of the current iterate "
                                                   "(DFedSAM-MGS's Q; bytes count Q times per edge)")
    consensus_step: float = Field(1.0, gt=0, le=1, description="CHOCO's gamma: x_i += gamma ((W x^)_i - x^_i) "
                                                               "over the public copies x^ the gossip codec sends")

    @field_validator("mixing")
    @classmethod
    def _known_mixing(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            MIXING.resolve(value, "mixing")
        except ScenarioError as exc:
            raise ValueError(str(exc)) from None
        return value


def mixing_of(params: DSGDParams, graph: nx.Graph) -> torch.Tensor:
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

    def __init__(self, params: DSGDParams, topology: Topology, transport: NodeTransport) -> None:
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
    """Compressed gossip (CHOCO-SGD, Koloskova, Stich, Jaggi, ICML 2019, Algorithm 2): each gossip step every node
    sends its model through the gossip codec, every node's receivers decode it into their copy of the node's
    public model x^_j (one copy per node here: all receivers apply the same payload), and then
    x_i <- x_i + gamma ((W x^)_i - x^_i). With a receiver-mirrored codec (`error_feedback: ef21`, first message
    compressed) x^_j += Q(x_j - x^_j) is the paper's public-copy update; the paper's order is kept (send, then
    mix the new copies), where the authors' code mixes the old copies first. Under a doubly stochastic W the
    network average is preserved."""

    def __init__(self, codec: Codec, gamma: float, template: Pytree, owned: range, seed: int) -> None:
        self.codec, self.gamma, self.template, self.owned, self.seed = codec, gamma, template, owned, seed
        self.states = tree_map(lambda v: v.unsqueeze(0).repeat(len(owned), *(1,) * v.ndim), codec.init(template))
        """The owned nodes' codec states, stacked (`{}` for a stateless codec)."""
        self.first = True
        """Whether the next send is every node's first message."""

    @classmethod
    def build(cls, spec: ScenarioSchema, sim: Simulation, owned: range, graphs: GossipGraphs) -> PublicCopies:
        """The scenario's gossip codec (identity when none: gossip with a consensus step only), checked against
        the model and the transport (a relayed transport mixes on the nodes, where no public copy is kept)."""
        codec = build_codec(spec.compression.gossip, "compression.gossip")
        codec.check(sim.model.init_params, "compression.gossip")
        if not isinstance(graphs.at(0).neighbourhood, HaloNeighbourhood):
            raise ScenarioError("compression.gossip: relayed gossip mixes on the nodes, which keep no public copies; "
                                "compressed gossip and protocol.consensus_step run in one process, under MPI or on "
                                "gRPC peers")
        return cls(codec, graphs.params.consensus_step, sim.model.init_params, owned, spec.seed)

    def keys(self, t: int, q: int) -> torch.Tensor:
        """The owned nodes' codec keys of round t's gossip step q: fold_in(step key, node), the same however the
        nodes are split over processes."""
        key = keyed_random.key_from_seed(derive_seed(self.seed, Stream.GOSSIP, t, q))
        return keyed_random.fold_in(key, torch.arange(self.owned.start, self.owned.stop))

    def send(self, protocol: DecentralizedSGD, t: int, q: int, neighbourhood: Neighbourhood,
             W: torch.Tensor) -> int:
        """One compressed gossip step of the owned nodes, in place; returns one node's payload bytes."""
        codec, x, first = self.codec, protocol.nodes.stacked, self.first
        payload, new_states = vmap(lambda m, s, k: codec.encode(m, s, k, first=first))(x, self.states,
                                                                                         self.keys(t, q))
        public, _ = vmap(codec.decode, in_dims=(0, None, 0))(payload, self.template, codec.shared(self.states))
        self.states, self.first = new_states, False
        mixed = neighbourhood.gossip(public, W)
        protocol.nodes.assign(tree_map(lambda v, m, p: v + self.gamma * (m - p), x, mixed, public))
        return codec.payload_bytes(self.template, first=first)

    def state_dict(self) -> dict[str, Any]:
        return {"states": self.states, "first": self.first}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.states, self.first = state["states"], state["first"]


def finite(leaf: torch.Tensor) -> bool:
    """Whether every entry of `leaf` is finite, from its least and greatest entries (both NaN if any is NaN): two
    reductions, no mask. Nodes' models are finite exactly when their average (in float64) is."""
    return not leaf.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(leaf))).all())


def check_dsgd(params: DSGDParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Refuse settings D-SGD would silently ignore (a client sample, stragglers, a server rule) and graphs it
    cannot mix over, when the scenario is validated (so `fedsim check` reports them)."""
    if spec.clients_per_round not in (None, spec.num_clients):
        raise ScenarioError(f"clients_per_round: protocol 'dsgd' runs every node every round; remove it or set "
                            f"it to num_clients ({spec.num_clients})")
    if components["server"].name != "fedavg":
        raise ScenarioError(f"server.name: protocol 'dsgd' mixes models between nodes and uses no server rule; "
                            f"remove server (got {components['server'].name!r})")
    topology = build_topology(components["topology"], spec.num_clients, spec.seed)
    for t in range(topology.sequence.period or 1):
        mixing_of(params, topology.graph(t))


@PROTOCOLS.register("dsgd", params=DSGDParams, peer_to_peer=True, carries=("delta",), paths=("gossip",),
                    check=check_dsgd)
class DecentralizedSGD(LockstepProtocol):
    """Synchronous gossip rounds on the virtual clock: every node trains and mixes every round; the evaluated
    global model is the network average, and each row reports the consensus error."""

    step_event = "round"

    def __init__(self, params: DSGDParams, sim: Simulation, recorder: Recorder) -> None:
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
        hp = sim.rule.hp
        self.steps = np.full(n, params.local_steps) if params.local_steps is not None else \
            full_steps(np.asarray(sim.data.train_sizes), hp.local_epochs, hp.batch_size, hp.local_steps)
        self.state["params"] = tree_map(torch.clone, sim.model.init_params)
        self.public = PublicCopies.build(spec, sim, self.owned, self.graphs) \
            if spec.compression.gossip is not None or params.consensus_step != 1 else None
        """The gossip codec's senders and receivers (CHOCO-SGD); None: exact gossip x <- W x."""

    def state_dict(self) -> dict[str, Any]:
        public = {} if self.public is None else {"public": self.public.state_dict()}
        return {**super().state_dict(), "nodes": self.nodes.state_dict(), **public}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.nodes.load_state_dict(state["nodes"])
        if self.public is not None:
            self.public.load_state_dict(state["public"])

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

    def mix_nodes(self, t: int) -> np.ndarray:
        """Q gossip steps over the owned nodes along round t's graph through the transport (which brings the
        neighbours' rows here, or, relayed, has each node mix its own); lost peers are left out on re-normalized
        rows. Returns every node's bytes sent (its payloads times the nodes that hear it)."""
        neighbourhood, W = self.graphs.at(t).neighbourhood, self.graphs.mixing(t)
        sent = np.zeros(self.spec.num_clients, dtype=np.int64)
        for q in range(self.params.gossip_steps):
            if self.public is None:
                self.nodes.assign(neighbourhood.gossip(self.nodes.stacked, W))
                sent += self.model_bytes
            else:
                sent += self.public.send(self, t, q, neighbourhood, W)
        return sent * self.graphs.at(t).out_degrees

    def take_step(self, t: int) -> float:
        """Round t in the configured order; returns its simulated seconds."""
        sends = self.mix_nodes(t) if self.params.order == "cta" else 0
        deltas, work = self._local_steps(t)
        tree_map(torch.Tensor.add_, self.nodes.stacked, deltas)  # x + delta(x), in the store's rows
        if self.params.order == "atc":
            sends = self.mix_nodes(t)
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

    def _local_steps(self, t: int) -> tuple[Pytree, np.ndarray]:
        """Every owned node's change from its local steps started at its own model (zero for nodes with no steps),
        stacked on the node axis, and every node's work (zero for nodes another process owns); the owned nodes'
        jobs go to the runtime in one call, their starts the store's rows as they are and their deltas taken
        back stacked."""
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
        deltas = results.messages["delta"]
        if len(clients) == owned:
            return tree_map(lambda d, x: d.to(x.dtype), deltas, self.nodes.stacked), work
        index = torch.from_numpy(clients - start)
        return tree_map(lambda x, d: torch.zeros_like(x).index_copy_(0, index, d.to(x.dtype)), self.nodes.stacked,
                        deltas), work
