"""The topology zoo (`topologies/graphs.py`, `topologies/edge_list.py`) and Laplacian mixing: known spectral gaps
and DADAO constants, exact averaging of one-peer exponential graphs, seeded random graphs, time-varying sequences,
edge-list files, connectivity, one D-SGD round on every peer-to-peer topology, and one-line errors for bad input."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pytest
import torch

import fedsim
from fedsim.errors import ScenarioError
from fedsim.registry import validate_params
from fedsim.seeding import Stream, derive_seed
from fedsim.topologies import TOPOLOGIES, GraphSequence
from fedsim.topologies.edge_list import read_edge_list
from fedsim.topologies.graphs import random_in_neighbours
from fedsim.topologies.mixing import check_stochastic, mixing_matrix
from fedsim.topologies.schedule import Topology
from fedsim.topologies.spectral import chi_1, chi_2, spectral_gap

LOGREG_DIGITS_BYTES = (64 * 10 + 10) * 4
"""Bytes of one node's model (logistic regression on 8x8 digits, float32): what each send costs."""


def built(name: str, n: int, seed: int = 0, **params: Any) -> nx.Graph | GraphSequence:
    entry = TOPOLOGIES.get(name)
    return entry.obj(validate_params(entry.params, params, "topology", name), n, seed)


def topology(name: str, n: int, seed: int = 0, **params: Any) -> Topology:
    return Topology(built(name, n, seed, **params), n)


def edges(graph: nx.Graph) -> set[tuple[int, int]]:
    return {tuple(e) if graph.is_directed() else tuple(sorted(e)) for e in graph.edges}


def gossip(topology_spec: dict[str, Any], n: int = 8, mixing_name: str = "metropolis_hastings") -> dict[str, Any]:
    """One D-SGD round (one local step) of digits logistic regression on `n` nodes over `topology_spec`."""
    return {"name": "zoo", "seed": 0, "rounds": 1, "num_clients": n, "data": {"name": "digits"},
            "partition": {"name": "iid"}, "model": {"name": "logreg"},
            "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 1},
            "protocol": {"name": "dsgd", "local_steps": 1, "mixing": {"name": mixing_name}},
            "topology": topology_spec}


def write(tmp_path: Path, text: str, name: str = "edges.txt") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("name", "gap"), [("ring", 0.0507), ("torus", 0.4000), ("grid", 0.1314),
                                           ("complete", 1.0)])
def test_metropolis_hastings_spectral_gaps_on_16_nodes_match_the_notes(name, gap):
    assert spectral_gap(mixing_matrix("metropolis_hastings", None, built(name, 16))) == pytest.approx(gap, abs=1e-4)


@pytest.mark.parametrize("n", [5, 9, 16, 40])
def test_ring_gap_with_one_third_weights_is_two_thirds_of_one_minus_cos_two_pi_over_n(n):
    W = mixing_matrix("metropolis_hastings", None, built("ring", n))
    shift = torch.roll(torch.eye(n, dtype=torch.float64), 1, 0)
    torch.testing.assert_close(W.to_dense(), (torch.eye(n, dtype=torch.float64) + shift + shift.T) / 3)
    assert spectral_gap(W) == pytest.approx(2 / 3 * (1 - math.cos(2 * math.pi / n)), abs=1e-12)


@pytest.mark.parametrize(("name", "chi1"), [("peer_star", 9.0), ("complete", 4.5), ("ring", 26.18),
                                            ("path", 91.94)])
def test_dadao_chi_1_and_chi_2_on_ten_nodes_match_the_notes(name, chi1):
    graph = built(name, 10)
    assert chi_1(graph) == pytest.approx(chi1, abs=0.005)
    assert chi_2(graph) == pytest.approx(4.5, abs=1e-9)  # (n - 1) / 2: trees and edge-transitive graphs


