"""DADAO (Nabli & Oyallon, ICML 2023, arXiv 2208.00779; the authors' code `AdelNabli/DADAO`): decentralized
optimization of sum_i f_i (each f_i node i's mean loss, L-smooth and mu-strongly convex) with gradient steps and
pairwise communications on independent Poisson clocks, and between events a linear ODE that every node integrates
exactly.

Each node keeps six vectors shaped like the model, S = (x, x~, y, y~, z, z~), all stacked over nodes: one pytree
whose leaves are (nodes, 6, *leaf shape), so an event batch updates all its nodes with one tensor operation per leaf.
Between events S' = M S per node (M the 6x6 matrix of `Constants.ode_matrix`), so S <- expm(M dt) S.
- A gradient event at node i (rate 1 per node; one clock of rate n, the node drawn uniformly): integrate i to t,
  G = grad f_i(x_i) - nu x_i - y~_i, then x_i -= gamma G, x~_i -= gamma~ G, y~_i += (delta + delta~) G.
- A communication event on edge (i, j) (total rate lambda_mix = sqrt(2 chi_1 chi_2), the edge drawn uniformly from
  the graph of the time): integrate i and j to t, m = (y_i + z_i) - (y_j + z_j), then z_i -= beta m, z~_i -= beta~ m,
  z_j += beta m, z~_j += beta~ m. Each side sends the other its y + z: the model's bytes each way.
L and mu are `protocol.L`, `protocol.mu`, or for a linear model on a regression task computed from the nodes' data
(the extremes of their Hessians' eigenvalues, as the authors' `compute_regularity_constants`). The minimiser of
sum_i f_i is the pooled one when every node holds as many rows. Gradients are the task's own through the runtime:
full-batch by default, stochastic with `algorithm: {name: gradient, local_steps: 1, batch_size: B}` (the authors'
stochastic path raises a NameError: `batch_size` for `self.batch_size`).
chi_1, chi_2 are those of the edge-rate Laplacian with uniform edge probabilities (`fedsim.topologies.spectral`); a
time-varying topology uses graph(int(t chi_1)) at time t (the graph changes every 1 / chi_1 time units, as in the
authors' `run_DADAO`) and the worst chi_1, chi_2 over its graphs (one period, or the first GRAPHS_RATED without one).

Time: a server step is one unit of DADAO time (n gradient events and lambda_mix communications on average), so
`rounds` counts units and rows come every `evaluation.every` units; simulated seconds are DADAO time times
`time_unit` (the Poisson clocks are the model of when nodes compute and talk; the systems profile is not used).
Unit b's events are drawn from their own generator keyed by (seed, PROTOCOL, b) (a Poisson count, uniform times),
so every runtime and process sees the same events and a resumed run needs only its position (the unit). Events on
disjoint nodes with no event between them on those nodes commute, so a unit's events run in dependency layers (each
layer touches a node at most once; `dependency_layers`): per layer one batched ODE step, then either one `run_jobs`
call for its gradients (the `gradient` client rule: the task's full-batch or minibatch gradient) or one batched
communication step.

Evaluation scores the network average of every node's x integrated to the row's time (without changing the run);
rows add the consensus error of those x, and the gradient and communication events so far.

Nodes may be split over processes (`sim.transport`, as D-SGD's): each process runs the events of the nodes it owns;
a layer with communications exchanges y + z with the neighbouring processes (the transport's halo).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import torch
from pydantic import Field

from fedsim.data.base import ClientDataSource
from fedsim.errors import DivergenceError, ScenarioError
from fedsim.node_evaluation import NodeEvaluator
from fedsim.node_store import StackedStore, tree_flatten
from fedsim.params import Pytree, tree_is_finite, tree_leaves, tree_map, tree_nbytes
from fedsim.protocol import LockstepProtocol
from fedsim.recording import Recorder
from fedsim.registry import Params
from fedsim.runtime import Jobs, Stacked, run_stacked
from fedsim.runtime.node_transport import HaloNeighbourhood
from fedsim.sampling import full_steps
from fedsim.seeding import Stream, derive_seed
from fedsim.servers import PROTOCOLS
from fedsim.tasks import Objective, Regression
from fedsim.topologies.schedule import Topology, build_topology
from fedsim.topologies.spectral import chi_1, chi_2

if TYPE_CHECKING:
    from fedsim.scenario import Component, ScenarioSchema
    from fedsim.simulation import Simulation

GRAPHS_RATED = 50
"""Graphs of a sequence without a period whose worst chi_1, chi_2 set the rates (the authors draw 50 graphs)."""
SINGULAR = 1e-10
"""A computed mu at most this times L is taken for 0 (a singular Hessian up to rounding)."""
X, X_TILDE, Y, Y_TILDE, Z, Z_TILDE = range(6)
"""Rows of a node's state S."""


