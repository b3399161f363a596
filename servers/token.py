"""Token algorithms: tokens carrying a model walk the graph, and each node a token reaches applies its local step to
the token's model (SA-SRRW: Hu, Doshi, Eun, ICLR 2024; the walk kernels are `fedsim.topologies.walks`).

Per step n (one server step: one hop of every token), token k moves X_n -> X_{n+1} by its walk (for srrw, its
visit measure x is the self-repellence's; every walk keeps x for the reports) and node X_{n+1} runs the client
algorithm's `local_steps` from the token's model theta_n; its change delta (with `lr` 1 and one SGD step, exactly
-grad F_{X_{n+1}}(theta_n) on a minibatch) moves the token by the model's step size:

    x_{n+1} = x_n + gamma_{n+1} (delta_{X_{n+1}} - x_n),   gamma_n = (n+1)^(-a)
    theta_{n+1} = theta_n + beta_{n+1} delta,              beta_n = beta0 (n+1)^(-b)

so theta tracks the minimiser of sum_i mu_i F_i, mu the walk's target. The paper's regimes: a < b (the measure
moves faster than theta, its variance falls like 1/alpha^2), a = b (1/alpha), a > b (little gain from alpha).

`repetitions` R independent copies of the whole run (their own walk draws and minibatches, the same start) run
together, T = `tokens` each, so every step is one `run_jobs` call with T * R jobs from their own starts (one vmapped
batch in the vectorized runtime). Rows evaluate the mean of all T * R models and add `repetition_variance` (mean
squared distance of the repetitions' models, each its tokens' mean, to their mean), `visit_tv` (total variation of
the visit measures to the target, mean over walkers) and `local_steps` (taken so far by one repetition's tokens).

Cost model (figures of one repetition: the mean over repetitions): a token that moves is sent once, its model's
bytes (plus, for srrw with alpha > 0, its visit measure, n float64 values, since the kernel at a node needs x at
every neighbour) counted in `bytes_up` as peer-to-peer sends; a token that stays (a Metropolis-Hastings self-loop)
sends nothing. A step lasts, per token, `job_seconds(job, node, work, bytes, 0)` at the node it reached (receiving
the token, its training, one latency to hand it on); the slowest token sets the step's time; `sim_time` is the mean
over repetitions. Every process keeps every token (they are small); under MPI or gRPC peers a token's job runs on the
process owning its node, and the tokens' changes are summed over processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field

from fedsim.errors import DivergenceError, FedsimError, ScenarioError
from fedsim.gossip_protocol import refuse_client_server_settings
from fedsim.node_store import StackedStore, tree_flatten
from fedsim.params import Pytree, tree_is_finite, tree_map, tree_nbytes
from fedsim.protocol import LockstepProtocol
from fedsim.recording import Recorder
from fedsim.registry import Params
from fedsim.runtime import Jobs, Stacked, run_stacked
from fedsim.servers import PROTOCOLS
from fedsim.topologies.schedule import build_topology
from fedsim.topologies.walks import (
    Adjacency,
    Walk,
    WalkState,
    nodes_from,
    step_size,
    total_variation,
    walk_uniforms,
)

if TYPE_CHECKING:
    import networkx as nx

    from fedsim.scenario import Component, ScenarioSchema
    from fedsim.simulation import Simulation

DEFAULT_ALPHA = 1.0
"""SRRW's self-repellence when the scenario gives none."""
MAX_JOB_IDS = 2**32
"""Job ids key random draws as 32-bit words: steps times walkers must stay below it."""


class TokenParams(Params):
    """Tokens, repetitions, the walk and the two step-size sequences of SA-SRRW."""

    tokens: int = Field(1, ge=1, le=10**5, description="tokens walking at once, each with its own model")
    repetitions: int = Field(1, ge=1, le=10**5, description="independent copies of the run (their own walk draws "
                                                            "and minibatches, the same start), run together")
    walk: Literal["srrw", "mhrw", "simple", "non_backtracking"] = Field(
        "srrw", description="srrw: self-repellent over the Metropolis-Hastings walk to the target")
    alpha: float | None = Field(None, ge=0, description=f"srrw's self-repellence (default {DEFAULT_ALPHA:g}); "
                                                        f"srrw only")
    target: Literal["uniform", "degree"] | list[float] | None = Field(
        None, description="the walk's target distribution (one number per node, or uniform / degree); default: "
                          "degree for simple and non_backtracking walks, else uniform")
    a: float = Field(0.8, gt=0.5, le=1, description="visit measure's step sizes gamma_n = (n+1)^-a")
    b: float = Field(0.9, gt=0.5, le=1, description="model's step sizes beta_n = beta0 (n+1)^-b")
    beta0: float = Field(1.0, gt=0, description="scale of the model's step sizes")
    local_steps: int = Field(1, ge=1, le=10**7, description="the algorithm's local steps at each visit")


