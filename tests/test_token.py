"""The token protocol (`servers/token.py`): each visit moves a token by -beta_{n+1} times the node's gradient,
tokens reduce the loss, repetitions measure the variance across runs, bytes and time per hop, vectorized equals
sequential in one batch per step, a run resumed from its run state is identical, the same seed walks the same
walk, and bad settings are one line naming the field."""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import pytest
import torch
from rulekit import assert_runtimes_agree, finished, protocol_of, restarted_rows

import fedsim
from fedsim.errors import FedsimError, ScenarioError
from fedsim.params import tree_leaves, tree_nbytes
from fedsim.registry import Entry
from fedsim.runtime.vectorized import VectorizedRuntime
from fedsim.topologies import TOPOLOGIES, GraphSequence, TopologyParams
from fedsim.topologies.walks import nodes_from, walk_uniforms


def scenario(num_clients: int = 8, rounds: int = 10, runtime: str = "sequential", **protocol: Any) -> dict[str, Any]:
    """Tokens on a ring of digits nodes (logistic regression), `protocol` overriding the protocol's parameters."""
    return {
        "name": "token", "seed": 0, "rounds": rounds, "num_clients": num_clients,
        "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
        "algorithm": {"name": "fedavg", "lr": 0.5, "batch_size": 20},
        "protocol": {"name": "token", **protocol}, "topology": {"name": "ring"}, "runtime": {"name": runtime},
        "output": {"plot": False},
    }


def kite(params: TopologyParams, num_nodes: int, seed: int) -> nx.Graph:
    """A triangle with a tail (degrees 2, 2, 3, 2, 1): Metropolis walks to uniform keep self-loops on it."""
    return nx.Graph([(0, 1), (0, 2), (1, 2), (2, 3), (3, 4)])


def halves(params: TopologyParams, num_nodes: int, seed: int) -> nx.Graph:
    return nx.Graph([(0, 1), (2, 3), (3, 4)])


def directed(params: TopologyParams, num_nodes: int, seed: int) -> nx.DiGraph:
    return nx.DiGraph([(i, (i + 1) % num_nodes) for i in range(num_nodes)])


def alternating(params: TopologyParams, num_nodes: int, seed: int) -> GraphSequence:
    return GraphSequence(lambda k: nx.cycle_graph(num_nodes) if k == 0 else nx.complete_graph(num_nodes), 2)


@pytest.fixture
def test_graphs(monkeypatch) -> None:
    for fn in (kite, halves, directed, alternating):
        name = f"test_{fn.__name__}"
        monkeypatch.setitem(TOPOLOGIES._entries, name, Entry(name, fn, TopologyParams, {"client_server": False}))


def test_each_visit_moves_the_token_by_minus_beta_times_the_node_s_full_gradient():
    # With lr 1, one local step and a batch holding the node's whole data, delta = -grad F_i(theta_n) exactly, so
    # theta_{n+1} = theta_n - beta0 (n+2)^(-b) grad F_{X_{n+1}}(theta_n): replayed here along the keyed walk.
    steps, beta0, b = 5, 0.3, 0.8
    mapping = {**scenario(num_clients=6, rounds=steps, tokens=2, repetitions=2, alpha=2.0, a=0.7, b=b, beta0=beta0),
               "data": {"name": "least_squares", "samples_per_client": 30}, "model": {"name": "linear"},
               "algorithm": {"name": "fedavg", "lr": 1.0, "batch_size": 1000}}
    protocol = finished(mapping)
    walk, sim, walkers = protocol.walk, protocol.sim, 4
    state = walk.start(nodes_from(walk.mu, walk_uniforms(0, 0, walkers)))
    thetas = [dict(sim.model.init_params) for _ in range(walkers)]
    visited = set()
    for n in range(steps):
        walk.advance(state, walk_uniforms(0, n + 1, walkers))
        for w, node in enumerate(state.position.tolist()):
            x, y = sim.data.client_train(node)
            params = {k: v.detach().clone().requires_grad_(True) for k, v in thetas[w].items()}
            grads = torch.autograd.grad(sim.objective.mean_loss(params, x, y), list(params.values()))
            thetas[w] = {k: v.detach() - beta0 * (n + 2) ** -b * g for (k, v), g in zip(params.items(), grads,
                                                                                       strict=True)}
            visited.add(node)
    assert len(visited) > 2 and np.array_equal(protocol.walk_state.position, state.position)
    for w, theta in enumerate(thetas):
        for key, value in theta.items():
            torch.testing.assert_close(protocol.models.stacked[key][w], value, rtol=1e-5, atol=1e-6)
    row = protocol.recorder.rows[-1]
    assert row["distance_to_optimum"] < protocol.recorder.rows[0]["distance_to_optimum"]