class DADAOParams(Params):
    """The smoothness and strong convexity of the nodes' losses, and the seconds a unit of DADAO time lasts."""

    L: float | None = Field(None, gt=0, description="smoothness of every node's loss; default: computed for a "
                                                    "linear model on a regression task (max over nodes)")
    mu: float | None = Field(None, gt=0, description="strong convexity of every node's loss, at most L; default: "
                                                     "computed like L (min over nodes)")
    time_unit: float = Field(1.0, gt=0, description="simulated seconds per unit of DADAO time")


@dataclass(frozen=True)
class Constants:
    """DADAO's constants (the authors' `DADAO_optimizer.initialize`) from L, mu, chi_1 and lambda_mix."""

    nu: float
    alpha: float
    alpha_tilde: float
    eta: float
    eta_tilde: float
    theta: float
    beta: float
    beta_tilde: float
    delta: float
    delta_tilde: float
    gamma: float
    gamma_tilde: float

    @classmethod
    def of(cls, L: float, mu: float, chi_1: float, rate_mix: float) -> Constants:
        """nu = mu / 2; beta~ uses chi_1* = chi_1 / lambda_mix, the chi_1 of the Laplacian scaled by the rate."""
        nu = mu / 2
        root = math.sqrt(nu / L)
        return cls(nu=nu, alpha=root / 4, alpha_tilde=root / 8, eta=root / 8, eta_tilde=root / 8,
                   theta=1 / (2 * root), beta=0.5, beta_tilde=2 * (chi_1 / rate_mix) / root, delta=root / 4,
                   delta_tilde=1.0, gamma=1 / (4 * L), gamma_tilde=1 / (4 * math.sqrt(L * nu)))

    def ode_matrix(self) -> torch.Tensor:
        """M (6 x 6, float64) of S' = M S, S = (x, x~, y, y~, z, z~)."""
        M = torch.zeros(6, 6, dtype=torch.float64)
        M[X, X], M[X, X_TILDE] = -self.eta, self.eta
        M[X_TILDE, X], M[X_TILDE, X_TILDE] = self.eta_tilde, -self.eta_tilde
        M[Y, Y], M[Y, Y_TILDE] = -self.alpha, self.alpha
        M[Y_TILDE, X_TILDE], M[Y_TILDE, Y], M[Y_TILDE, Z] = -self.theta * self.nu, -self.theta, -self.theta
        M[Z, Z], M[Z, Z_TILDE] = -self.alpha, self.alpha
        M[Z_TILDE, Z], M[Z_TILDE, Z_TILDE] = self.alpha_tilde, -self.alpha_tilde
        return M


def propagators(M: torch.Tensor, dt: np.ndarray) -> torch.Tensor:
    """expm(M dt) for every dt: (len(dt), 6, 6) float64."""
    return torch.linalg.matrix_exp(M * torch.from_numpy(np.asarray(dt, dtype=np.float64))[:, None, None])


