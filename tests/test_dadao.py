"""DADAO (`servers/dadao.py`): its constants, the keyed Poisson event stream and its dependency layers, the exact
ODE between events, the batched run against the events applied one at a time, linear convergence on distributed
ridge regression over a cycle (a neighbourhood of the optimum with stochastic gradients), runtimes, resume, and the
scenarios it refuses."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import networkx as nx
import numpy as np
import pytest
import scipy.linalg
import torch
from rulekit import assert_runtimes_agree, numbers, protocol_of

from fedsim.clock import Clock
from fedsim.errors import ScenarioError
from fedsim.registry import Entry
from fedsim.run_state import RunState
from fedsim.scenario import load_scenarios
from fedsim.servers.dadao import Y_TILDE, Constants, X, dependency_layers, propagators
from fedsim.state_tree import flatten_state, unflatten_state
from fedsim.topologies import TOPOLOGIES, GraphSequence, TopologyParams
from fedsim.topologies.spectral import chi_1, chi_2

N = 10
RIDGE = 1.0


def scenario(rounds: int = 6, runtime: str = "sequential", algorithm: dict | None = None,
             protocol: dict | None = None, topology: str = "ring", **data: Any) -> dict[str, Any]:
    """DADAO on distributed ridge regression: N nodes of least-squares data (3 features, 45 training rows each), a
    linear model, full-batch gradients (one minibatch holds a node's data) unless `algorithm` says otherwise."""
    return {
        "name": "dadao", "seed": 0, "rounds": rounds, "num_clients": N,
        "data": {"name": "least_squares", "num_features": 3, "samples_per_client": 50, **data},
        "model": {"name": "linear"}, "task": {"name": "regression", "ridge": RIDGE},
        "algorithm": {"name": "gradient", "batch_size": 64, **(algorithm or {})},
        "protocol": {"name": "dadao", **(protocol or {})}, "topology": {"name": topology},
        "runtime": {"name": runtime}, "evaluation": {"every": 1000},
    }


def pooled_optimum(protocol: Any) -> np.ndarray:
    """x* of sum_i f_i by numpy's lstsq on the pooled rows with the ridge rows appended (every node holds the same
    number of rows, so the pooled ridge problem has the same minimiser)."""
    data = protocol.sim.data
    assert len(set(data.train_sizes.tolist())) == 1
    x, y = data.x_train.double().numpy(), data.y_train.double().numpy()
    d = x.shape[1]
    stacked = np.vstack([x, math.sqrt(len(y) * RIDGE) * np.eye(d)])
    return np.linalg.lstsq(stacked, np.concatenate([y, np.zeros(d)]), rcond=None)[0]


def distances(mapping: dict[str, Any]) -> tuple[Any, np.ndarray, float]:
    """Run the scenario; (the protocol, (1/n) sum_i ||x_i - x*||^2 after each unit of time, the same at time 0)."""
    protocol = protocol_of(mapping)
    optimum = pooled_optimum(protocol)

    def error() -> float:
        x = protocol.node_models(float(protocol.server_steps))["1.weight"].double().numpy().reshape(N, -1)
        return float(((x - optimum) ** 2).sum(1).mean())

    errors, start = [], error()
    clock = Clock()
    protocol.start(clock)
    clock.run(protocol, lambda c: errors.append(error()))
    return protocol, np.array(errors[:-1]), start


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as runs use by default (`runtime.threads`); small batched matrix exponentials are several
    times slower with two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full_batch() -> tuple[Any, np.ndarray, float]:
    return distances(scenario(rounds=100))


def test_constants_follow_the_authors_code_for_given_L_mu_and_the_cycles_chi():
    L, mu = 4.0, 1.0
    c = Constants.of(L, mu, chi_1=26.18, rate_mix=15.35)
    root = math.sqrt(0.5 / 4.0)  # sqrt(nu / L), nu = mu / 2
    assert (c.nu, c.beta, c.delta_tilde) == (0.5, 0.5, 1.0)
    assert (c.alpha, c.alpha_tilde, c.eta, c.eta_tilde, c.delta) == pytest.approx(
        (root / 4, root / 8, root / 8, root / 8, root / 4), rel=1e-15)
    assert c.theta == pytest.approx(0.5 / root, rel=1e-15)
    assert c.beta_tilde == pytest.approx(2 * (26.18 / 15.35) / root, rel=1e-15)
    assert (c.gamma, c.gamma_tilde) == pytest.approx((1 / 16, 1 / (4 * math.sqrt(2.0))), rel=1e-15)
    M = c.ode_matrix()
    assert M[3, 1] == -c.theta * c.nu and M[3, 2] == M[3, 4] == -c.theta and M[5, 4] == c.alpha_tilde
    assert torch.allclose(M[:2].sum(1), torch.zeros(2, dtype=torch.float64))  # x, x~ relax toward each other

    protocol = protocol_of(scenario(protocol={"L": L, "mu": mu}))
    assert protocol.rate_mix == pytest.approx(math.sqrt(2 * 26.18 * 4.5), abs=5e-3)  # the notes' 15.35
    assert protocol.constants == Constants.of(L, mu, chi_1(nx.cycle_graph(N)), protocol.rate_mix)


def test_L_and_mu_of_linear_regression_are_the_extreme_eigenvalues_of_the_nodes_hessians():
    protocol = protocol_of(scenario())
    eigenvalues = []
    for k in range(N):
        x = protocol.sim.data.client_train(k)[0].double().numpy()
        eigenvalues.append(np.linalg.eigvalsh(x.T @ x / len(x) + RIDGE * np.eye(3)))
    assert protocol.L == pytest.approx(max(e[-1] for e in eigenvalues), rel=1e-10)
    assert protocol.mu == pytest.approx(min(e[0] for e in eigenvalues), rel=1e-10)
    assert 1.0 < protocol.mu < protocol.L


def test_the_event_stream_is_keyed_by_the_seed_and_runs_at_the_configured_rates():
    stream = protocol_of(scenario()).events
    again, other = protocol_of(scenario()).events, protocol_of(scenario() | {"seed": 1}).events
    for b in (0, 7):
        a, s = stream.unit(b), again.unit(b)
        for field in ("times", "node", "partner", "layer"):
            assert np.array_equal(getattr(a, field), getattr(s, field))
    assert not np.array_equal(stream.unit(0).times[:5], other.unit(0).times[:5])
    units = [stream.unit(b) for b in range(300)]
    gradients = np.concatenate([u.node[u.partner < 0] for u in units])
    talks = np.concatenate([np.stack([u.node, u.partner], 1)[u.partner >= 0] for u in units])
    for count, rate in ((len(gradients), N), (len(talks), stream.rate_mix)):
        assert abs(count - 300 * rate) < 4 * math.sqrt(300 * rate)  # Poisson counts within 4 sigma
    assert np.bincount(gradients, minlength=N).min() > 0.8 * len(gradients) / N
    ring = {(min(i, j), max(i, j)) for i, j in nx.cycle_graph(N).edges}
    assert {tuple(e) for e in talks.tolist()} == ring
    for b, u in enumerate(units[:20]):
        assert np.all(np.diff(u.times) >= 0) and u.times.min() >= b and u.times.max() < b + 1


def test_each_layer_touches_a_node_once_holds_one_kind_and_keeps_every_nodes_order():
    unit = protocol_of(scenario()).events.unit(3)
    seen: dict[int, int] = {}
    gradient_layers = 0
    for events in unit.layers():
        kinds = unit.partner[events] < 0
        assert kinds.all() or not kinds.any()
        gradient_layers += bool(kinds.all())
        nodes = np.concatenate([unit.node[events], unit.partner[events][~kinds]]).tolist()
        assert len(nodes) == len(set(nodes))
        for e in events.tolist():
            for node in {int(unit.node[e]), int(unit.partner[e])} - {-1}:
                assert seen.get(node, -1) < e  # a node's events run in time order
                seen[node] = e
    assert gradient_layers < int((unit.partner < 0).sum())  # gradient events are batched
    # a chain gradient(0) -> talk(0, 1) -> gradient(1) needs two gradient layers; gradient(2) joins the first
    layers = dependency_layers(np.array([0, 0, 1, 2]), np.array([-1, 1, -1, -1]), 3)
    assert layers.tolist() == [0, 1, 2, 0]


def test_between_events_the_ode_is_exact():
    """Euler's method with step h is off by O(h): its error against expm(M t) S shrinks threefold when h does."""
    M = Constants.of(2.0, 0.5, chi_1=9.0, rate_mix=9.0).ode_matrix()
    state = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0, 0.7], dtype=torch.float64)
    exact = (propagators(M, np.array([3.0]))[0] @ state).numpy()
    errors = []
    for steps in (5000, 15000):
        euler, step = state.numpy().copy(), 3.0 / steps * M.numpy()
        for _ in range(steps):
            euler = euler + step @ euler
        errors.append(np.abs(euler - exact).max())
    assert errors[0] < 1e-3 * np.abs(exact).max()
    assert errors[1] == pytest.approx(errors[0] / 3, rel=0.05)
    halves = propagators(M, np.array([1.25, 1.75]))
    np.testing.assert_allclose((halves[1] @ (halves[0] @ state)).numpy(), exact, rtol=1e-12, atol=1e-12)


