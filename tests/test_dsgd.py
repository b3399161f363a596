"""Decentralized SGD (`servers/dsgd.py`): FedAvg as its complete-graph special case, mixing that keeps the network
average and shrinks disagreement, vectorized nodes with per-node starts, ATC vs CTA, and its scenario checks."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from rulekit import finished, protocol_of, spread

import fedsim
from fedsim.errors import ScenarioError
from fedsim.params import tree_leaves, tree_map, tree_nbytes
from fedsim.runtime.vectorized import VectorizedRuntime
from fedsim.scenario import load_scenarios
from fedsim.topologies.mixing import consensus_error
from fedsim.topologies.spectral import spectral_gap

METRICS = ("loss", "accuracy", "test_loss")


def scenario(num_clients: int = 8, rounds: int = 3, runtime: str = "sequential", **protocol: Any) -> dict[str, Any]:
    """D-SGD on a ring of digits nodes (logistic regression), `protocol` overriding the protocol's parameters."""
    return {
        "name": "dsgd", "seed": 0, "rounds": rounds, "num_clients": num_clients,
        "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
        "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 1},
        "protocol": {"name": "dsgd", **protocol}, "topology": {"name": "ring"}, "runtime": {"name": runtime},
    }


def rows_of(mapping: dict[str, Any]) -> list[dict[str, Any]]:
    return fedsim.run(mapping, write=False).metrics.rows


def assert_metrics_close(rows: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [r["round"] for r in rows] == [r["round"] for r in expected]
    for row, want in zip(rows, expected, strict=True):
        for key in METRICS:
            assert row[key] == pytest.approx(want[key], rel=1e-5), (row["round"], key)


def test_atc_on_the_complete_graph_with_uniform_weights_is_fedavg_with_every_client():
    n = 3  # digits' iid split gives 3 clients exactly 539 training samples each
    base = scenario(num_clients=n, rounds=3) | {"topology": {"name": "complete"}}
    dsgd = base | {"protocol": {"name": "dsgd", "order": "atc", "mixing": {"name": "uniform_neighbour"}}}
    fedavg = {k: v for k, v in base.items() if k not in ("protocol", "topology")} | {
        "clients_per_round": n, "server": {"name": "fedavg", "weighting": "uniform"}}
    protocol = protocol_of(dsgd)
    assert set(protocol.sim.data.train_sizes.tolist()) == {539}
    assert torch.equal(protocol.graphs.at(0).W.to_dense(), torch.full((n, n), 1 / n, dtype=torch.float64))
    rows = rows_of(dsgd)
    assert_metrics_close(rows, rows_of(fedavg))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert all(r["consensus_error"] < 1e-20 for r in rows[1:])


def test_mixing_under_metropolis_hastings_on_a_ring_keeps_the_network_average():
    protocol = protocol_of(scenario(num_clients=7))
    spread(protocol)
    before, error = protocol.nodes.mean(), consensus_error(protocol.nodes.stacked)
    protocol.mix_nodes(0)
    tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-6), protocol.nodes.mean(), before)
    assert consensus_error(protocol.nodes.stacked) < 0.9 * error


def test_gossip_without_local_steps_shrinks_consensus_error_at_least_at_the_spectral_rate():
    protocol = finished(scenario(num_clients=8, rounds=6, local_steps=0), lambda p: spread(p, seed=1))
    errors = [row["consensus_error"] for row in protocol.recorder.rows]
    assert len(errors) == 7 and errors[0] > 1.0
    rate = (1 - spectral_gap(protocol.graphs.at(0).W)) ** 2
    assert rate < 1
    for before, after in zip(errors, errors[1:], strict=False):
        assert after <= rate * before * (1 + 1e-9)
    assert protocol.recorder.rows[-1]["bytes_up"] == 6 * 2 * 8 * tree_nbytes(protocol.sim.model.init_params)


def test_the_reported_consensus_error_is_the_mean_squared_distance_to_the_network_average():
    protocol = protocol_of(scenario(num_clients=7))
    spread(protocol, seed=2)
    reported = protocol.extra_metrics()["consensus_error"]
    assert reported > 1.0
    assert reported == pytest.approx(consensus_error(protocol.nodes.stacked), rel=1e-12)


def test_local_steps_make_ring_nodes_disagree_and_the_error_is_reported_each_row():
    rows = rows_of(scenario(num_clients=8, rounds=2, local_steps=3))
    assert [r["consensus_error"] for r in rows][0] == 0.0
    assert all(r["consensus_error"] > 1e-6 for r in rows[1:])


def test_vectorized_equals_sequential_and_runs_every_node_in_one_chunk_from_its_own_start(monkeypatch):
    n = 8
    calls: list[tuple[int, list[dict]]] = []
    original = VectorizedRuntime._run_chunk

    def spy(self, slot, jobs, states, starts):
        calls.append((len(jobs), starts))
        return original(self, slot, jobs, states, starts)

    sequential = rows_of(scenario(num_clients=n, rounds=3, local_steps=4))
    monkeypatch.setattr(VectorizedRuntime, "_run_chunk", spy)
    vectorized = rows_of(scenario(num_clients=n, rounds=3, runtime="vectorized", local_steps=4))
    assert_metrics_close(vectorized, sequential)
    for v, s in zip(vectorized, sequential, strict=True):
        assert v["consensus_error"] == pytest.approx(s["consensus_error"], rel=1e-4)
    assert [count for count, _ in calls] == [n] * 3
    stacked = VectorizedRuntime._stack_starts(calls[1][1])["params"]
    for leaf in stacked.values():
        assert leaf.shape[0] == n and leaf.stride(0) != 0
        rows = leaf.reshape(n, -1)
        assert all(not torch.equal(rows[i], rows[j]) for i in range(n) for j in range(i + 1, n))