def test_peer_star_and_path_are_networkx_star_and_path_on_nodes_zero_to_n_minus_one():
    assert edges(built("peer_star", 6)) == {(0, i) for i in range(1, 6)}
    assert edges(built("path", 4)) == {(0, 1), (1, 2), (2, 3)}
    assert not TOPOLOGIES.get("peer_star").meta["client_server"] and TOPOLOGIES.get("star").meta["client_server"]


@pytest.mark.parametrize("n", [8, 16, 32])
def test_one_peer_exponential_with_half_weights_averages_all_nodes_exactly_after_log2_n_rounds(n):
    sequence = built("one_peer_exponential", n)
    assert sequence.period == int(math.log2(n))
    product = torch.eye(n, dtype=torch.float64)
    for t in range(sequence.period):
        graph = sequence.graph(t)
        assert graph.is_directed() and all(d == 1 for _, d in graph.in_degree())
        assert set(graph.pred[0]) == {2 ** t}
        product = mixing_matrix("uniform_neighbour", None, graph).to_dense() @ product
        exact = torch.equal(product, torch.full((n, n), 1 / n, dtype=torch.float64))
        assert exact == (t == sequence.period - 1)


def test_the_static_exponential_graph_is_the_union_of_one_period_of_one_peer_graphs():
    n = 10
    sequence, static = built("one_peer_exponential", n), built("exponential", n)
    assert sequence.period == 4 == math.ceil(math.log2(n))
    assert edges(static) == set().union(*(edges(sequence.graph(t)) for t in range(4)))
    assert sorted(static.pred[0]) == [1, 2, 4, 8] and sorted(static.succ[0]) == [2, 6, 8, 9]
    W = mixing_matrix("uniform_neighbour", None, static)
    check_stochastic(W, doubly=True, what="exponential")


def test_grid_and_torus_number_nodes_row_by_row_in_the_most_square_shape():
    grid, torus = built("grid", 12), built("torus", 12)  # 3 x 4
    assert set(grid.adj[5]) == {1, 4, 6, 9} and set(grid.adj[0]) == {1, 4}
    assert set(torus.adj[0]) == {1, 3, 4, 8} and all(d == 4 for _, d in torus.degree())
    assert edges(built("grid", 7)) == edges(nx.path_graph(7))  # a prime: 1 x 7
    assert set(built("grid", 12, rows=2).adj[0]) == {1, 6} and set(built("grid", 12, cols=2).adj[0]) == {1, 2}
    assert edges(built("torus", 16)) == edges(built("torus", 16, rows=4, cols=4))


def test_barbell_splits_the_nodes_into_two_cliques_joined_by_a_path():
    assert edges(built("barbell", 10)) == edges(nx.barbell_graph(5, 0))
    assert edges(built("barbell", 11, path_nodes=3)) == edges(nx.barbell_graph(4, 3))
    uneven = built("barbell", 11, path_nodes=2)  # cliques 0..4 and 7..10, path 5, 6
    assert [d for _, d in uneven.degree()] == [4, 4, 4, 4, 5, 2, 2, 4, 3, 3, 3]
    assert nx.shortest_path(uneven, 4, 7) == [4, 5, 6, 7]


RANDOM = [("erdos_renyi", {"p": 0.3}), ("random_geometric", {"radius": 0.3}), ("watts_strogatz", {"p": 0.5}),
          ("powerlaw_cluster", {}), ("random_k", {"k": 2}), ("geometric_sequence", {"radius": 0.3, "count": 2}),
          ("sequence", {"graphs": [{"name": "erdos_renyi", "p": 0.3}]})]


@pytest.mark.parametrize(("name", "params"), RANDOM, ids=[name for name, _ in RANDOM])
def test_a_random_graph_is_the_same_for_the_same_seed_and_differs_for_another(name, params):
    first, again, other = (edges(topology(name, 16, seed, **params).graph(0)) for seed in (1, 1, 2))
    assert first == again and first != other and first