def test_the_batched_run_equals_the_events_applied_one_at_a_time():
    """A plain reference: every event in time order on float64 numpy states, scipy's expm, gradients in closed
    form."""
    protocol = protocol_of(scenario(rounds=4))
    clock = Clock()
    protocol.start(clock)
    clock.run(protocol)
    c, M = protocol.constants, protocol.M.numpy()
    data = [tuple(t.double().numpy() for t in protocol.sim.data.client_train(k)) for k in range(N)]
    S, last = np.zeros((N, 6, 3)), np.zeros(N)

    def integrate(i: int, t: float) -> None:
        S[i] = scipy.linalg.expm(M * (t - last[i])) @ S[i]
        last[i] = t

    for b in range(4):
        unit = protocol.events.unit(b)
        for t, i, j in zip(unit.times.tolist(), unit.node.tolist(), unit.partner.tolist(), strict=True):
            integrate(i, t)
            if j < 0:
                a, y = data[i]
                G = a.T @ (a @ S[i, X] - y) / len(y) + RIDGE * S[i, X] - c.nu * S[i, X] - S[i, Y_TILDE]
                S[i, X] -= c.gamma * G
                S[i, 1] -= c.gamma_tilde * G
                S[i, Y_TILDE] += (c.delta + c.delta_tilde) * G
            else:
                integrate(j, t)
                m = S[i, 2] + S[i, 4] - S[j, 2] - S[j, 4]
                S[i, 4], S[j, 4] = S[i, 4] - c.beta * m, S[j, 4] + c.beta * m
                S[i, 5], S[j, 5] = S[i, 5] - c.beta_tilde * m, S[j, 5] + c.beta_tilde * m
    assert np.abs(S[:, X]).max() > 0.1
    np.testing.assert_allclose(protocol.t_last, last, rtol=0, atol=0)
    batched = protocol.nodes.stacked["1.weight"].double().numpy().reshape(N, 6, 3)
    np.testing.assert_allclose(batched, S, rtol=1e-4, atol=1e-5)