def test_tokens_walking_a_ring_reduce_the_loss_and_report_their_walk():
    rows = fedsim.run(scenario(rounds=30, tokens=2, a=0.8, b=0.6) | {"evaluation": {"every": 10}},
                      write=False).metrics.rows
    assert [r["round"] for r in rows] == [0, 10, 20, 30]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5 and rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.3
    assert [r["local_steps"] for r in rows] == [0, 20, 40, 60] and rows[-1]["client_updates"] == 60
    assert rows[0]["visit_tv"] == 0.0 and all(0 < r["visit_tv"] < 1 for r in rows[1:])  # x_0 is the target
    assert all(r["repetition_variance"] == 0.0 for r in rows)  # one repetition


def test_repetitions_walk_apart_from_one_start_and_their_spread_is_the_reported_variance():
    protocol = finished(scenario(rounds=6, tokens=2, repetitions=3))
    measures = protocol.walk_state.measure.reshape(3, -1)
    assert len({tuple(m) for m in measures.tolist()}) == 3  # each repetition walked its own walk
    leaves = [leaf.double().reshape(3, 2, -1).mean(1) for leaf in tree_leaves(protocol.models.stacked)]
    spread = sum(float(((runs - runs.mean(0)) ** 2).sum()) for runs in leaves) / 3
    rows = protocol.recorder.rows
    assert rows[0]["repetition_variance"] == 0.0 and rows[-1]["repetition_variance"] == pytest.approx(spread)
    assert spread > 1e-4
    mean = {k: v.double().mean(0) for k, v in protocol.models.stacked.items()}
    for key, value in protocol.state["params"].items():
        torch.testing.assert_close(value.double(), mean[key], rtol=1e-6, atol=1e-7)


def test_a_hop_sends_the_model_and_srrw_s_visit_measure_and_lasts_as_long_as_the_slowest_token():
    mapping = scenario(num_clients=6, rounds=3, tokens=2, repetitions=2, local_steps=2)
    protocol = finished(mapping)
    model_bytes = tree_nbytes(protocol.sim.model.init_params)
    token_bytes = model_bytes + 8 * 6  # the ring is regular: Metropolis to uniform never stays, every hop moves
    # homogeneous systems: 0.05 s latency each way, 1000 samples/s, 1e7 B/s down; 2 steps of 20 samples
    per_step = 0.05 + token_bytes / 1e7 + 40 / 1000 + 0.05
    rows = protocol.recorder.rows
    assert [r["sim_time"] for r in rows] == pytest.approx([0.0, per_step, 2 * per_step, 3 * per_step], rel=1e-12)
    assert [r["bytes_up"] for r in rows] == [0, 2 * token_bytes, 4 * token_bytes, 6 * token_bytes]
    assert all(r["bytes_down"] == 0 for r in rows)


def test_srrw_without_self_repellence_sends_the_model_alone():
    protocol = finished(scenario(num_clients=6, rounds=2, alpha=0.0))
    assert protocol.recorder.rows[-1]["bytes_up"] == 2 * tree_nbytes(protocol.sim.model.init_params)


def test_a_token_that_stays_on_a_self_loop_sends_nothing(test_graphs):
    mapping = scenario(num_clients=5, rounds=40, walk="mhrw", repetitions=4) | {"topology": {"name": "test_kite"},
                                                                               "evaluation": {"every": 40}}
    moves = []

    def count_moves(protocol) -> None:
        advance = protocol.walk.advance

        def counted(state, uniforms):
            before = state.position
            advance(state, uniforms)
            moves.append(int((state.position != before).sum()))

        protocol.walk.advance = counted

    protocol = finished(mapping, count_moves)
    model_bytes = tree_nbytes(protocol.sim.model.init_params)
    assert len(moves) == 40 and sum(moves) < 40 * 4  # some hops stayed (P_00 = 1/6, P_44 = 1/2)
    assert protocol.recorder.rows[-1]["bytes_up"] == sum(moves) * model_bytes // 4  # mean over repetitions


def test_vectorized_equals_sequential_with_every_token_of_every_repetition_in_one_batch_per_step(monkeypatch):
    calls: list[int] = []
    original = VectorizedRuntime._run_chunk

    def spy(self, slot, jobs, states, starts):
        calls.append(len(jobs))
        return original(self, slot, jobs, states, starts)

    monkeypatch.setattr(VectorizedRuntime, "_run_chunk", spy)
    rows = assert_runtimes_agree(lambda runtime: scenario(rounds=4, tokens=3, repetitions=2, runtime=runtime["name"]))
    assert calls == [6] * 4
    assert rows["vectorized"][-1]["repetition_variance"] > 0