def apply_propagators(E: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Each node's E_k @ S_k for S shaped (k, 6, ...), computed in float64, returned in S's dtype."""
    rows = S.reshape(S.shape[0], 6, -1).double()
    return torch.bmm(E, rows).reshape(S.shape).to(S.dtype)


def graph_rates(topology: Topology) -> tuple[float, float]:
    """The worst chi_1 and chi_2 over the topology's graphs (its one graph, a period's, or the first GRAPHS_RATED of
    a sequence without a period); every graph must be connected."""
    count = 1 if topology.static else topology.sequence.period or GRAPHS_RATED
    chis = []
    for k in range(count):
        graph = topology.graph(k)
        if graph.number_of_edges() == 0 or not nx.is_connected(graph):
            which = "the graph" if topology.static else f"graph {k} of the sequence"
            raise ScenarioError(f"topology: DADAO needs every graph connected (chi_1 is infinite otherwise), and "
                                f"{which} is not")
        chis.append((chi_1(graph), chi_2(graph)))
    return max(c for c, _ in chis), max(c for _, c in chis)


def linear_regression_constants(objective: Objective, data: ClientDataSource, owned: range,
                                total: Any) -> tuple[float, float] | None:
    """L = max_i and mu = min_i of the extreme eigenvalues of node i's Hessian Z_i^T Z_i / m_i + ridge D (Z_i its
    training rows, with a column of ones for a bias, which ridge leaves alone), for a linear model on a regression
    task; None for anything else. Each process fills its own nodes' entries and `total` (a sum over processes)
    assembles them."""
    layers = list(objective.model.template.children())
    if not (isinstance(objective.task, Regression) and len(layers) == 2 and isinstance(layers[1], torch.nn.Linear)
            and layers[1].out_features == 1):
        return None
    bias = layers[1].bias is not None
    largest = torch.zeros(data.num_clients, dtype=torch.float64)
    smallest = torch.zeros(data.num_clients, dtype=torch.float64)
    for node in owned:
        x, _ = data.client_train(node)
        z = x.reshape(len(x), -1).double()
        if bias:
            z = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], 1)
        penalty = torch.ones(z.shape[1], dtype=torch.float64)
        if bias:
            penalty[-1] = 0.0
        eigenvalues = torch.linalg.eigvalsh(z.T @ z / len(z) + objective.task.ridge * torch.diag(penalty))
        largest[node], smallest[node] = eigenvalues[-1], eigenvalues[0]
    sums = total({"largest": largest, "smallest": smallest})
    return float(sums["largest"].max()), float(sums["smallest"].min())


@dataclass(frozen=True)
class Unit:
    """The events of one unit of DADAO time, in time order: times, the node (gradient events) or first endpoint
    (communications), the other endpoint (-1 for gradient events), the graph index of communications (-1 for
    gradient events), and each event's dependency layer."""

    times: np.ndarray
    node: np.ndarray
    partner: np.ndarray
    graph: np.ndarray
    layer: np.ndarray

    def layers(self) -> list[np.ndarray]:
        """The events of each layer (indices into the unit's arrays, in time order), layer by layer."""
        order = np.argsort(self.layer, kind="stable")
        return np.split(order, np.cumsum(np.bincount(self.layer))[:-1]) if len(order) else []


class EventStream:
    """The keyed Poisson clocks: gradient events at total rate n, communications at total rate `rate_mix`."""

    def __init__(self, topology: Topology, rate_mix: float, chi_1: float, seed: int) -> None:
        self.topology, self.rate_mix, self.chi_1, self.seed = topology, rate_mix, chi_1, seed
        self.n = topology.num_nodes
        self._edges: dict[int, np.ndarray] = {}

    def graph_index(self, t: np.ndarray) -> np.ndarray:
        """The graph a communication at time t uses: int(t chi_1)."""
        return np.floor(t * self.chi_1).astype(np.int64)

    def edges(self, k: int) -> np.ndarray:
        """Graph k's undirected edges (i < j), sorted: (E, 2) int64 (a sequence without a period keeps the
        latest)."""
        key = self.topology.index(k)
        if key not in self._edges:
            if self.topology.sequence.period is None:
                self._edges.clear()
            pairs = sorted((min(i, j), max(i, j)) for i, j in self.topology.graph(k).edges if i != j)
            self._edges[key] = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        return self._edges[key]

    def unit(self, b: int) -> Unit:
        """Unit b's events, [b, b + 1): a Poisson(n + rate_mix) count at uniform times, each a gradient event with
        probability n / (n + rate_mix), its node or edge drawn uniformly, from the generator of (seed, b)."""
        rng = np.random.default_rng(derive_seed(self.seed, Stream.PROTOCOL, b))
        count = int(rng.poisson(self.n + self.rate_mix))
        times = b + np.sort(rng.random(count))
        gradient = rng.random(count) < self.n / (self.n + self.rate_mix)
        picks = rng.random(count)
        node = np.minimum((picks * self.n).astype(np.int64), self.n - 1)
        partner = np.full(count, -1, dtype=np.int64)
        graph = np.where(gradient, -1, self.graph_index(times))
        indices = np.unique(graph[~gradient])
        keys = np.array([self.topology.index(k) for k in indices.tolist()], dtype=np.int64)
        key = np.where(gradient, -1, keys[np.searchsorted(indices, graph)] if len(indices) else -1)
        for k in np.unique(keys).tolist():  # graphs sharing an index share their edges: one pass per distinct graph
            at = key == k
            edges = self.edges(k)
            chosen = edges[np.minimum((picks[at] * len(edges)).astype(np.int64), len(edges) - 1)]
            node[at], partner[at] = chosen[:, 0], chosen[:, 1]
        return Unit(times, node, partner, graph, dependency_layers(node, partner, self.n))


