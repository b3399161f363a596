"""FedDyn (Acar et al., ICLR 2021, Algorithm 1): the client's regularized steps and dual state, the server's drift
term, how alpha -> 0 relates to FedAvg, the paper's consistency claim on least squares, runtimes and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from rulekit import (
    FixedGradient,
    aggregate_of,
    assert_same_client_states,
    batch_of,
    sequential_and_vectorized,
    spy_on_run,
)

import fedsim
from fedsim.clients import ALGORITHMS
from fedsim.clients.feddyn import FedDyn, FedDynParams
from fedsim.errors import ScenarioError
from fedsim.runtime.local import job_info
from fedsim.servers import SERVERS
from fedsim.servers.feddyn import FedDynServer, FedDynServerParams


def test_local_steps_follow_the_regularized_gradient_and_the_dual_moves_by_minus_alpha_delta():
    rule = FedDyn(FedDynParams(lr=0.1, alpha=0.5))
    x, dual, g = torch.tensor([1.0, -1.0]), torch.tensor([0.2, 0.4]), torch.tensor([1.0, -2.0])
    state = rule.init({"params": {"w": x}}, {"w": dual}, job_info(10, 2, 0))
    for _ in range(2):
        state = rule.step(state, batch_of(torch.zeros(1), torch.zeros(1)), FixedGradient({"w": g}))
    message, new_dual = rule.final(state)
    # By hand: theta_1 = x - 0.1 (g - dual) = [0.92, -0.76]; theta_2 = theta_1 - 0.1 (g - dual + 0.5 (theta_1 - x))
    # = [0.844, -0.532]; delta = [-0.156, 0.468]; dual <- dual - 0.5 delta = [0.278, 0.166].
    torch.testing.assert_close(message["delta"]["w"], torch.tensor([-0.156, 0.468]))
    torch.testing.assert_close(new_dual["w"], torch.tensor([0.278, 0.166]))
    assert rule.initial_state({"params": {"w": x}})["w"].eq(0).all()


def test_adaptive_alpha_divides_alpha_by_the_clients_share_of_the_mean_sample_count():
    rule = FedDyn(FedDynParams(lr=0.1, alpha=0.5, alpha_samples=30.0))
    x = torch.tensor([1.0, -1.0])
    state = rule.init({"params": {"w": x}}, None, job_info(60, 1, 0))
    state = rule.step(state, batch_of(torch.zeros(1), torch.zeros(1)), FixedGradient({"w": torch.tensor([1.0, 2.0])}))
    message, new_dual = rule.final(state)
    # alpha_k = 0.5 * 30 / 60 = 0.25; delta = -0.1 g; dual = -0.25 delta.
    torch.testing.assert_close(message["delta"]["w"], torch.tensor([-0.1, -0.2]))
    torch.testing.assert_close(new_dual["w"], torch.tensor([0.025, 0.05]))


def test_server_adds_the_mean_change_and_the_population_mean_of_accumulated_changes():
    server = FedDynServer(FedDynServerParams())
    state = {**server.init({"w": torch.tensor([1.0, 2.0])}), "drift": {"w": torch.tensor([0.1, -0.1])}}
    new = server.update(state, aggregate_of({"delta": {"w": torch.tensor([0.4, -0.2])}}, count=2, population=10))
    # drift = -h/alpha: 0.1 + (2/10) 0.4 = 0.18, -0.1 + (2/10)(-0.2) = -0.14; theta = theta + mean delta + drift.
    torch.testing.assert_close(new["drift"]["w"], torch.tensor([0.18, -0.14]))
    torch.testing.assert_close(new["params"]["w"], torch.tensor([1.0 + 0.4 + 0.18, 2.0 - 0.2 - 0.14]))
    assert server.broadcast(new).keys() == {"params"}
    assert server.weighting({"delta": {}}) == {"delta": "uniform"}
    entry = ALGORITHMS.get("feddyn")
    assert entry.meta["server"] == "feddyn" and entry.meta["stragglers"] == "drop"
    assert SERVERS.get("feddyn").obj is FedDynServer


def test_server_drift_is_minus_the_mean_dual_state_over_alpha_end_to_end(tiny, monkeypatch):
    sims, servers = spy_on_run(monkeypatch, FedDynServer)
    alpha = 0.1
    fedsim.run({**tiny, "algorithm": {"name": "feddyn", "lr": 0.05, "batch_size": 20, "alpha": alpha}}, write=False)
    sim, m = sims[0], tiny["num_clients"]
    stored = [sim.states.get(k) for k in range(m) if sim.states.get(k) is not None]
    assert 0 < len(stored) < m and len(servers) == tiny["rounds"]
    # h = -alpha/m sum_t sum_{P_t} delta and grad_k = -alpha sum_t delta_k, so -h/alpha = -(1/(alpha m)) sum_k grad_k.
    expected = {name: -sum(s[name] for s in stored) / (alpha * m) for name in sim.model.init_params}
    torch.testing.assert_close(servers[-1]["drift"], expected, rtol=1e-5, atol=1e-7)


HP = {"lr": 0.05, "batch_size": 20, "local_epochs": 2}
UNIFORM_FEDAVG = {"name": "fedavg", "weighting": "uniform"}


def assert_close_rows(a, b, rel: float) -> None:
    assert len(a.metrics.rows) == len(b.metrics.rows)
    for ra, rb in zip(a.metrics.rows, b.metrics.rows, strict=True):
        for key in ("loss", "test_loss", "accuracy"):
            assert math.isclose(ra[key], rb[key], rel_tol=rel), (key, ra, rb)


def test_with_alpha_near_zero_the_client_is_fedavgs_client(tiny):
    dyn = fedsim.run({**tiny, "algorithm": {"name": "feddyn", "alpha": 1e-6, **HP}, "server": UNIFORM_FEDAVG},
                     write=False)
    avg = fedsim.run({**tiny, "algorithm": {"name": "fedavg", **HP}, "server": UNIFORM_FEDAVG}, write=False)
    assert_close_rows(dyn, avg, rel=1e-5)
    assert dyn.metrics.last()["loss"] != avg.metrics.last()["loss"]  # alpha does enter the steps


def test_alpha_cancels_in_the_server_so_near_zero_alpha_feddyn_is_not_fedavg(tiny):
    # Round 1 from zero states: theta^1 = theta^0 + (1 + |P|/m) mean(delta), FedAvg with server step 1 + 4/10.
    one = {**tiny, "rounds": 1}
    dyn = fedsim.run({**one, "algorithm": {"name": "feddyn", "alpha": 1e-6, **HP}}, write=False)
    stepped = fedsim.run({**one, "algorithm": {"name": "fedavg", **HP}, "server": {**UNIFORM_FEDAVG, "lr": 1.4}},
                         write=False)
    assert_close_rows(dyn, stepped, rel=1e-5)
    # Later rounds keep adding every past change (-h/alpha does not shrink with alpha): FedAvg is not the limit.
    dyn = fedsim.run({**tiny, "algorithm": {"name": "feddyn", "alpha": 1e-6, **HP}}, write=False)
    avg = fedsim.run({**tiny, "algorithm": {"name": "fedavg", **HP}, "server": UNIFORM_FEDAVG}, write=False)
    assert dyn.metrics.last()["loss"] < avg.metrics.last()["loss"] - 0.1


def heterogeneous_least_squares(algorithm: dict) -> dict:
    """Four least-squares clients with different true models, all sampled, 20 full-batch local steps a round."""
    return {"name": "ls", "rounds": 30, "num_clients": 4, "clients_per_round": 4, "evaluation": {"every": 30},
            "data": {"name": "least_squares", "num_features": 5, "samples_per_client": 40, "heterogeneity": 1.0,
                     "noise": 0.1, "test_fraction": 0.25},
            "model": {"name": "linear"}, "algorithm": {"lr": 0.1, "batch_size": 1000, "local_epochs": 20, **algorithm}}


def test_feddyn_reaches_the_global_optimum_where_fedavgs_many_local_steps_stall():
    # The paper's claim (Section 3): at a consensus the dynamic regularizer makes the clients' stationary points the
    # global one, however many local steps; FedAvg's fixed point drifts towards the clients' own optima.
    dyn = fedsim.run(heterogeneous_least_squares({"name": "feddyn", "alpha": 1.0}), write=False)
    avg = fedsim.run(heterogeneous_least_squares({"name": "fedavg"}), write=False)
    start = dyn.metrics.rows[0]["distance_to_optimum"]
    assert dyn.metrics.last()["distance_to_optimum"] < 1e-5 * start
    assert avg.metrics.last()["distance_to_optimum"] > 0.05 * start


def test_vectorized_feddyn_with_adaptive_alpha_gives_the_sequential_numbers_and_states(tiny, monkeypatch):
    base = {**tiny, "rounds": 4, "partition": {"name": "quantity", "sigma": 1.0},
            "algorithm": {"name": "feddyn", "lr": 0.05, "batch_size": 7, "local_epochs": 2, "alpha": 0.1,
                          "alpha_samples": 30.0},
            "stragglers": {"fraction": 0.5, "handling": "keep"}}
    sequential, vectorized, sims = sequential_and_vectorized(monkeypatch, base, {"chunk_size": 3, "min_batch": 1})
    assert_close_rows(sequential, vectorized, rel=1e-5)
    assert_same_client_states(sims, tiny["num_clients"])
    assert len(set(sims["sequential"].data.train_sizes.tolist())) > 1  # the clients' alphas differ


@pytest.mark.parametrize(("field", "value"), [("alpha", -1.0), ("alpha", 0.0), ("alpha_samples", 0.0)])
def test_non_positive_alpha_is_refused_naming_the_field(tiny, field, value):
    with pytest.raises(ScenarioError, match=rf"^algorithm\.{field}: Input should be greater than 0"):
        fedsim.run({**tiny, "algorithm": {"name": "feddyn", field: value}}, write=False)


def test_feddyn_server_refuses_sample_weighting(tiny):
    with pytest.raises(ScenarioError, match=r"^server\.weighting: Input should be 'uniform'"):
        fedsim.run({**tiny, "algorithm": {"name": "feddyn"}, "server": {"name": "feddyn", "weighting": "samples"}},
                   write=False)