def test_a_run_resumed_from_its_run_state_gives_the_uninterrupted_rows_bit_for_bit():
    mapping = scenario(rounds=8, tokens=2, repetitions=2, alpha=3.0, runtime="vectorized")
    whole = restarted_rows(mapping, None)
    assert whole[-1]["repetition_variance"] > 0
    for stop_after in (1, 5):
        assert restarted_rows(mapping, stop_after) == whole, stop_after


def test_the_same_seed_walks_the_same_walk_and_another_seed_another():
    def walked(seed: int):
        protocol = finished(scenario(rounds=5, tokens=2, repetitions=2) | {"seed": seed})
        return protocol.walk_state, protocol.recorder.rows[-1]

    (first, row), (again, row_again), (other, _) = walked(0), walked(0), walked(1)
    assert np.array_equal(first.position, again.position) and np.array_equal(first.measure, again.measure)
    assert {k: v for k, v in row.items() if k != "wall_time"} == {k: v for k, v in row_again.items()
                                                                 if k != "wall_time"}
    assert not np.array_equal(first.measure, other.measure)


@pytest.mark.parametrize(("change", "message"), [
    ({"protocol": {"name": "token", "alpha": -1.0}}, r"^protocol\.alpha: Input should be greater than or equal to 0"),
    ({"protocol": {"name": "token", "walk": "mhrw", "alpha": 2.0}}, r"^protocol\.alpha: only the srrw walk is "
                                                                     r"self-repellent"),
    ({"protocol": {"name": "token", "a": 0.5}}, r"^protocol\.a: Input should be greater than 0\.5"),
    ({"protocol": {"name": "token", "b": 1.5}}, r"^protocol\.b: Input should be less than or equal to 1"),
    ({"protocol": {"name": "token", "target": [0.0, 0.25, 0.25, 0.25, 0.25]}},
     r"^protocol\.target: every node needs a positive finite probability; node 0 has 0\.0$"),
    ({"protocol": {"name": "token", "target": [0.3, 0.3, 0.3, 0.3, -0.2]}}, r"^protocol\.target: .*node 4 has -0\.2"),
    ({"protocol": {"name": "token", "target": [0.2, 0.2, 0.2, 0.2, 0.1]}},
     r"^protocol\.target: the probabilities sum to 0\.9.*, not 1$"),
    ({"protocol": {"name": "token", "target": [0.5, 0.5]}}, r"^protocol\.target: needs one number per node \(5\)"),
    ({"protocol": {"name": "token", "walk": "simple", "target": "uniform"}},
     r"^protocol\.target: a simple walk visits nodes in proportion to their degree"),
    ({"clients_per_round": 2}, r"^clients_per_round: protocol 'token' visits the nodes its tokens reach"),
    ({"server": {"name": "fedadam"}}, r"^server\.name: protocol 'token' moves models along walks"),
    ({"topology": {"name": "star"}}, r"^topology\.name: protocol 'token' runs on a peer-to-peer graph"),
    ({"topology": {"name": "test_halves", "allow_disconnected": True}},
     r"^topology: a random walk needs a connected graph; this one has 2 components"),
    ({"topology": {"name": "test_directed"}}, r"^topology: a random walk needs an undirected graph"),
    ({"topology": {"name": "test_alternating"}}, r"^topology\.name: token walks need a fixed graph; "
                                                  r"'test_alternating' changes with the round"),
    ({"rounds": 2**31, "protocol": {"name": "token", "tokens": 2, "repetitions": 2}}, r"^rounds: 2147483648 steps "
                                                                                      r"of 4 tokens"),
])
def test_bad_token_settings_are_one_line_naming_the_field(test_graphs, change, message):
    mapping = {**scenario(num_clients=5, rounds=2), "topology": {"name": "test_kite"}, **change}
    with pytest.raises(ScenarioError, match=message):
        fedsim.run(mapping, write=False)


def test_protocol_of_builds_the_walk_from_the_scenario_s_graph(test_graphs):
    protocol = protocol_of({**scenario(num_clients=5), "topology": {"name": "test_kite"},
                            "protocol": {"name": "token", "walk": "mhrw", "target": "degree"}})
    np.testing.assert_allclose(protocol.walk.mu, np.array([2, 2, 3, 2, 1]) / 10)
    assert protocol.walk.alpha == 0.0 and protocol.walkers == 1


def test_a_lost_peer_stops_a_token_run_with_one_line_naming_the_node():
    protocol = protocol_of(scenario(rounds=3))
    protocol.transport.lost = frozenset({2})
    with pytest.raises(FedsimError, match=r"^token: node\(s\) 2 stopped answering at step 0; every process keeps"):
        protocol.take_step(0)