def dependency_layers(node: np.ndarray, partner: np.ndarray, n: int) -> np.ndarray:
    """Each event's layer, such that a layer touches a node at most once, holds gradient events only or
    communications only, and each node's events keep their order, with as few gradient layers (`run_jobs` calls) as
    the events allow. An event's level is the most gradient events on a chain of events (each sharing a node with
    the next) ending with it; gradient events of one level form one layer, and the communications of a level follow
    them in as few layers as their chains need."""
    level, rank = [0] * n, [-1] * n  # per node: its latest event's level, and its latest communication's rank there
    levels, ranks = [], []
    for i, j in zip(node.tolist(), partner.tolist(), strict=True):
        if j < 0:
            top, after = level[i] + 1, -1
            level[i], rank[i] = top, -1
        else:
            top, other = level[i], level[j]
            if top > other:
                after = rank[i] + 1
            elif other > top:
                top, after = other, rank[j] + 1
            else:
                after = max(rank[i], rank[j]) + 1
            level[i] = level[j] = top
            rank[i] = rank[j] = after
        levels.append(top)
        ranks.append(after)
    if not levels:
        return np.zeros(0, dtype=np.int64)
    key = np.array(levels, dtype=np.int64) * (max(ranks) + 2) + np.array(ranks, dtype=np.int64) + 1  # (level, rank)
    return np.unique(key, return_inverse=True)[1].reshape(-1)


