"""Builds everything one run needs from a resolved scenario: data, task and model, rules, protocol class, runtime,
systems, evaluator, and the client state store."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fedsim.clients import BatchingParams, ClientRule
from fedsim.codecs import Codec, build_codec
from fedsim.data import build_federated_data
from fedsim.data.base import ClientDataSource
from fedsim.errors import DataError, ScenarioError
from fedsim.evaluation import Evaluator, no_reduce
from fedsim.models import Model, build_model
from fedsim.params import Pytree, tree_leaves
from fedsim.personal import PersonalEvaluator, has_personal_model
from fedsim.privacy import Population, PrivacySpend, build_spend, client_rate
from fedsim.registry import Params
from fedsim.runtime import RUNTIMES, Runtime, mpi
from fedsim.runtime.base import RuntimeParams
from fedsim.runtime.context import ClientStateStore, RuntimeContext, StateStore
from fedsim.runtime.node_transport import LocalTransport, NodeTransport
from fedsim.runtime.state_store import SpillingStateStore
from fedsim.sampling import full_steps
from fedsim.scenario import Component, ResolvedScenario
from fedsim.seeding import Stream, derive_seed, numpy_rng
from fedsim.servers import ServerRule
from fedsim.systems import ClientSystems
from fedsim.tasks import Objective


@dataclass
class Simulation:
    scenario: ResolvedScenario
    data: ClientDataSource
    objective: Objective
    rule: ClientRule
    server: ServerRule
    runtime: Runtime
    states: StateStore
    codec_states: StateStore
    downlink: Codec
    systems: ClientSystems
    evaluator: Evaluator
    notices: list[str]
    transport: NodeTransport | None = None
    """Gossip protocols' nodes over processes (None for client/server protocols)."""
    personal: PersonalEvaluator | None = None
    """Scores clients' personal models, for rules that keep one (`rule.personalize`)."""
    privacy: PrivacySpend | None = None
    """What a private run has spent (epsilon per accountant), for runs with a `privacy` section."""

    @property
    def model(self) -> Model:
        return self.objective.model


def state_store(params: RuntimeParams) -> StateStore:
    """All client states in memory, or with `runtime.state_memory` set, the most recent in that many bytes and
    the rest spilled to disk (under `runtime.spill_dir`, else a temporary directory)."""
    if params.state_memory is None:
        return ClientStateStore()
    return SpillingStateStore(params.state_memory, params.spill_dir)


def evaluation_clients(count: int | None, num_clients: int, seed: int) -> list[int] | None:
    """All clients (None), or a fixed sample of `count` of them drawn once from the seed, for populations too
    large to evaluate whole every time."""
    if count is None or count >= num_clients:
        return None
    return sorted(numpy_rng(seed, Stream.EVALUATION).choice(num_clients, count, replace=False).tolist())


def check_downlink_mirror(downlink: Codec, template: Pytree, scenario: ResolvedScenario) -> None:
    """Refuse a downlink codec whose receivers keep a mirror of the server's state (EF21-style error feedback)
    unless every client hears every broadcast (synchronous rounds of all clients): the simulation decodes each
    broadcast once for all clients, which a client that missed one could not."""
    if not any(True for _ in tree_leaves(downlink.shared(downlink.init(template)))):
        return
    spec, protocol = scenario.spec, scenario.components["protocol"]
    everyone = spec.clients_per_round in (None, spec.num_clients) and not protocol.entry.meta.get("asynchronous")
    if not everyone:
        raise ScenarioError(f"compression.downlink.error_feedback: clients keep a mirror of the server's state, so "
                            f"every client must hear every broadcast; protocol {protocol.name!r} with "
                            f"clients_per_round {spec.clients_per_round} of {spec.num_clients} does not: use ef14 or "
                            f"none, or every client every round")


def check_poisson_sampling(hp: BatchingParams, train_sizes: np.ndarray) -> None:
    """Poisson sampling takes each of a client's n samples with probability batch_size / n: refuse clients with fewer
    than batch_size samples (a probability above 1) in one line naming the field."""
    if hp.sampling != "poisson" or not len(train_sizes) or int(np.min(train_sizes)) >= hp.batch_size:
        return
    client = int(np.argmin(train_sizes))
    raise ScenarioError(f"algorithm.batch_size: Poisson sampling takes each sample with probability batch_size / n, "
                        f"but client {client} holds {int(train_sizes[client])} training samples, fewer than "
                        f"batch_size {hp.batch_size}; lower batch_size or give every client more data")


def private_spend(component: Component, server: Component, hp: BatchingParams, population: Population,
                  rounds: int | None) -> tuple[PrivacySpend, Params, str | None]:
    """A private run's spend, the mechanism's parameters with the noise multiplier it runs with (calibrated to
    `target_epsilon` when asked), and a notice of the calibration. A sample-level mechanism releases at every local
    step, each a Poisson sample of rate batch_size / n of a client's data (the smallest client's rate bounds every
    client's), and calibration plans for a client that takes a full job every round (an upper bound: with fewer
    clients per round, epsilon comes out lower); a user-level one releases once per round, at the rate the protocol
    samples clients with (`check_privacy` has made sure it has one); a server-scheduled one releases what its
    schedule says at each server step."""
    sizes, unit, schedule = population.train_sizes, component.entry.meta["unit"], None
    if unit == "sample":
        rate = hp.batch_size / int(np.min(sizes))
        step_bound = int(full_steps(sizes, hp.local_epochs, hp.batch_size, hp.local_steps).max(initial=0))
    elif unit == "user":
        rate, step_bound = population.client_rate, 1
    else:
        schedule = component.entry.meta["schedule"](component.params, server.params, population)
        rate = max(r.sampling_rate for r in schedule(component.params.noise_multiplier, max(1, rounds or 0)))
        step_bound = 1
    spend, sigma, notice = build_spend(component.params, unit, rate, step_bound, (rounds or 0) * step_bound,
                                       len(sizes), schedule)
    return spend, component.params.model_copy(update={"noise_multiplier": sigma}), notice