def test_random_k_draws_k_other_peers_per_node_afresh_each_round():
    graphs = topology("random_k", 12, seed=3, k=3)
    assert graphs.sequence.period is None and graphs.index(7) == 7
    rounds = [graphs.graph(t) for t in range(3)]
    for graph in rounds:
        assert graph.is_directed() and nx.number_of_selfloops(graph) == 0
        assert all(d == 3 for _, d in graph.in_degree())
    assert edges(rounds[0]) != edges(rounds[1]) != edges(rounds[2])
    assert edges(topology("random_k", 12, seed=3, k=3).graph(1)) == edges(rounds[1])


def test_random_in_neighbours_draws_every_subset_of_the_other_nodes_uniformly():
    rng = np.random.default_rng(0)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(3000):
        heard = random_in_neighbours(5, 2, rng)
        assert all(i not in row and len(set(row)) == 2 for i, row in enumerate(heard.tolist()))
        key = tuple(sorted(heard[0].tolist()))
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == set(combinations(range(1, 5), 2))
    assert all(abs(c - 500) < 80 for c in counts.values())  # 6 subsets, 3000 draws: 500 +- 4 sd


def test_geometric_sequence_graphs_are_each_connected_and_repeat_every_count_rounds():
    graphs = topology("geometric_sequence", 30, seed=0, radius=0.1, count=3)
    assert not nx.is_connected(built("random_geometric", 30, seed=0, radius=0.1))
    assert all(nx.is_connected(graphs.graph(t)) for t in range(3))
    assert [graphs.index(t) for t in range(5)] == [0, 1, 2, 0, 1]
    assert edges(graphs.graph(0)) != edges(graphs.graph(1))
    assert nx.is_connected(built("random_geometric", 30, seed=0, radius=0.1, connect=True))


def test_a_sequence_takes_turns_and_a_changing_part_keeps_its_own_schedule():
    turns = topology("sequence", 9, graphs=[{"name": "ring"}, {"name": "torus"}], rounds_each=2)
    assert turns.sequence.period == 4
    assert [edges(turns.graph(t)) == edges(nx.cycle_graph(9)) for t in range(5)] == [True, True, False, False,
                                                                                       True]
    assert edges(turns.graph(2)) == edges(built("torus", 9))
    mixed = topology("sequence", 8, graphs=[{"name": "exponential"}, {"name": "one_peer_exponential"}])
    assert mixed.sequence.period == 6  # lcm(2 parts, one-peer period 3)
    assert set(mixed.graph(1).pred[0]) == {2} and set(mixed.graph(3).pred[0]) == {1}
    assert set(mixed.graph(2).pred[0]) == {1, 2, 4}


def test_an_edge_list_file_with_comments_and_blank_lines_reads_without_a_scenario(tmp_path):
    path = write(tmp_path, "# a ring of 4\n0 1\n\n1 2  # inline comment\n2 3\n3 0\n3 3\n1 0\n")
    graph = read_edge_list(path, self_loops="drop")
    assert not graph.is_directed() and sorted(graph.nodes) == [0, 1, 2, 3]
    assert edges(graph) == edges(nx.cycle_graph(4))
    directed = read_edge_list(path, 6, directed=True, self_loops="drop")
    assert sorted(directed.nodes) == list(range(6)) and edges(directed) == {(0, 1), (1, 2), (2, 3), (3, 0), (1, 0)}


@pytest.mark.parametrize(("text", "message"), [
    ("0 1\n1 2\n2 7\n", r"line 3: node 7 does not exist: nodes are 0 to 3 \(num_clients is 4\)$"),
    ("0 1\n# loop\n2 2\n", r"line 3: self-loop on node 2; remove the line, or set self_loops: drop"),
    ("0 1\n1 two\n", r"line 2: node 'two' is not an integer$"),
    ("0 1 0.5\n", r"line 1: a third column \('0\.5', a weight\?\) is not supported"),
    ("0 1\n\n3\n", r"line 3: expected two node ids `i j`, got 1 fields \('3'\)$"),
    ("0 -1\n", r"line 1: node -1 does not exist"),
    ("0 1\n" + "9" * 2000 + "\n", r"line 2: longer than 1000 characters$"),
])
def test_a_bad_edge_list_line_is_one_error_naming_the_setting_and_the_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError, match=r"^topology\.path: '.*edges\.txt' " + message):
        read_edge_list(path, 4)


