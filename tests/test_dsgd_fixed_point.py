"""Gossip protocols against closed forms on scalar quadratics f_i(w) = (w - i)^2 / 2 over a ring of 8 nodes with
1/3 weights (research notes, Test 0.1 and DFedSAM's table): D-SGD's biased fixed point, DFedSAM-MGS's consensus error
falling with Q like lambda^Q, the network average kept by doubly stochastic gossip, and DFedAvgM's momentum reset
every round."""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import pytest
import torch
from rulekit import finished, spread

from fedsim.data import DATASETS
from fedsim.data.base import DataParams, FederatedData
from fedsim.params import tree_map
from fedsim.registry import Entry
from fedsim.topologies import TOPOLOGIES, TopologyParams
from fedsim.topologies.spectral import second_eigenvalue

N = 8
B = np.arange(N, dtype=np.float64)
RING = (np.eye(N) + np.roll(np.eye(N), 1, axis=1) + np.roll(np.eye(N), -1, axis=1)) / 3
"""uniform_neighbour on the ring: 1/3 on each node and its two neighbours (symmetric, doubly stochastic)."""


def scalar_targets(params: DataParams, num_clients: int, rng: np.random.Generator) -> FederatedData:
    """Node i holds the one sample (x = 1, y = i) in both splits: under the linear model without bias its loss is
    f_i(w) = (w - i)^2 / 2, and a batch of 1 is its full gradient."""
    x, y = torch.ones(num_clients, 1), torch.arange(num_clients, dtype=torch.float32)
    offsets = np.arange(num_clients + 1)
    return FederatedData.from_offsets(x, y, offsets, x.clone(), y.clone(), offsets, num_classes=1)


def path(params: TopologyParams, num_nodes: int, seed: int) -> nx.Graph:
    """The path 0 - 1 - ... - n-1: not regular, so Metropolis-Hastings weights are not uniform-neighbour ones."""
    return nx.path_graph(num_nodes)


@pytest.fixture(autouse=True)
def registered(monkeypatch) -> None:
    monkeypatch.setitem(DATASETS._entries, "test_scalar_quadratics",
                        Entry("test_scalar_quadratics", scalar_targets, DataParams,
                              {"natural": True, "task": "regression"}))
    monkeypatch.setitem(TOPOLOGIES._entries, "test_path",
                        Entry("test_path", path, TopologyParams, {"client_server": False}))


def quadratics(rounds: int, local_steps: int, lr: float, algorithm: str = "fedavg", gossip_steps: int = 1,
               mixing: str = "uniform_neighbour", topology: str = "ring", **hp: Any) -> dict[str, Any]:
    """Gossip over the scalar quadratics, full-batch GD steps (or the algorithm's steps), evaluated at the end."""
    return {
        "name": "quadratics", "seed": 0, "rounds": rounds, "num_clients": N,
        "data": {"name": "test_scalar_quadratics"}, "partition": {"name": "natural"}, "model": {"name": "linear"},
        "algorithm": {"name": algorithm, "lr": lr, "batch_size": 1, **hp},
        "protocol": {"name": "dsgd", "local_steps": local_steps, "gossip_steps": gossip_steps,
                     "mixing": {"name": mixing}},
        "topology": {"name": topology}, "runtime": {"name": "sequential"}, "evaluation": {"every": rounds},
    }


def node_values(protocol: Any) -> np.ndarray:
    [weights] = protocol.nodes.stacked.values()
    return weights.reshape(-1).double().numpy()


def spread_of(x: np.ndarray) -> float:
    """||x - mean(x) 1||_2, the notes' consensus figure."""
    return float(np.linalg.norm(x - x.mean()))


def test_dsgd_converges_to_its_closed_form_biased_fixed_point_on_a_ring():
    # ATC x <- W (x - eta (x - b)) has the fixed point eta (I - (1 - eta) W)^-1 W b: mean 3.5, but 1.532 away from
    # consensus (constant-step D-SGD's heterogeneity bias). The mean contracts at 1 - eta a round from 0: 200 rounds.
    eta = 0.1
    fixed = eta * np.linalg.solve(np.eye(N) - (1 - eta) * RING, RING @ B)
    assert fixed.mean() == pytest.approx(3.5, abs=1e-12)
    assert spread_of(fixed) == pytest.approx(1.532, abs=5e-4)
    protocol = finished(quadratics(rounds=200, local_steps=1, lr=eta))
    assert torch.equal(protocol.graphs.at(0).W.to_dense(), torch.from_numpy(RING))
    x = node_values(protocol)
    assert np.abs(x - fixed).max() < 1e-6  # measured 7.8e-7: about 2 float32 ulps at 4
    row = protocol.recorder.rows[-1]
    assert np.sqrt(N * row["consensus_error"]) == pytest.approx(spread_of(fixed), rel=1e-5)


def at_the_mean(protocol: Any) -> None:
    protocol.nodes.scatter(range(N), tree_map(lambda v: torch.full_like(v, B.mean()), protocol.nodes.stacked))


def steady_state(local_steps: int, lr: float, gossip_steps: int) -> np.ndarray:
    """K GD steps take x_i to b_i + a (x_i - b_i), a = (1 - lr)^K, then W^Q mixes: the fixed point is
    (1 - a) (I - a W^Q)^-1 W^Q b."""
    a, mixing = (1 - lr) ** local_steps, np.linalg.matrix_power(RING, gossip_steps)
    return (1 - a) * np.linalg.solve(np.eye(N) - a * mixing, mixing @ B)