def walk_of(params: TokenParams, topology: Component, num_nodes: int, seed: int) -> tuple[Walk, nx.Graph]:
    """The scenario's walk kernel and graph; one-line ScenarioErrors for a graph a token cannot walk (changing with
    the round, directed, disconnected) and for walk settings that do not fit it."""
    built = build_topology(topology, num_nodes, seed)
    if not built.static:
        raise ScenarioError(f"topology.name: token walks need a fixed graph; {topology.name!r} changes with the "
                            f"round")
    graph = built.graph(0)
    alpha = params.alpha if params.alpha is not None else (DEFAULT_ALPHA if params.walk == "srrw" else 0.0)
    walk = Walk(params.walk, Adjacency.of(graph), params.target, alpha, params.a, where="protocol.")
    return walk, graph


def check_token(params: TokenParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Refuse what the token protocol would silently ignore (a client sample, a server rule), graphs and targets
    its walk cannot follow, and more steps than job ids, when the scenario is validated."""
    refuse_client_server_settings("token", spec, components, "visits the nodes its tokens reach",
                                  "moves models along walks")
    walk_of(params, components["topology"], spec.num_clients, spec.seed)
    walkers = params.tokens * params.repetitions
    if spec.rounds is not None and spec.rounds * walkers > MAX_JOB_IDS:
        raise ScenarioError(f"rounds: {spec.rounds} steps of {walkers} tokens (tokens x repetitions) exceed the "
                            f"{MAX_JOB_IDS} job ids; take fewer steps, tokens or repetitions")


@PROTOCOLS.register("token", params=TokenParams, peer_to_peer=True, carries=("delta",), paths=(),
                    check=check_token)
class TokenWalk(LockstepProtocol):
    """Tokens walking the graph (SA-SRRW), every node they reach training the model they carry.

    The evaluated model is the mean of every token's."""

    step_event = "hop"

    def __init__(self, params: TokenParams, sim: Simulation, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        spec, n = self.spec, self.spec.num_clients
        assert sim.transport is not None, "build_simulation gives peer-to-peer protocols a node transport"
        self.transport = sim.transport
        self.walk, graph = walk_of(params, sim.scenario.components["topology"], n, spec.seed)
        self.edges = np.array(list(graph.edges), dtype=np.int64)
        self.walkers = params.tokens * params.repetitions
        """Tokens of every repetition; walker w is token w % tokens of repetition w // tokens."""
        self.walk_state = self.walk.start(nodes_from(self.walk.mu, walk_uniforms(spec.seed, 0, self.walkers)))
        self.models = StackedStore.replicate(sim.model.init_params, self.walkers)
        """Every walker's model (row w: walker w): with the walk's state, what a checkpoint saves."""
        self.token_bytes = tree_nbytes(sim.model.init_params) + (8 * n if self.walk.alpha > 0 else 0)
        self.bytes_sent = 0
        """Bytes every repetition's tokens sent so far (the rows report one repetition's: the mean)."""
        self.state["params"] = tree_map(torch.clone, sim.model.init_params)

    def state_dict(self) -> dict[str, Any]:
        walk = self.walk_state  # copies: the walk updates its arrays in place
        return {**super().state_dict(), "models": self.models.state_dict(), "bytes_sent": self.bytes_sent,
                "walk": {"position": walk.position.copy(), "previous": walk.previous.copy(),
                         "measure": walk.measure.copy(), "steps": walk.steps}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.models.load_state_dict(state["models"])
        self.bytes_sent = state["bytes_sent"]
        walk = state["walk"]
        self.walk_state = WalkState(np.array(walk["position"], dtype=np.int64),
                                    np.array(walk["previous"], dtype=np.int64),
                                    np.array(walk["measure"], dtype=np.float64), walk["steps"])

    def extra_metrics(self) -> dict[str, float]:
        """The variance across repetitions, the visit measures' distance to the target, one repetition's local
        steps; the mean visit measure goes on the node map."""
        tokens, repetitions = self.params.tokens, self.params.repetitions
        variance = 0.0
        for leaf in tree_flatten(self.models.stacked).values():
            runs = leaf.double().reshape(repetitions, tokens, -1).mean(1)
            variance += float(((runs - runs.mean(0)) ** 2).sum()) / repetitions
        measure = self.walk_state.measure
        self.recorder.timeline.map_nodes(self.edges, visits=measure.mean(0))
        return {"repetition_variance": variance,
                "visit_tv": float(total_variation(measure, self.walk.mu).mean()),
                "local_steps": self.server_steps * tokens * self.params.local_steps}

    def take_step(self, n: int) -> float:
        """Step n: every walker moves, the nodes reached train the tokens' models (the owned ones here), every model
        takes its step beta_{n+1} delta; returns the step's simulated seconds."""
        count, params = self.walkers, self.params
        if (n + 1) * count > MAX_JOB_IDS:
            raise ScenarioError(f"time_budget: step {n} of {count} tokens (tokens x repetitions) exceeds the "
                                f"{MAX_JOB_IDS} job ids; set rounds, or use fewer tokens or repetitions")
        walk = self.walk_state
        before = walk.position
        self.walk.advance(walk, walk_uniforms(self.spec.seed, n + 1, count))
        here, moved = walk.position, walk.position != before
        deltas, work = self._visits(n, here)
        totals = self.transport.sum({"delta": deltas, "work": torch.from_numpy(work)})
        if self.transport.lost:
            raise FedsimError(f"token: node(s) {', '.join(map(str, sorted(self.transport.lost)))} stopped answering "
                              f"at step {n}; every process keeps every token, so without their changes the "
                              f"processes' tokens would disagree; the run stops here and its rows so far are kept")
        beta = step_size(n + 1, params.b, params.beta0)
        stepped = tree_map(lambda x, d: torch.add(x, d.to(x.dtype), alpha=beta), self.models.stacked,
                           totals["delta"])
        self.models.scatter(torch.arange(count), stepped)
        self.state["params"] = self.models.mean()
        if not tree_is_finite(self.state["params"]):
            raise DivergenceError(
                f"variant {self.sim.scenario.variant}, round {n}: the tokens' mean model has NaN/inf parameters; the "
                f"run diverged; its metrics up to this round are kept; a smaller algorithm.lr or protocol.beta0 may "
                f"help")
        self.client_updates += params.tokens
        self.bytes_sent += int(moved.sum()) * self.token_bytes
        self.traffic.up = self.bytes_sent // params.repetitions
        done = totals["work"].long().numpy()
        systems = self.sim.systems
        seconds = systems.jobs_seconds(n * count + np.arange(count), here, done, moved * self.token_bytes, 0)
        return float(seconds.reshape(params.repetitions, params.tokens).max(1).mean())

    def _visits(self, n: int, here: np.ndarray) -> tuple[Pytree, np.ndarray]:
        """Each walker's model change from the local steps at the node it reached (zero where another process owns
        the node), stacked on the walker axis, and each one's work; this process's jobs go to the runtime in one
        call."""
        owned = self.transport.owned
        mine = np.flatnonzero((here >= owned.start) & (here < owned.stop))
        deltas = tree_map(torch.zeros_like, self.models.stacked)
        work = np.zeros(self.walkers, dtype=np.float64)
        if not mine.size:
            return deltas, work
        jobs = Jobs(n * self.walkers + mine, here[mine], self.params.local_steps, n)
        index = torch.from_numpy(mine)
        rows = self.models.stacked if mine.size == self.walkers else self.models.gather(index)
        results = run_stacked(self.sim.runtime, jobs, Stacked({"params": rows}))
        self.commit_all(results)
        work[mine] = results.work
        return tree_map(lambda d, s: d.index_copy(0, index, s.to(d.dtype)), deltas, results.messages["delta"]), work