def test_an_unreadable_edge_list_is_one_error_naming_the_setting(tmp_path):
    with pytest.raises(ScenarioError, match=r"^topology\.path: cannot read '.*missing\.txt': No such file"):
        read_edge_list(str(tmp_path / "missing.txt"), 4)
    (tmp_path / "bin.txt").write_bytes(b"0 1\n\xff\xfe\n")
    with pytest.raises(ScenarioError, match=r"^topology\.path: cannot read '.*bin\.txt': not UTF-8 text$"):
        read_edge_list(str(tmp_path / "bin.txt"), 4)


def test_disconnected_graphs_are_refused_naming_their_components_unless_allowed(tmp_path):
    sparse = {"name": "erdos_renyi", "p": 0.05}
    with pytest.raises(ScenarioError, match=r"^topology: the communication graph is disconnected \(\d+ components; "
                                            r"smallest has 1 nodes: \d+\); set topology\.allow_disconnected: true"):
        fedsim.run(gossip(sparse, n=10), write=False)
    halves = {"name": "edge_list", "path": write(tmp_path, "0 1\n2 3\n")}
    with pytest.raises(ScenarioError, match=r"^topology: the communication graph is disconnected \(2 components; "
                                            r"smallest has 2 nodes: 0, 1\)"):
        fedsim.run(gossip(halves, n=4), write=False)
    for spec, n in [(sparse, 10), (halves, 4)]:
        rows = fedsim.run(gossip(spec | {"allow_disconnected": True}, n=n), write=False).metrics.rows
        assert len(rows) == 2 and math.isfinite(rows[-1]["loss"])


RUN_SETTINGS: dict[str, dict[str, Any]] = {
    "erdos_renyi": {"p": 0.6}, "random_geometric": {"radius": 0.5, "connect": True}, "random_k": {"k": 2},
    "geometric_sequence": {"radius": 0.3, "count": 2}, "sequence": {"graphs": [{"name": "ring"}, {"name": "torus"}]},
    "edge_list": {"path": "ring.txt"},
}
PEER_TO_PEER = [entry.name for entry in TOPOLOGIES if not entry.meta.get("client_server")]


@pytest.mark.parametrize("name", PEER_TO_PEER)
def test_every_peer_to_peer_topology_runs_a_dsgd_round_sending_the_model_along_each_edge(name, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "".join(f"{i} {(i + 1) % 8}\n" for i in range(8)), "ring.txt")
    spec = {"name": name, **RUN_SETTINGS.get(name, {})}
    graph = Topology(TOPOLOGIES.get(name).obj(TOPOLOGIES.resolve(spec, "topology")[1], 8,
                                              derive_seed(0, Stream.TOPOLOGY)), 8).graph(0)
    sends = graph.number_of_edges() * (1 if graph.is_directed() else 2)
    mixing_name = "uniform_neighbour" if graph.is_directed() else "metropolis_hastings"
    rows = fedsim.run(gossip(spec, mixing_name=mixing_name), write=False).metrics.rows
    assert [r["round"] for r in rows] == [0, 1] and math.isfinite(rows[-1]["loss"])
    assert rows[-1]["bytes_up"] == sends * LOGREG_DIGITS_BYTES > 0


