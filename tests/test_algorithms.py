"""FedAvg and FedProx client rules, FedAvg/FedAvgM/FedAdam server rules and the weighted aggregation."""

from __future__ import annotations

import pytest
import torch
from rulekit import FixedGradient, aggregate_of, batch_of

import fedsim
from fedsim.aggregation import finish_means, total_weights, weighted_sums
from fedsim.clients import ALGORITHMS
from fedsim.clients.fedprox import FedProx, FedProxParams
from fedsim.runtime import Job, JobResult
from fedsim.servers import ServerParams
from fedsim.servers.fedadam import FedAdamParams, FedAdamServer
from fedsim.servers.fedavg import FedAvgServer
from fedsim.servers.fedavgm import FedAvgMParams, FedAvgMServer


def metrics_without_wall_time(result):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "variant")} for r in result.metrics.rows]


def test_fedprox_step_is_sgd_on_the_proximal_objective():
    rule = FedProx(FedProxParams(lr=0.1, mu=2.0))
    w0 = {"w": torch.tensor([1.0, -1.0])}
    state = rule.init({"params": w0}, None, {})
    state = {**state, "params": {"w": torch.tensor([2.0, 0.0])}}
    state = rule.step(state, batch_of(torch.zeros(1), torch.zeros(1)), FixedGradient({"w": torch.tensor([0.5, 0.5])}))
    # w - lr (g + mu (w - w0)) = [2, 0] - 0.1 ([0.5, 0.5] + 2 [1, 1]) = [1.75, -0.25]
    torch.testing.assert_close(state["params"]["w"], torch.tensor([1.75, -0.25]))
    message, client_state = rule.final(state)
    torch.testing.assert_close(message["delta"]["w"], torch.tensor([0.75, 0.75]))
    assert client_state is None


def test_fedprox_with_mu_zero_is_exactly_fedavg_without_stragglers(tiny):
    prox = fedsim.run({**tiny, "algorithm": {**tiny["algorithm"], "mu": 0.0}}, write=False)
    avg_algo = {k: v for k, v in tiny["algorithm"].items() if k != "mu"}
    avg = fedsim.run({**tiny, "algorithm": {**avg_algo, "name": "fedavg"}}, write=False)
    assert metrics_without_wall_time(prox) == metrics_without_wall_time(avg)


def test_fedavg_drops_stragglers_and_fedprox_keeps_their_partial_work(tiny):
    tiny["stragglers"] = {"fraction": 0.5}
    avg_algo = {**{k: v for k, v in tiny["algorithm"].items() if k != "mu"}, "name": "fedavg"}
    avg = fedsim.run({**tiny, "algorithm": avg_algo}, write=False)
    prox0 = fedsim.run({**tiny, "algorithm": {**tiny["algorithm"], "mu": 0.0}}, write=False)
    prox0_drop = fedsim.run({**tiny, "algorithm": {**tiny["algorithm"], "mu": 0.0},
                             "stragglers": {"fraction": 0.5, "handling": "drop"}}, write=False)
    assert ALGORITHMS.get("fedavg").meta["stragglers"] == "drop"
    assert ALGORITHMS.get("fedprox").meta["stragglers"] == "keep"
    # Dropping half of 4 clients: half the uploads; FedAvg is FedProx(mu=0) with stragglers dropped.
    assert avg.metrics.last()["bytes_up"] * 2 == prox0.metrics.last()["bytes_up"]
    assert metrics_without_wall_time(avg) == metrics_without_wall_time(prox0_drop)
    assert avg.metrics.last()["loss"] != prox0.metrics.last()["loss"]