def check_dadao(params: DADAOParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Refuse what DADAO cannot honour or would ignore, when the scenario is validated (`fedsim check`)."""
    if components["algorithm"].name != "gradient":
        raise ScenarioError(f"algorithm.name: protocol 'dadao' applies local gradients itself; use algorithm "
                            f"'gradient' (got {components['algorithm'].name!r})")
    if params.L is not None and params.mu is not None and params.mu > params.L:
        raise ScenarioError(f"protocol.mu: the strong convexity must be at most protocol.L (got mu {params.mu}, "
                            f"L {params.L})")
    linear = components["model"].name == "linear" and components["task"].name == "regression"
    if (params.L is None or params.mu is None) and not linear:
        missing = "protocol.L" if params.L is None else "protocol.mu"
        raise ScenarioError(f"{missing}: DADAO needs the nodes' smoothness L and strong convexity mu; they are "
                            f"computed only for a linear model on a regression task; set protocol.L and protocol.mu")
    if spec.clients_per_round not in (None, spec.num_clients):
        raise ScenarioError(f"clients_per_round: protocol 'dadao' runs every node; remove it or set it to "
                            f"num_clients ({spec.num_clients})")
    if spec.num_clients < 2:
        raise ScenarioError("num_clients: protocol 'dadao' needs at least 2 nodes")
    if components["server"].name != "fedavg":
        raise ScenarioError(f"server.name: protocol 'dadao' uses no server rule; remove server (got "
                            f"{components['server'].name!r})")
    systems = components["systems"]
    if systems.name != "homogeneous" or systems.params != type(systems.params)():
        raise ScenarioError("systems: protocol 'dadao' times nodes by its Poisson clocks (protocol.time_unit "
                            "seconds per unit of time) and ignores a systems profile; remove systems")
    if build_topology(components["topology"], spec.num_clients, spec.seed).directed:
        raise ScenarioError(f"topology.name: protocol 'dadao' communicates along undirected edges; "
                            f"{components['topology'].name!r} is directed")


@PROTOCOLS.register("dadao", params=DADAOParams, peer_to_peer=True, paths=(), check=check_dadao)
class DADAO(LockstepProtocol):
    """DADAO (Nabli & Oyallon 2023): gradient and communication events on Poisson clocks, an exact ODE between them;
    a server step per unit of DADAO time (`unit` events)."""

    step_event = "unit"

    def __init__(self, params: DADAOParams, sim: Simulation, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        spec = self.spec
        n = spec.num_clients
        assert sim.transport is not None, "build_simulation gives peer-to-peer protocols a node transport"
        self.transport = sim.transport
        self.owned = self.transport.owned
        self.topology = build_topology(sim.scenario.components["topology"], n, spec.seed)
        chi1, chi2 = graph_rates(self.topology)
        self.rate_mix = math.sqrt(2 * chi1 * chi2)
        self.L, self.mu = self._regularity(params)
        self.constants = Constants.of(self.L, self.mu, chi1, self.rate_mix)
        self.M = self.constants.ode_matrix()
        self.events = EventStream(self.topology, self.rate_mix, chi1, spec.seed)
        init = sim.model.init_params
        self.nodes = StackedStore(tree_map(lambda v: torch.cat([v.detach().expand(len(self.owned), 1, *v.shape),
                                                                torch.zeros(len(self.owned), 5, *v.shape,
                                                                            dtype=v.dtype)], 1), init))
        """The owned nodes' states (row r is node owned[r]; leaves (nodes, 6, ...)): what a checkpoint saves."""
        self.t_last = np.zeros(len(self.owned))
        """Each owned node's time of its last event (its state is S at that time)."""
        self.gradients = np.zeros(n, dtype=np.int64)
        """Gradient events per node so far, every process counting every node's (a node's next gradient job has
        this id)."""
        self.communications = 0
        hp = sim.rule.hp
        self.steps = full_steps(np.asarray(sim.data.train_sizes), hp.local_epochs, hp.batch_size, hp.local_steps)
        self.model_bytes = tree_nbytes(init)
        self.distributed = len(self.owned) < n
        self.node_evaluator = NodeEvaluator(sim.evaluator, n)
        self._neighbourhoods: dict[int, HaloNeighbourhood] = {}
        self._now: tuple[Pytree, Pytree] | None = None
        """The owned nodes' x at the latest unit's start and the network average (float64), for its row."""
        self.state["params"] = tree_map(torch.clone, init)

    def _regularity(self, params: DADAOParams) -> tuple[float, float]:
        """L and mu as given, else computed from the nodes' data (linear regression); mu must not exceed L."""
        computed = None
        if params.L is None or params.mu is None:
            computed = linear_regression_constants(self.sim.objective, self.sim.data, self.owned, self.transport.sum)
            assert computed is not None, "check_dadao requires L and mu unless the task is linear regression"
        L = params.L if params.L is not None else computed[0]
        mu = params.mu if params.mu is not None else computed[1]
        if mu <= SINGULAR * L:
            raise ScenarioError(f"protocol.mu: a node's loss is not strongly convex (smallest Hessian eigenvalue "
                                f"{mu:.3g}: fewer samples than features?); add task.ridge or set protocol.mu")
        if mu > L:
            raise ScenarioError(f"protocol.mu: the strong convexity must be at most L (mu {mu:.6g}, L {L:.6g})")
        return L, mu

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "nodes": self.nodes.state_dict(), "t_last": self.t_last.copy(),
                "gradients": self.gradients.copy(), "communications": self.communications}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.nodes.load_state_dict(state["nodes"])
        self.t_last, self.gradients = state["t_last"].copy(), state["gradients"].copy()
        self.communications = state["communications"]

    def before_evaluation(self, b: int) -> None:
        self._average_at(b)

    def take_step(self, b: int) -> float:
        """Unit b of DADAO time: its events, layer by layer; lasts `time_unit` simulated seconds."""
        unit = self.events.unit(b)
        for events in unit.layers():
            self._layer(unit, events, b)
        communications = int((unit.partner >= 0).sum())
        self.communications += communications
        self.traffic.up += 2 * self.model_bytes * communications
        self.client_updates = int(self.gradients.sum())
        return self.params.time_unit

    def extra_metrics(self) -> dict[str, float]:
        """The consensus error and the nodes' own models' figures (`NodeEvaluator.report`) of the nodes' x at the
        row's time, and the gradient and communication events so far."""
        assert self._now is not None, "evaluate after _average_at"
        models, center = self._now
        graph = self.topology.graph(int(self.events.graph_index(np.asarray(float(self.server_steps)))))
        return {**self.node_evaluator.report(models, center, self.transport, self.spec.num_clients, graph,
                                             self.recorder.timeline),
                "gradient_events": int(self.gradients.sum()), "communication_events": self.communications}

    def node_models(self, t: float) -> Pytree:
        """The owned nodes' x at time t (each integrated from its last event; the run's state is left as is),
        stacked on the node axis."""
        E = propagators(self.M, t - self.t_last)[:, X]
        return tree_map(lambda v: torch.einsum("kc,kcd->kd", E, v.reshape(len(v), 6, -1).double())
                        .reshape(len(v), *v.shape[2:]).to(v.dtype), self.nodes.stacked)

    def _average_at(self, b: int) -> None:
        """The network average of the nodes' x at time b becomes the evaluated model; a non-finite one stops the
        run."""
        models = self.node_models(float(b))
        center = tree_map(lambda v: v / self.spec.num_clients, self.transport.sum(StackedStore(models).sum()))
        self._now = models, center
        self.state["params"] = tree_map(lambda c, v: c.to(v.dtype), center, self.sim.model.init_params)
        if not tree_is_finite(self.state["params"]):
            raise DivergenceError(
                f"variant {self.sim.scenario.variant}, round {b}: the network-average model has NaN/inf "
                f"parameters; the run diverged; its metrics up to this round are kept; check protocol.L and "
                f"protocol.mu"
            )

    def _mine(self, nodes: np.ndarray) -> np.ndarray:
        return (nodes >= self.owned.start) & (nodes < self.owned.stop)

    def _layer(self, unit: Unit, events: np.ndarray, b: int) -> None:
        """One dependency layer (gradient events only, or communications only): integrate every owned node it
        touches to its event's time, then the events' jumps."""
        node, partner, times = unit.node[events], unit.partner[events], unit.times[events]
        if partner[0] < 0:
            mine = self._mine(node)
            self._integrate(node[mine] - self.owned.start, times[mine])
            if mine.any():
                self._gradient_jumps(node[mine], b)
            self.gradients[node] += 1
            return
        touched, at = np.concatenate([node, partner]), np.concatenate([times, times])
        if self.distributed:
            mine = self._mine(touched)
            touched, at = touched[mine], at[mine]
        states = self._integrate(touched - self.owned.start, at)
        self._communicate(node, partner, unit.graph[events], states)

    def _integrate(self, rows: np.ndarray, at: np.ndarray) -> list[torch.Tensor]:
        """S <- expm(M (t - t_last)) S for the owned rows given, each to its own time; returns those rows' new
        states, leaf by leaf (so a layer's jumps need not gather them again)."""
        if not len(rows):
            return []
        E = propagators(self.M, at - self.t_last[rows])
        index = torch.from_numpy(rows)
        states = []
        for leaf in tree_leaves(self.nodes.stacked):
            states.append(apply_propagators(E, leaf.index_select(0, index)))
            leaf.index_copy_(0, index, states[-1])
        self.t_last[rows] = at
        return states

    def _gradient_jumps(self, nodes: np.ndarray, b: int) -> None:
        """The gradient events of owned `nodes` (distinct): their gradients at x in one `run_jobs` call, then
        x -= gamma G, x~ -= gamma~ G, y~ += (delta + delta~) G, G = grad - nu x - y~."""
        index = torch.from_numpy(nodes - self.owned.start)
        states = tree_map(lambda v: v.index_select(0, index), self.nodes.stacked)
        jobs = Jobs(self.gradients[nodes], nodes, self.steps[nodes], b)
        results = run_stacked(self.sim.runtime, jobs, Stacked({"params": tree_map(lambda v: v[:, X], states)}))
        self.commit_all(results)
        grads = results.messages["grad"]
        c = self.constants

        def jump(leaf: torch.Tensor, S: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            G = g.to(S.dtype) - c.nu * S[:, X] - S[:, Y_TILDE]
            S[:, X] -= c.gamma * G
            S[:, X_TILDE] -= c.gamma_tilde * G
            S[:, Y_TILDE] += (c.delta + c.delta_tilde) * G
            return leaf.index_copy_(0, index, S)

        tree_map(jump, self.nodes.stacked, states, grads)

    def _communicate(self, first: np.ndarray, second: np.ndarray, graphs: np.ndarray,
                     states: list[torch.Tensor]) -> None:
        """The communications on edges (first[e], second[e]) (distinct nodes): each owned endpoint moves its z and
        z~ by -beta m and -beta~ m, m = its y + z minus its partner's. `states` are the owned endpoints' states
        (first's, then second's), leaf by leaf."""
        if self.distributed:
            ends, partner_sums = self._partner_sums(first, second, graphs)
        else:  # every endpoint here, in `states` half a layer away from its partner
            ends = np.concatenate([first, second])

            def partner_sums(key: str, sums: torch.Tensor) -> torch.Tensor:
                return sums.roll(len(first), 0)

        if not len(ends):
            return
        rows = torch.from_numpy(ends - self.owned.start)
        c = self.constants
        for (key, leaf), S in zip(tree_flatten(self.nodes.stacked).items(), states, strict=True):
            sums = S[:, Y] + S[:, Z]
            m = sums - partner_sums(key, sums)
            S[:, Z] -= c.beta * m
            S[:, Z_TILDE] -= c.beta_tilde * m
            leaf.index_copy_(0, rows, S)

    def _partner_sums(self, first: np.ndarray, second: np.ndarray,
                      graphs: np.ndarray) -> tuple[np.ndarray, Callable[[str, torch.Tensor], torch.Tensor]]:
        """The layer's owned endpoints (first's, then second's), and what gives, from a leaf's y + z of those, their
        partners' y + z (a halo's when another process owns the partner; the exchange happens here)."""
        ends, partners = np.concatenate([first, second]), np.concatenate([second, first])
        graph_of = np.concatenate([graphs, graphs])
        mine = self._mine(ends)
        position = np.cumsum(mine) - 1
        partner_at = np.concatenate([position[len(first):], position[: len(first)]])  # among the owned endpoints
        ends, partners, graph_of, partner_at = ends[mine], partners[mine], graph_of[mine], partner_at[mine]
        remote = ~self._mine(partners)
        halos = self._exchange(graphs)
        here, local = torch.from_numpy(~remote), torch.from_numpy(partner_at[~remote])

        def partner_sums(key: str, sums: torch.Tensor) -> torch.Tensor:
            other = torch.empty_like(sums)
            other[here] = sums[local]
            for k in np.unique(graph_of[remote]).tolist():
                halo_nodes, halo = halos[k]
                which = remote & (graph_of == k)
                other[torch.from_numpy(which)] = halo[key][torch.from_numpy(np.searchsorted(halo_nodes,
                                                                                           partners[which]))]
            return other

        return ends, partner_sums

    def _exchange(self, graphs: np.ndarray) -> dict[int, tuple[np.ndarray, Pytree]]:
        """Every owned node's y + z sent along each graph the layer's communications use, and the neighbouring
        processes' (its halo nodes, ascending, and their rows by flat key). Every process calls it at the same
        layers (the layers are the same everywhere)."""
        rows = {key: v[:, Y] + v[:, Z] for key, v in tree_flatten(self.nodes.stacked).items()}
        halos = {}
        for k in np.unique(graphs).tolist():
            neighbourhood = self._neighbourhood(k)
            halos[k] = np.asarray(neighbourhood.plan.halo, dtype=np.int64), neighbourhood.exchange(rows)
        return halos

    def _neighbourhood(self, k: int) -> HaloNeighbourhood:
        """Graph k connected over the transport (collective; a sequence without a period keeps the latest)."""
        key = self.topology.index(k)
        if key not in self._neighbourhoods:
            if self.topology.sequence.period is None:
                for old in self._neighbourhoods.values():
                    old.release()
                self._neighbourhoods.clear()
            self._neighbourhoods[key] = self.transport.connect(self.topology.graph(k))
        return self._neighbourhoods[key]