def build_simulation(scenario: ResolvedScenario, data: ClientDataSource | None = None,
                     transport: NodeTransport | None = None) -> Simulation:
    """Instantiate every component, drawing each one's randomness from its own seed stream; `data` may be
    passed in when another variant already built the same data set. Under MPI, rank 0 builds the data and each
    rank keeps its own clients' share (striped for client/server protocols, a contiguous block of nodes for gossip
    protocols: see `fedsim.runtime.mpi`). With `transport`, this process is one node of a peer deployment (`fedsim
    peer`): it evaluates its own share and sums over the peers."""
    spec, c = scenario.spec, scenario.components
    comm = mpi.world()
    gossip = bool(c["protocol"].entry.meta.get("peer_to_peer"))
    owned = mpi.owned_clients(spec.num_clients, comm, gossip) if comm is not None else None
    if data is None or (comm is not None and not mpi.every_rank_holds(comm, data, owned)):
        build = functools.partial(build_federated_data, c["data"].name, c["data"].params, c["partition"].name,
                                  c["partition"].params, spec.num_clients, spec.seed)
        data = build() if comm is None else mpi.distribute_data(comm, build, gossip)
    if data.num_clients != spec.num_clients:
        raise DataError(f"num_clients: the data set built {data.num_clients} clients, not {spec.num_clients}")
    model = build_model(c["model"].name, c["model"].params, data.feature_shape, data.num_classes,
                        derive_seed(spec.seed, Stream.MODEL))
    objective = Objective(model, c["task"].entry.obj(c["task"].params))
    rule = c["algorithm"].entry.obj(c["algorithm"].params)
    check_poisson_sampling(rule.hp, data.train_sizes)
    privacy, notices = None, []
    server = c["server"].entry.obj(c["server"].params)
    if "privacy" in c:
        rate = client_rate(c["protocol"], spec.clients_per_round, spec.num_clients)
        population = Population(np.asarray(data.train_sizes), rate)
        privacy, params, notice = private_spend(c["privacy"], c["server"], rule.hp, population, spec.rounds)
        notices += [notice] if notice else []
        rule, server = c["privacy"].entry.obj(params, rule, server, population)
    runtime_entry, runtime_params = c["runtime"].entry, c["runtime"].params
    if runtime_entry.meta.get("vectorized") and not c["algorithm"].entry.meta.get("vectorizable", True):
        notices.append(f"algorithm {c['algorithm'].name} cannot run vectorized; running it sequentially")
        runtime_entry = RUNTIMES.get("sequential")
        runtime_params = runtime_entry.params(**{k: getattr(runtime_params, k) for k in RuntimeParams.model_fields})
    states, codec_states = state_store(runtime_params), ClientStateStore()
    uplink = build_codec(spec.compression.uplink, "compression.uplink")
    uplink.check(model.init_params, "compression.uplink")
    context = RuntimeContext(rule, objective, data, spec.seed, states, uplink, codec_states)
    runtime = runtime_entry.obj(runtime_params, context)
    evaluated = evaluation_clients(spec.evaluation.clients, data.num_clients, spec.seed)
    everyone = evaluated if evaluated is not None else range(data.num_clients)
    if transport is not None:  # a process per node (`fedsim peer`): evaluate this node's share, sum over peers
        mine, reduce = [k for k in everyone if k in transport.owned], transport.sum
    elif comm is None:
        transport = LocalTransport(spec.num_clients) if gossip else None
        mine, reduce = evaluated, no_reduce
    else:
        if gossip:  # the protocol runs only its own nodes' jobs: the runtime stays this rank's
            transport = mpi.MPINodeTransport(comm, spec.num_clients)
            reduce = transport.sum
        else:
            runtime = mpi.MPIRuntime(runtime, comm)
            reduce = runtime.reduce_sums
        held = set(owned)
        mine = [k for k in everyone if k in held]
        notices.append(f"running on {comm.Get_size()} MPI ranks")
    evaluator = Evaluator(objective, data, spec.evaluation.dissimilarity, mine, reduce, spec.evaluation.gradient_norm)
    personal = PersonalEvaluator(rule, objective, data, states, everyone, everyone if mine is None else mine,
                                 reduce) if has_personal_model(rule) else None
    systems = c["systems"].entry.obj(c["systems"].params, spec.num_clients, numpy_rng(spec.seed, Stream.SYSTEMS))
    downlink = build_codec(spec.compression.downlink, "compression.downlink")
    downlink.check(model.init_params, "compression.downlink")
    check_downlink_mirror(downlink, server.broadcast(server.init(model.init_params)), scenario)
    return Simulation(scenario, data, objective, rule, server, runtime, states, codec_states, downlink, systems,
                      evaluator, notices, transport, personal, privacy)