@pytest.mark.parametrize(("algorithm", "hp", "gossip_steps", "notes"), [
    ("fedavg", {}, 1, 2.540), ("fedavg", {}, 4, 0.734), ("fedavg", {}, 16, 3.75e-2),
    ("fedsam", {"rho": 0.01}, 1, 2.553), ("fedsam", {"rho": 0.01}, 16, 3.77e-2),
])
def test_consensus_error_of_local_update_gossip_falls_with_the_gossip_steps_as_the_notes_table(algorithm, hp,
                                                                                               gossip_steps, notes):
    # Notes section 1(f): K = 5 GD (or SAM) steps, eta = 0.05, 3000 rounds from 0. Here every node starts at the mean
    # 3.5, which the rounds keep (b is symmetric about it on the ring), and disagreement contracts by at least
    # lambda (1 - eta)^K = 0.62 a round, so 30 rounds reach the same steady state to 1e-6 (from 0 the mean would
    # need 60: it contracts by (1 - eta)^K = 0.77).
    protocol = finished(quadratics(rounds=30, local_steps=5, lr=0.05, algorithm=algorithm,
                                   gossip_steps=gossip_steps, **hp), at_the_mean)
    x = node_values(protocol)
    assert spread_of(x) == pytest.approx(notes, rel=2e-3)
    assert x.mean() == pytest.approx(3.5, abs=1e-5)
    if algorithm == "fedavg":
        assert spread_of(x) == pytest.approx(spread_of(steady_state(5, 0.05, gossip_steps)), rel=1e-4)


def test_gossip_only_rounds_contract_disagreement_by_at_least_lambda_to_the_2q():
    q = 4
    mapping = quadratics(rounds=3, local_steps=0, lr=0.05, gossip_steps=q) | {"evaluation": {"every": 1}}
    protocol = finished(mapping, lambda p: spread(p, seed=3))
    lam = second_eigenvalue(protocol.graphs.at(0).W)
    assert lam == pytest.approx(1 / 3 + 2 / 3 * np.cos(2 * np.pi / N), rel=1e-9)  # 0.8047
    errors = [row["consensus_error"] for row in protocol.recorder.rows]
    assert len(errors) == 4 and errors[0] > 0.1
    ratios = [after / before for before, after in zip(errors, errors[1:], strict=False)]
    assert all(ratio <= lam ** (2 * q) * (1 + 1e-6) for ratio in ratios)
    # The other modes (eigenvalues 1/3 and 0.138) die 2300x faster a round: by round 3 the rate is lambda^(2Q) itself.
    assert ratios[-1] == pytest.approx(lam ** (2 * q), rel=1e-2)


@pytest.mark.parametrize(("mixing", "keeps_mean"), [("metropolis_hastings", True), ("uniform_neighbour", False)])
def test_q_gossip_steps_keep_the_network_average_only_under_a_doubly_stochastic_matrix(monkeypatch, mixing,
                                                                                      keeps_mean):
    # On a path (degrees 1 and 2) Metropolis-Hastings is doubly stochastic; uniform-neighbour is row stochastic only
    # (notes pitfall 6), so DFedSAM-MGS's Q = 4 mixing steps move the network average.
    means = []

    def watch(protocol):
        original = protocol.mix_nodes

        def mix_nodes(t):
            before = protocol.nodes.mean()
            sent = original(t)
            means.append((float(before["1.weight"]), float(protocol.nodes.mean()["1.weight"])))
            return sent

        monkeypatch.setattr(protocol, "mix_nodes", mix_nodes)
        spread(protocol, seed=5)

    finished(quadratics(rounds=3, local_steps=2, lr=0.05, algorithm="fedsam", rho=0.05, gossip_steps=4,
                        mixing=mixing, topology="test_path"), watch)
    assert len(means) == 3
    moved = max(abs(after - before) for before, after in means)
    if keeps_mean:
        assert moved < 1e-6
    else:
        assert moved > 1e-2


def dfedavgm_reference(rounds: int, local_steps: int, lr: float, theta: float, gossip_steps: int,
                       reset: bool = True) -> np.ndarray:
    """DFedAvgM in float64 (Sun, Li, Wang 2022): per round y_{k+1} = y_k - lr (y_k - b) + theta (y_k - y_{k-1}) from
    y_{-1} = y_0 = x (momentum reset each round; `reset=False` carries it over), then x <- W^Q y_K."""
    x, last_step = np.zeros(N), np.zeros(N)
    for _ in range(rounds):
        y, y_prev = x, (x - last_step if not reset else x)
        for _ in range(local_steps):
            y, y_prev = y - lr * (y - B) + theta * (y - y_prev), y
        last_step = y - y_prev
        x = np.linalg.matrix_power(RING, gossip_steps) @ y
    return x


def test_dfedavgm_is_local_heavy_ball_restarted_every_round_then_gossip():
    protocol = finished(quadratics(rounds=12, local_steps=3, lr=0.1, algorithm="sgdm", momentum=0.6,
                                   gossip_steps=2))
    x, want = node_values(protocol), dfedavgm_reference(12, 3, 0.1, 0.6, 2)
    assert np.abs(x - want).max() < 1e-5
    assert np.abs(dfedavgm_reference(12, 3, 0.1, 0.6, 2, reset=False) - want).max() > 1e-2
    assert np.abs(dfedavgm_reference(12, 3, 0.1, 0.0, 2) - want).max() > 1e-2
