"""Time-varying and directed topologies in the core: each round mixes over its own graph, exchanges are re-planned
when the graph changes, and directed edges bring rows one way only."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from rulekit import finished, numbers, protocol_of, spread

import fedsim
from fedsim.errors import ScenarioError
from fedsim.registry import Entry
from fedsim.runtime.node_transport import block_partition, halo_plan
from fedsim.topologies import TOPOLOGIES, GraphSequence, TopologyParams
from fedsim.topologies.mixing import mixing_matrix
from fedsim.topologies.schedule import Topology


def hypercube_matchings(params: TopologyParams, num_nodes: int, seed: int) -> GraphSequence:
    """Round t pairs node i with i XOR 2^(t mod log2 n): one peer per node, every dimension once per period."""
    dims = num_nodes.bit_length() - 1
    return GraphSequence(lambda k: nx.Graph([(i, i ^ (1 << k)) for i in range(num_nodes)]), dims)


def fresh_rings(params: TopologyParams, num_nodes: int, seed: int) -> GraphSequence:
    """A ring over a random order of the nodes each round (no period)."""

    def ring(t: int) -> nx.Graph:
        order = torch.randperm(num_nodes, generator=torch.Generator().manual_seed(seed + t)).tolist()
        graph = nx.Graph()
        graph.add_nodes_from(range(num_nodes))
        graph.add_edges_from(zip(order, order[1:] + order[:1], strict=True))
        return graph

    return GraphSequence(ring, None)


@pytest.fixture
def sequences(monkeypatch) -> None:
    for name, fn in [("test_matchings", hypercube_matchings), ("test_fresh_rings", fresh_rings)]:
        monkeypatch.setitem(TOPOLOGIES._entries, name, Entry(name, fn, TopologyParams, {"client_server": False}))


def gossip_only(tiny, topology: str, rounds: int, n: int = 8, **extra) -> dict:
    return {**tiny, "num_clients": n, "clients_per_round": None, "rounds": rounds,
            "protocol": {"name": "dsgd", "local_steps": 0, **extra}, "topology": {"name": topology}}


def test_one_peer_hypercube_matchings_reach_the_exact_average_after_one_period(tiny, sequences):
    protocol = finished(gossip_only(tiny, "test_matchings", rounds=3), spread)
    errors = [row["consensus_error"] for row in protocol.recorder.rows]
    assert errors[0] > 1.0 and errors[1] > 0.1 and errors[2] > 0.01
    assert errors[3] < 1e-10
    assert [protocol.topology.index(t) for t in range(5)] == [0, 1, 2, 0, 1]
    bytes_per_round = 8 * protocol.model_bytes
    assert protocol.recorder.rows[-1]["bytes_up"] == 3 * bytes_per_round


def test_each_round_mixes_over_its_own_graph_and_a_sequence_without_period_keeps_only_the_latest(tiny, sequences):
    protocol = protocol_of(gossip_only(tiny, "test_fresh_rings", rounds=3))
    released = []
    first = protocol.graphs.at(0)
    first.neighbourhood.release = lambda: released.append(0)
    assert protocol.graphs.at(0) is first
    second = protocol.graphs.at(1)
    assert released == [0] and not torch.equal(first.W.to_dense(), second.W.to_dense())
    assert list(protocol.graphs._built) == [1]


def test_a_sequence_disconnected_over_its_period_is_refused_naming_its_components(tiny, monkeypatch):
    def halves(params, num_nodes, seed):
        return GraphSequence(lambda k: nx.Graph([(0, 1), (2, 3)]), 2)

    monkeypatch.setitem(TOPOLOGIES._entries, "halves", Entry("halves", halves, TopologyParams,
                                                              {"client_server": False}))
    with pytest.raises(ScenarioError, match=r"^topology: the communication graph over 2 rounds is disconnected "
                                            r"\(2 components; smallest has 2 nodes: 0, 1\); set topology\."
                                            r"allow_disconnected: true"):
        fedsim.run(gossip_only(tiny, "halves", rounds=1, n=4), write=False)
    rows = fedsim.run(gossip_only(tiny, "halves", rounds=1, n=4) | {"topology": {"name": "halves",
                                                                                  "allow_disconnected": True}},
                      write=False).metrics.rows
    assert numbers(rows)


def test_directed_edges_bring_rows_one_way_and_plans_of_two_processes_agree():
    graph = nx.DiGraph([(i, (i + 1) % 6) for i in range(6)])
    blocks = block_partition(6, 2)
    a, b = halo_plan(graph, blocks, 0), halo_plan(graph, blocks, 1)
    assert a.peers == (1,) and b.peers == (0,)
    assert a.sends == ((2,),) and a.receives == ((5,),)
    assert b.sends == a.receives and b.receives == a.sends
    W = mixing_matrix("uniform_neighbour", None, graph).to_dense()
    assert W[1, 0] == 0.5 and W[1, 1] == 0.5 and W[0, 1] == 0.0 and W[0, 5] == 0.5


def test_a_symmetric_mixing_matrix_on_a_directed_graph_is_one_line_naming_the_field():
    graph = nx.DiGraph([(i, (i + 1) % 4) for i in range(4)])
    with pytest.raises(ScenarioError, match=r"^protocol\.mixing\.name: 'metropolis_hastings' needs an undirected "
                                            r"graph and the topology is directed; use uniform_neighbour$"):
        mixing_matrix("metropolis_hastings", None, graph, "protocol.mixing")
    assert Topology(graph, 4).directed
