"""Mixing matrices (Metropolis-Hastings, uniform neighbour, max degree) and sparse mixing of stacked states."""

from __future__ import annotations

import networkx as nx
import pytest
import torch

from fedsim.errors import ScenarioError
from fedsim.params import Pytree
from fedsim.registry import NoParams
from fedsim.topologies.mixing import (
    MIXING,
    check_stochastic,
    consensus_error,
    mix,
    mixing_matrix,
)
from fedsim.topologies.schedule import Topology
from fedsim.topologies.spectral import spectral_gap


def _stacked(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Pytree:
    g = torch.Generator().manual_seed(seed)
    return {"layer": {"w": torch.randn(n, 3, 4, generator=g).to(dtype), "b": torch.randn(n, 4, generator=g).to(dtype)},
            "scale": torch.randn(n, generator=g).to(dtype)}


@pytest.mark.parametrize("graph", [nx.cycle_graph(7), nx.complete_graph(5), nx.star_graph(6), nx.path_graph(4)])
@pytest.mark.parametrize("name", ["metropolis_hastings", "max_degree"])
def test_symmetric_weights_are_doubly_stochastic(name, graph):
    W = mixing_matrix(name, None, graph)
    assert W.layout == torch.sparse_csr and W.dtype == torch.float64
    dense = W.to_dense()
    assert torch.equal(dense, dense.T) and (dense >= 0).all()
    torch.testing.assert_close(dense.sum(0), torch.ones(len(graph), dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(dense.sum(1), torch.ones(len(graph), dtype=torch.float64), rtol=0, atol=1e-12)


def test_metropolis_hastings_on_a_ring_of_four_puts_one_third_on_the_band():
    dense = mixing_matrix("metropolis_hastings", {}, nx.cycle_graph(4)).to_dense()
    third = 1 / 3
    expected = torch.tensor([[third, third, 0, third], [third, third, third, 0],
                             [0, third, third, third], [third, 0, third, third]], dtype=torch.float64)
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-15)


def test_metropolis_hastings_on_a_path_uses_the_larger_degree_and_ignores_self_loops():
    graph = nx.path_graph(3)
    graph.add_edge(0, 0)
    dense = mixing_matrix("metropolis_hastings", None, graph).to_dense()
    expected = torch.tensor([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]], dtype=torch.float64)
    torch.testing.assert_close(dense, expected, rtol=0, atol=1e-15)


def test_max_degree_on_a_star_weighs_every_edge_by_one_over_max_degree_plus_one():
    dense = mixing_matrix("max_degree", None, nx.star_graph(3)).to_dense()
    assert (dense[0] == 0.25).all() and (dense[1:, 0] == 0.25).all() and (dense.diagonal()[1:] == 0.75).all()


def test_uniform_neighbour_on_a_star_is_row_but_not_column_stochastic():
    W = mixing_matrix("uniform_neighbour", None, nx.star_graph(4))
    dense = W.to_dense()
    assert (dense[0] == 0.2).all() and dense[1, 0] == dense[1, 1] == 0.5
    check_stochastic(W, doubly=False, what="mixing.name")
    with pytest.raises(ScenarioError, match=r"^mixing\.name: column 0 .* sums to 2\.2, not 1$"):
        check_stochastic(W, doubly=True, what="mixing.name")


def test_check_stochastic_rejects_negative_entries_and_bad_rows():
    with pytest.raises(ScenarioError, match="^w: .*non-negative"):
        check_stochastic(torch.tensor([[1.5, -0.5], [0.5, 0.5]]), doubly=False, what="w")
    with pytest.raises(ScenarioError, match="^w: row 1 "):
        check_stochastic(torch.tensor([[1.0, 0.0], [0.5, 0.4]]).to_sparse_csr(), doubly=False, what="w")


def test_unknown_name_bad_params_and_bad_nodes_are_scenario_errors():
    with pytest.raises(ScenarioError, match=r"^mixing\.name: unknown mixing matrix 'metropolis'; allowed: "):
        mixing_matrix("metropolis", None, nx.cycle_graph(3))
    with pytest.raises(ScenarioError, match=r"^mixing\.alpha: unknown field"):
        mixing_matrix("max_degree", {"alpha": 1}, nx.cycle_graph(3))
    with pytest.raises(ScenarioError, match=r"^topology: .*nodes 0\.\.2, got nodes \[1, 2, 3\]$"):
        mixing_matrix("max_degree", NoParams(), nx.relabel_nodes(nx.cycle_graph(3), {0: 3}))
    assert set(MIXING.names()) == {"metropolis_hastings", "uniform_neighbour", "max_degree", "laplacian"}


def test_mixing_with_a_doubly_stochastic_matrix_preserves_the_network_average():
    W = mixing_matrix("metropolis_hastings", None, nx.connected_watts_strogatz_graph(12, 4, 0.3, seed=1))
    x = _stacked(12)
    y = mix(W, x)
    for before, after in zip([x["layer"]["w"], x["layer"]["b"], x["scale"]], [y["layer"]["w"], y["layer"]["b"],
                                                                            y["scale"]], strict=True):
        assert after.dtype == torch.float32 and after.shape == before.shape
        assert not torch.allclose(after, before)
        torch.testing.assert_close(after.mean(0), before.mean(0), rtol=0, atol=1e-6)


def test_mixing_equals_the_dense_product_row_by_row_in_half_precision_too():
    W = mixing_matrix("metropolis_hastings", None, nx.cycle_graph(5))
    x = _stacked(5, torch.bfloat16)
    y = mix(W, x)
    expected = (W.to_dense().float() @ x["layer"]["w"].float().reshape(5, -1)).reshape(5, 3, 4).bfloat16()
    assert y["layer"]["w"].dtype == torch.bfloat16 and torch.equal(y["layer"]["w"], expected)


def test_mix_names_a_leaf_without_the_node_axis():
    W = mixing_matrix("max_degree", None, nx.cycle_graph(3))
    with pytest.raises(ValueError, match="'a/b'"):
        mix(W, {"a": {"b": torch.zeros(4, 2)}})


def test_uniform_weights_on_a_complete_graph_reach_the_exact_average_at_once():
    x = {"w": torch.randint(-50, 50, (4, 6), generator=torch.Generator().manual_seed(3)).double()}
    y = mix(mixing_matrix("uniform_neighbour", None, nx.complete_graph(4)), x)
    assert torch.equal(y["w"], x["w"].mean(0).expand(4, 6))
    assert consensus_error(y) == 0.0


def test_consensus_error_matches_a_hand_computation():
    x = {"a": torch.tensor([[0.0, 2.0], [2.0, 0.0]]), "b": {"c": torch.tensor([1.0, 3.0])}}
    # mean of a is (1, 1): each row is off by (+-1, +-1) -> 2 each; mean of c is 2: each off by 1 -> 1 each.
    assert consensus_error(x) == pytest.approx((2 + 2 + 1 + 1) / 2, abs=1e-15)


def test_repeated_mixing_on_a_ring_shrinks_consensus_error_at_rate_one_minus_gap_squared():
    W = mixing_matrix("metropolis_hastings", None, nx.cycle_graph(10))
    gap = spectral_gap(W)
    assert gap == pytest.approx(1 - (1 + 2 * torch.cos(torch.tensor(torch.pi / 5, dtype=torch.float64)).item()) / 3)
    x = _stacked(10, torch.float64)
    errors = [consensus_error(x)]
    for _ in range(60):
        x = mix(W, x)
        errors.append(consensus_error(x))
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] / errors[-2] == pytest.approx((1 - gap) ** 2, rel=1e-3)


def test_disconnected_graph_is_one_error_line_naming_the_smallest_component():
    graph = nx.disjoint_union(nx.cycle_graph(5), nx.path_graph(2))
    with pytest.raises(ScenarioError, match=r"^topology: .*disconnected \(2 components; smallest has 2 nodes: 5, 6\); "
                                            r"set topology.allow_disconnected: true to run it anyway$"):
        Topology(graph, 7).check_connected("topology")
    Topology(nx.cycle_graph(5), 5).check_connected("topology")
    assert spectral_gap(mixing_matrix("metropolis_hastings", None, graph)) == pytest.approx(0.0, abs=1e-12)