def test_cta_and_atc_both_reduce_the_loss_and_cta_nodes_are_atc_nodes_before_their_mixing():
    # From a common start with doubly stochastic W, CTA's nodes after t rounds are ATC's half-step (pre-mixing)
    # nodes: W x_cta(t) = x_atc(t). So the network averages (and their loss) agree, and CTA's rows report the
    # larger, unmixed consensus error.
    mapping = scenario(num_clients=8, rounds=3, local_steps=5) | {"partition": {"name": "labeldir", "alpha": 0.3}}
    atc, cta = (finished(mapping | {"protocol": {"name": "dsgd", "order": order, "local_steps": 5}})
                for order in ("atc", "cta"))
    for protocol in (atc, cta):
        assert protocol.recorder.rows[-1]["loss"] < protocol.recorder.rows[0]["loss"] - 0.1
    assert cta.recorder.rows[-1]["loss"] == pytest.approx(atc.recorder.rows[-1]["loss"], rel=1e-6)
    for a, c in zip(atc.recorder.rows[1:], cta.recorder.rows[1:], strict=True):
        assert c["consensus_error"] > 1.5 * a["consensus_error"] > 0
    assert not all(torch.allclose(c, a, atol=1e-3)
                   for c, a in zip(tree_leaves(cta.nodes.stacked), tree_leaves(atc.nodes.stacked), strict=True))
    cta.mix_nodes(0)
    tree_map(lambda c, a: torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6), cta.nodes.stacked,
             atc.nodes.stacked)


def test_a_round_lasts_as_long_as_the_slowest_node_trains_and_sends_to_its_neighbours():
    mapping = scenario(num_clients=6, rounds=2, local_steps=2)
    rows = rows_of(mapping)
    model_bytes = tree_nbytes(protocol_of(mapping).sim.model.init_params)
    # homogeneous systems: 0.05 s latency each way, 1000 samples/s, 1e6 B/s up; 2 steps of 20; 2 neighbours
    per_round = 0.05 + 40 / 1000 + 0.05 + 2 * model_bytes / 1e6
    assert [r["sim_time"] for r in rows] == pytest.approx([0.0, per_round, 2 * per_round], rel=1e-12)
    assert [r["bytes_up"] for r in rows] == [0, 12 * model_bytes, 24 * model_bytes]
    assert all(r["bytes_down"] == 0 for r in rows)


@pytest.mark.parametrize(("change", "field"), [
    ({"protocol": {"name": "dsgd"}, "topology": {"name": "star"}}, "topology.name"),
    ({"protocol": {"name": "synchronous"}, "topology": {"name": "ring"}, "clients_per_round": 4}, "topology.name"),
    ({"protocol": {"name": "dsgd", "mixing": {"name": "nope"}}}, "protocol.mixing"),
    ({"protocol": {"name": "dsgd", "order": "both"}}, "protocol.order"),
    ({"protocol": {"name": "dsgd", "local_steps": -1}}, "protocol.local_steps"),
])
def test_scenarios_dsgd_cannot_run_are_one_line_errors_naming_the_field(change, field):
    with pytest.raises(ScenarioError) as info:
        load_scenarios(scenario() | change)
    message = str(info.value)
    assert message.startswith(f"{field}:") and "\n" not in message


@pytest.mark.parametrize(("change", "field"), [
    ({"clients_per_round": 4}, "clients_per_round"),
    ({"stragglers": {"fraction": 0.5}}, "stragglers.fraction"),
    ({"server": {"name": "fedadam"}}, "server.name"),
])
def test_settings_dsgd_would_ignore_are_refused(change, field):
    with pytest.raises(ScenarioError) as info:
        protocol_of(scenario() | change)
    assert str(info.value).startswith(f"{field}:") and "\n" not in str(info.value)


def test_default_local_steps_are_local_epochs_over_each_nodes_minibatches():
    protocol = protocol_of(scenario(num_clients=8) | {
        "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 2}})
    sizes = protocol.sim.data.train_sizes
    assert protocol.steps.tolist() == [2 * math.ceil(s / 20) for s in sizes.tolist()]


def test_nodes_mix_without_lost_peers_on_rows_renormalized_to_one():
    """When the transport reports node 3 lost (a peer deployment), the others mix only among themselves: with equal
    models everywhere but a zeroed node 3, nodes 0-2 keep their model exactly (a row with 3's weight left in would
    pull nodes 2 and 4 towards zero), and averages count the nodes left."""
    protocol = protocol_of(scenario(num_clients=6))
    rows = tree_map(torch.ones_like, protocol.nodes.stacked)
    for leaf in rows.values():
        leaf[3] = 0.0
    protocol.nodes.scatter(torch.arange(6), rows)
    protocol.transport.lost = frozenset({3})
    protocol.mix_nodes(0)
    for leaf in protocol.nodes.stacked.values():
        assert torch.equal(leaf[[0, 1, 2, 4, 5]], torch.ones_like(leaf[[0, 1, 2, 4, 5]]))
    assert protocol.alive() == 5 and protocol.extra_metrics()["nodes_lost"] == 1