def test_full_gradients_converge_linearly_to_the_optimum_on_ridge_regression_over_a_cycle(full_batch):
    protocol, errors, start = full_batch
    assert start > 0.5 and len(errors) == 100
    t = np.arange(1, 101)
    late = t >= 20
    rate = -np.polyfit(t[late], np.log(errors[late]), 1)[0]
    assert rate > 0.03  # the notes' run decays like exp(-0.079 t)
    assert errors[-1] < 1e-6
    # geometric decay throughout: every 20 units cut the error at least 3-fold
    assert all(errors[k + 20] < errors[k] / 3 for k in range(19, 80, 20))
    row = protocol.recorder.rows[-1]
    assert row["gradient_events"] == protocol.gradients.sum() == protocol.client_updates
    assert abs(row["gradient_events"] - 100 * N) < 4 * math.sqrt(100 * N)
    assert row["bytes_up"] == 2 * protocol.model_bytes * row["communication_events"] > 0
    assert row["consensus_error"] < 1e-6


def test_stochastic_gradients_reach_a_neighbourhood_of_the_optimum_and_stay_there(full_batch):
    _, exact, start = full_batch
    _, errors, stochastic_start = distances(scenario(rounds=60, algorithm={"local_steps": 1, "batch_size": 20}))
    assert stochastic_start == start
    early, late = errors[30:45].mean(), errors[45:60].mean()
    assert late < start / 100
    assert late > 0.3 * early  # no longer decaying (full gradients fall about 5-fold over those 15 units)
    assert late > 10 * exact[45:60].mean()


def test_vectorized_equals_sequential_with_gradient_jobs_vmapped():
    def scenario_for(runtime: dict[str, str]) -> dict[str, Any]:
        vmapped = {"min_batch": 1} if runtime["name"] == "vectorized" else {}  # every layer's jobs in one vmap
        return scenario(rounds=6, runtime=runtime["name"]) | {"evaluation": {"every": 2}} | {
            "runtime": {**runtime, **vmapped}}

    rows = assert_runtimes_agree(scenario_for)
    assert rows["vectorized"][-1]["consensus_error"] > 1e-4
    assert rows["vectorized"][-1]["gradient_events"] == rows["sequential"][-1]["gradient_events"] > 0


def test_evaluating_integrates_a_copy_and_leaves_the_run_unchanged():
    often, rarely = (protocol_of(scenario(rounds=5) | {"evaluation": {"every": every}}) for every in (1, 5))
    for protocol in (often, rarely):
        clock = Clock()
        protocol.start(clock)
        clock.run(protocol)
    assert len(often.recorder.rows) == 6 and len(rarely.recorder.rows) == 2
    assert torch.equal(often.nodes.stacked["1.weight"], rarely.nodes.stacked["1.weight"])
    assert numbers(often.recorder.rows)[-1] == numbers(rarely.recorder.rows)[-1]