BAD_INPUT = [
    ({"name": "erdos_renyi", "p": 1.5}, "topology.p: "),
    ({"name": "erdos_renyi"}, "topology.p: missing"),
    ({"name": "random_geometric", "radius": 0}, "topology.radius: "),
    ({"name": "random_geometric", "radius": 0.3, "connect": 1}, "topology.connect: "),
    ({"name": "geometric_sequence", "radius": 0.3, "count": 0}, "topology.count: "),
    ({"name": "grid", "rows": 3}, "topology.rows: 3 rows do not divide the 8 nodes"),
    ({"name": "grid", "cols": 3}, "topology.cols: 3 columns do not divide the 8 nodes"),
    ({"name": "torus", "rows": 2, "cols": 2}, "topology.rows: rows x cols = 2 x 2 = 4, not the 8 nodes"),
    ({"name": "grid", "rows": 0}, "topology.rows: "),
    ({"name": "barbell", "path_nodes": 5}, "topology.path_nodes: 5 path nodes leave 3 of the 8 nodes"),
    ({"name": "barbell", "path_nodes": -1}, "topology.path_nodes: "),
    ({"name": "watts_strogatz", "k": 3}, "topology.k: 3 is odd"),
    ({"name": "watts_strogatz", "k": 8}, "topology.k: must be less than the number of nodes (num_clients: 8)"),
    ({"name": "watts_strogatz", "p": -0.1}, "topology.p: "),
    ({"name": "powerlaw_cluster", "m": 8}, "topology.m: must be less than the number of nodes"),
    ({"name": "powerlaw_cluster", "p": 2}, "topology.p: "),
    ({"name": "random_k", "k": 8}, "topology.k: must be less than the number of nodes"),
    ({"name": "random_k", "k": 0}, "topology.k: "),
    ({"name": "ring", "allow_disconnected": "yes"}, "topology.allow_disconnected: "),
    ({"name": "path", "radius": 1}, "topology.radius: unknown field"),
    ({"name": "sequence", "graphs": []}, "topology.graphs: "),
    ({"name": "sequence", "graphs": [{"name": "ring"}], "rounds_each": 0}, "topology.rounds_each: "),
    ({"name": "sequence", "graphs": [{"name": "ring"}, {"name": "rnig"}]}, "topology.graphs[1].name: unknown "),
    ({"name": "sequence", "graphs": [{"name": "star"}]}, "topology.graphs[0].name: 'star' is the client/server"),
    ({"name": "sequence", "graphs": [{"name": "sequence", "graphs": [{"name": "ring"}]}]},
     "topology.graphs[0].name: 'sequence' is a sequence itself"),
    ({"name": "sequence", "graphs": [{"name": "ring", "allow_disconnected": True}]},
     "topology.graphs[0].allow_disconnected: set topology.allow_disconnected on the sequence"),
    ({"name": "sequence", "graphs": [{"name": "ring"}, {"name": "grid", "rows": 3}]},
     "topology.graphs[1].rows: 3 rows do not divide"),
    ({"name": "sequence", "graphs": [{"name": "ring"}, {"name": "erdos_renyi", "p": 2}]}, "topology.graphs[1].p: "),
    ({"name": "sequence", "graphs": [{"name": "ring"}, {"name": "exponential"}]},
     "topology.graphs[1].name: 'exponential' is directed and 'ring' is not"),
    ({"name": "grid", "rows": 2 ** 62}, "topology.rows: 4611686018427387904 rows do not divide the 8 nodes"),
    ({"name": "geometric_sequence", "radius": 0.3, "count": 10_001}, "topology.count: "),
    ({"name": "sequence", "graphs": [{"name": "ring"}], "rounds_each": 20_000},
     "topology.rounds_each: the sequence repeats every 20000 rounds"),
    ({"name": "sequence", "graphs": [{"name": "geometric_sequence", "radius": 0.5, "count": 9973},
                                     {"name": "geometric_sequence", "radius": 0.5, "count": 9967}]},
     "topology.graphs: the sequence repeats every 198801782 rounds"),
    ({"name": "edge_list"}, "topology.path: missing"),
    ({"name": "edge_list", "path": "nul\0.txt"}, "topology.path: cannot read 'nul\\x00.txt': embedded null byte"),
    ({"name": "edge_list", "path": "absent.txt"}, "topology.path: cannot read 'absent.txt': No such file"),
    ({"name": "edge_list", "path": "loops.txt"}, "topology.path: 'loops.txt' line 2: self-loop on node 3"),
    ({"name": "edge_list", "path": "ring.txt", "self_loops": "keep"}, "topology.self_loops: "),
    ({"name": "edge_list", "path": "ring.txt", "directed": "no"}, "topology.directed: "),
    ({"name": "edge_list", "path": "wide.txt"}, "topology.path: 'wide.txt' line 1: node 9 does not exist"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_INPUT, ids=[m.split(":")[0] for _, m in BAD_INPUT])
def test_a_bad_topology_setting_is_one_line_starting_with_its_field(spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "0 1\n3 3\n", "loops.txt")
    write(tmp_path, "0 9\n", "wide.txt")
    write(tmp_path, "".join(f"{i} {(i + 1) % 8}\n" for i in range(8)), "ring.txt")
    with pytest.raises(ScenarioError) as caught:
        fedsim.run(gossip(spec), write=False)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_laplacian_mixing_is_identity_minus_the_laplacian_over_its_largest_eigenvalue():
    star = mixing_matrix("laplacian", None, built("peer_star", 5)).to_dense()  # lambda_max(L) = n on a star
    expected = torch.full((5, 5), 0.2, dtype=torch.float64)
    expected[1:, 1:] = 0.8 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(star, expected, rtol=0, atol=1e-15)
    shift = torch.roll(torch.eye(6, dtype=torch.float64), 1, 0)
    ring = mixing_matrix("laplacian", {}, nx.cycle_graph(6)).to_dense()  # lambda_max = 4
    torch.testing.assert_close(ring, 0.5 * torch.eye(6, dtype=torch.float64) + 0.25 * (shift + shift.T))
    stepped = mixing_matrix("laplacian", {"step": 0.1}, nx.cycle_graph(6)).to_dense()
    torch.testing.assert_close(stepped, 0.8 * torch.eye(6, dtype=torch.float64) + 0.1 * (shift + shift.T))
    graph = built("powerlaw_cluster", 30, seed=2)
    W = mixing_matrix("laplacian", None, graph)
    check_stochastic(W, doubly=True, what="laplacian")
    dense = W.to_dense()
    assert torch.equal(dense, dense.T) and 0 < spectral_gap(W) < 1
    L = torch.from_numpy(nx.laplacian_matrix(graph, nodelist=range(30)).toarray()).double()
    torch.testing.assert_close(dense, torch.eye(30, dtype=torch.float64) - L / torch.linalg.eigvalsh(L)[-1])


def test_laplacian_mixing_of_a_large_graph_finds_the_same_largest_eigenvalue_sparsely(monkeypatch):
    graph = built("random_geometric", 60, radius=0.3)
    dense = mixing_matrix("laplacian", None, graph).to_dense()
    monkeypatch.setattr("fedsim.topologies.mixing.DENSE_EIGEN_NODES", 10)
    torch.testing.assert_close(mixing_matrix("laplacian", None, graph).to_dense(), dense, rtol=0, atol=1e-12)


def test_laplacian_mixing_refuses_a_step_that_makes_it_negative_and_a_directed_graph():
    with pytest.raises(ScenarioError, match=r"^protocol\.mixing\.step: 0\.3 makes the mixing matrix negative \(1 - "
                                            r"step \* degree < 0 at node 0, of degree 4\); use at most 1 / max "
                                            r"degree = 0\.25$"):
        mixing_matrix("laplacian", {"step": 0.3}, built("peer_star", 5), "protocol.mixing")
    with pytest.raises(ScenarioError, match=r"^protocol\.mixing\.step: "):
        fedsim.run(gossip({"name": "ring"}) | {"protocol": {"name": "dsgd", "mixing": {"name": "laplacian",
                                                                                         "step": 0.6}}},
                   write=False)
    with pytest.raises(ScenarioError, match=r"^protocol\.mixing\.name: 'laplacian' needs an undirected graph"):
        fedsim.run(gossip({"name": "exponential"}, mixing_name="laplacian"), write=False)
    rows = fedsim.run(gossip({"name": "torus"}, mixing_name="laplacian"), write=False).metrics.rows
    assert math.isfinite(rows[-1]["consensus_error"])