def test_larger_mu_keeps_clients_closer_to_the_global_model(tiny):
    def loss_after_one_round(mu: float) -> float:
        r = fedsim.run({**tiny, "rounds": 1, "algorithm": {**tiny["algorithm"], "mu": mu, "local_epochs": 5}},
                       write=False)
        return r.metrics.last()["loss"]

    # With a strong proximal term (lr * mu = 0.5, still a stable step) the model moves less from its start.
    initial = fedsim.run({**tiny, "rounds": 1}, write=False).metrics.rows[0]["loss"]
    moved = [abs(loss_after_one_round(mu) - initial) for mu in (0.0, 1.0, 10.0)]
    assert moved[0] > moved[1] > moved[2]


def result(delta: list[float], control: list[float], n: int) -> JobResult:
    message = {"delta": {"w": torch.tensor(delta)}, "control": {"w": torch.tensor(control)}}
    return JobResult(Job(0, 0, 1), message, n, n, 16)


def test_weighted_means_weight_each_message_key_by_samples_or_uniformly():
    results = [result([1.0, 0.0], [1.0, 0.0], 1), result([0.0, 4.0], [0.0, 4.0], 3)]
    weighting = {"delta": "samples", "control": "uniform"}
    template = results[0].message
    mean = finish_means(weighted_sums(results, weighting, template), total_weights(results, weighting), template)
    torch.testing.assert_close(mean["delta"]["w"], torch.tensor([0.25, 3.0]))
    torch.testing.assert_close(mean["control"]["w"], torch.tensor([0.5, 2.0]))
    assert total_weights(results, weighting) == {"delta": 4.0, "control": 2.0}


def test_fedavg_server_adds_the_scaled_mean_change():
    server = FedAvgServer(ServerParams(lr=0.5))
    state = server.update(server.init({"w": torch.tensor([1.0])}), aggregate_of({"delta": {"w": torch.tensor([2.0])}}))
    torch.testing.assert_close(state["params"]["w"], torch.tensor([2.0]))


def test_fedavgm_accumulates_momentum():
    server = FedAvgMServer(FedAvgMParams(lr=1.0, momentum=0.5))
    state = server.init({"w": torch.tensor([0.0])})
    delta = aggregate_of({"delta": {"w": torch.tensor([1.0])}})
    state = server.update(state, delta)  # v = 1, w = 1
    state = server.update(state, delta)  # v = 1.5, w = 2.5
    torch.testing.assert_close(state["opt"]["0"]["velocity"]["w"], torch.tensor([1.5]))
    torch.testing.assert_close(state["params"]["w"], torch.tensor([2.5]))


def test_fedadam_follows_reddi_et_al_algorithm_2():
    hp = FedAdamParams(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    server = FedAdamServer(hp)
    state = server.update(server.init({"w": torch.tensor([0.0])}), aggregate_of({"delta": {"w": torch.tensor([2.0])}}))
    m, v = 0.1 * 2.0, 0.01 * 4.0
    torch.testing.assert_close(state["params"]["w"], torch.tensor([0.1 * m / (v**0.5 + 0.01)]))


def test_fedadam_bias_correction_is_an_option_off_by_default():
    corrected = FedAdamServer(FedAdamParams(lr=0.1, beta1=0.9, beta2=0.99, tau=0.01, bias_correction=True))
    state = corrected.update(corrected.init({"w": torch.tensor([0.0])}),
                             aggregate_of({"delta": {"w": torch.tensor([2.0])}}))
    # Kingma & Ba: m_hat = m / (1 - b1) = 2, v_hat = v / (1 - b2) = 4; step = lr * 2 / (2 + tau).
    torch.testing.assert_close(state["params"]["w"], torch.tensor([0.1 * 2.0 / (2.0 + 0.01)]))
    assert FedAdamParams().bias_correction is False


@pytest.mark.parametrize(("server", "lr"), [("fedavgm", 0.5), ("fedadam", 0.02)])
def test_server_optimizers_run_end_to_end(tiny, server, lr):
    r = fedsim.run({**tiny, "server": {"name": server, "lr": lr}}, write=False)
    assert r.metrics.last()["loss"] < r.metrics.rows[0]["loss"]