def test_a_run_resumed_from_its_saved_state_continues_identically():
    mapping = scenario(rounds=8) | {"evaluation": {"every": 2}}
    whole = protocol_of(mapping)
    saved = []

    def save_at_three(clock: Clock) -> None:
        if whole.server_steps == 3:
            saved.append(flatten_state(RunState(whole.sim, whole, clock, whole.recorder).state_dict()))

    clock = Clock()
    whole.start(clock)
    clock.run(whole, save_at_three)
    resumed = protocol_of(mapping)
    clock = Clock()
    RunState(resumed.sim, resumed, clock, resumed.recorder).load_state_dict(unflatten_state(*saved[0]))
    clock.run(resumed)
    assert torch.equal(resumed.nodes.stacked["1.weight"], whole.nodes.stacked["1.weight"])
    assert np.array_equal(resumed.t_last, whole.t_last) and resumed.communications == whole.communications
    assert numbers(resumed.recorder.rows) == numbers(whole.recorder.rows)


def test_a_periodic_topology_uses_graph_int_t_chi_1_and_the_worst_chi(monkeypatch):
    shuffled = nx.relabel_nodes(nx.cycle_graph(N), dict(enumerate([0, 2, 4, 6, 8, 1, 3, 5, 7, 9])))
    graphs = [nx.cycle_graph(N), nx.compose(shuffled, nx.path_graph(N))]

    def two_graphs(params: TopologyParams, num_nodes: int, seed: int) -> GraphSequence:
        return GraphSequence(lambda k: graphs[k], 2)

    monkeypatch.setitem(TOPOLOGIES._entries, "two_graphs", Entry("two_graphs", two_graphs, TopologyParams,
                                                                  {"client_server": False}))
    protocol = protocol_of(scenario(topology="two_graphs"))
    worst_1, worst_2 = max(chi_1(g) for g in graphs), max(chi_2(g) for g in graphs)
    assert protocol.rate_mix == pytest.approx(math.sqrt(2 * worst_1 * worst_2), rel=1e-12)
    unit = protocol.events.unit(2)
    talks = unit.partner >= 0
    for t, i, j in zip(unit.times[talks], unit.node[talks], unit.partner[talks], strict=True):
        assert graphs[int(t * worst_1) % 2].has_edge(int(i), int(j))
    assert len(set((unit.times[talks] * worst_1).astype(int) % 2)) == 2


def test_a_node_loss_that_is_not_strongly_convex_is_refused_naming_protocol_mu():
    rows_short = scenario(num_features=60) | {"task": {"name": "regression", "ridge": 0.0}}  # 45 rows, 60 features
    with pytest.raises(ScenarioError, match=r"^protocol\.mu: a node's loss is not strongly convex"):
        protocol_of(rows_short)


def directed_ring(params: TopologyParams, num_nodes: int, seed: int) -> nx.DiGraph:
    return nx.cycle_graph(num_nodes, create_using=nx.DiGraph)


@pytest.mark.parametrize(("change", "field"), [
    ({"protocol": {"name": "dadao", "L": 0.0}}, "protocol.L"),
    ({"protocol": {"name": "dadao", "mu": -1.0}}, "protocol.mu"),
    ({"protocol": {"name": "dadao", "L": 1.0, "mu": 2.0}}, "protocol.mu"),
    ({"algorithm": {"name": "fedavg", "lr": 0.1}}, "algorithm.name"),
    ({"topology": {"name": "directed_ring"}}, "topology.name"),
    ({"model": {"name": "mlp"}}, "protocol.L"),
    ({"systems": {"name": "homogeneous", "speed": 10.0}}, "systems"),
    ({"clients_per_round": 4}, "clients_per_round"),
])
def test_scenarios_dadao_cannot_run_are_one_line_errors_naming_the_field(monkeypatch, change, field):
    monkeypatch.setitem(TOPOLOGIES._entries, "directed_ring", Entry("directed_ring", directed_ring, TopologyParams,
                                                                     {"client_server": False}))
    with pytest.raises(ScenarioError) as info:
        load_scenarios(scenario() | change)
    message = str(info.value)
    assert message.startswith(f"{field}:") and "\n" not in message


def test_dsgd_refuses_the_gradient_rule_whose_message_it_cannot_carry():
    with pytest.raises(ScenarioError, match=r"^algorithm\.name: protocol 'dsgd' carries only \['delta'\]"):
        load_scenarios(scenario() | {"protocol": {"name": "dsgd"}})
