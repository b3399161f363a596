"""FedSpeed (Sun et al., ICLR 2023, Algorithm 1) and FL-Simulator's form of it (`form: fl_simulator`): the client's
quasi-gradient steps with the prox pull and prox-correction term, the hat variable, both servers and which form gets
which, the switches that reduce it to FedAvg, what each form refuses, and end-to-end behaviour."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from rulekit import aggregate_of, assert_same_client_states, batch_of, sequential_and_vectorized, spy_on_run

import fedsim
from fedsim.clients import ALGORITHMS
from fedsim.clients.fedspeed import FedSpeed, FedSpeedParams
from fedsim.errors import ScenarioError
from fedsim.runtime.local import job_info
from fedsim.sampling import plan_round
from fedsim.scenario import resolve
from fedsim.servers import SERVERS
from fedsim.servers.fedspeed import FedSpeedFLSimulatorServer, FedSpeedFLSimulatorServerParams, FedSpeedServer

A = torch.tensor([1.0, 3.0])
FL_SIMULATOR = {"name": "fedspeed", "form": "fl_simulator"}


class Quadratic:
    """Oracle stand-in for f(w) = sum a w^2 / 2 (gradient a * w), recording the batches it is asked about."""

    def __init__(self, a=A):
        self.a, self.batches = a, []

    def grad(self, params, batch):
        self.batches.append(batch)
        return {k: self.a * w for k, w in params.items()}


def run_job(rule, anchor, h, steps, oracle):
    state = rule.init({"params": {"w": anchor}}, None if h is None else {"w": h}, job_info(10, steps, 0))
    for _ in range(steps):
        state = rule.step(state, batch_of(torch.zeros(1), torch.zeros(1)), oracle)
    return rule.final(state)


def test_the_hat_variable_and_state_follow_the_papers_recursion_in_g_hat_over_rounds():
    lr, rho, alpha, lam = 0.1, 0.3, 0.75, 2.0
    rule = FedSpeed(FedSpeedParams(lr=lr, rho=rho, alpha=alpha, lam=lam))
    anchors = [torch.tensor([2.0, -1.0]), torch.tensor([1.5, 0.5])]
    g_hat, h = torch.zeros(2), None
    for anchor in anchors:
        # Algorithm 1 as written, in the paper's own variable g^_i.
        x = anchor.clone()
        for _ in range(3):
            g1 = A * x
            g2 = A * (x + rho * g1 / g1.norm())
            x = x - lr * ((1 - alpha) * g1 + alpha * g2 - g_hat + (x - anchor) / lam)
        g_hat = g_hat - (x - anchor) / lam
        hat = x - lam * g_hat
        message, state = run_job(rule, anchor, h, 3, Quadratic())
        torch.testing.assert_close(message["delta"]["w"], hat - anchor)
        torch.testing.assert_close(state["w"], -lam * g_hat)
        h = state["w"]
    assert float(g_hat.abs().max()) > 0.1


def test_both_gradients_of_a_step_see_the_same_minibatch():
    oracle = Quadratic()
    run_job(FedSpeed(FedSpeedParams()), torch.tensor([1.0, 1.0]), None, 2, oracle)
    assert len(oracle.batches) == 4
    assert oracle.batches[0] is oracle.batches[1] and oracle.batches[2] is oracle.batches[3]


def test_with_zero_loss_local_iterates_contract_toward_the_anchor_minus_h():
    rule = FedSpeed(FedSpeedParams(lr=0.5, lam=1.0))
    anchor, h = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    message, state = run_job(rule, anchor, h, 40, Quadratic(torch.zeros(2)))
    # x <- x - lr (x - x^t + h) / lambda has its fixed point at x^t - h (the sign FLGo's port gets wrong).
    x_k = anchor + state["w"] - h
    torch.testing.assert_close(x_k, anchor - h)
    torch.testing.assert_close(message["delta"]["w"], (x_k - anchor) + state["w"])


def test_without_correction_the_rule_is_stateless_and_sends_its_model_change():
    rule = FedSpeed(FedSpeedParams(lr=0.1, rho=0.0, lam=4.0, correction=False))
    anchor = torch.tensor([1.0, -2.0])
    assert rule.initial_state({"params": {"w": anchor}}) is None
    message, state = run_job(rule, anchor, None, 1, Quadratic())
    assert state is None
    # From x = x^t the prox pull is zero: one plain gradient step.
    torch.testing.assert_close(message["delta"]["w"], -0.1 * A * anchor)


def test_fl_simulator_form_steps_on_the_ascent_gradient_alone_and_sends_the_model_change():
    lr, rho, lam = 0.1, 0.3, 2.0
    rule = FedSpeed(FedSpeedParams(lr=lr, rho=rho, lam=lam, form="fl_simulator"))
    anchor, h = torch.tensor([2.0, -1.0]), torch.tensor([0.2, 0.4])
    x = anchor.clone()
    for _ in range(2):
        g1 = A * x
        # FL-Simulator client/fedspeed.py: g2 + lamb (h - x^t) + lamb x, lamb = 1 / lambda.
        x = x - lr * (A * (x + rho * g1 / g1.norm()) + (h - anchor + x) / lam)
    message, state = run_job(rule, anchor, h, 2, Quadratic())
    torch.testing.assert_close(message["delta"]["w"], x - anchor)
    torch.testing.assert_close(state["w"], h + x - anchor)


def test_fl_simulator_server_adds_its_all_client_correction_grown_by_the_sampled_fraction():
    server = FedSpeedFLSimulatorServer(FedSpeedFLSimulatorServerParams())
    state = {**server.init({"w": torch.tensor([1.0, 2.0])}), "correction": {"w": torch.tensor([0.1, -0.1])}}
    new = server.update(state, aggregate_of({"delta": {"w": torch.tensor([0.4, -0.2])}}, count=2, population=10))
    torch.testing.assert_close(new["correction"]["w"], torch.tensor([0.1 + 0.2 * 0.4, -0.1 - 0.2 * 0.2]))
    torch.testing.assert_close(new["params"]["w"], torch.tensor([1.0 + 0.4 + 0.18, 2.0 - 0.2 - 0.14]))
    assert server.broadcast(new).keys() == {"params"}


@pytest.mark.parametrize(("algorithm", "server"), [
    ({"name": "fedspeed"}, "fedspeed"),
    ({"name": "fedspeed", "form": "paper", "alpha": 0.5}, "fedspeed"),
    (FL_SIMULATOR, "fedspeed_fl_simulator"),
    ({**FL_SIMULATOR, "alpha": 1.0}, "fedspeed_fl_simulator"),
])
def test_each_form_gets_its_own_server_by_default(tiny, algorithm, server):
    assert resolve({**tiny, "algorithm": algorithm}, None).components["server"].name == server


def test_registry_holds_one_fedspeed_of_two_gradients_a_step_and_both_servers_average_uniformly():
    assert [name for name in ALGORITHMS.names() if name.startswith("fedspeed")] == ["fedspeed"]
    assert ALGORITHMS.get("fedspeed").obj.step_cost == 2
    assert SERVERS.get("fedspeed").obj is FedSpeedServer
    assert SERVERS.get("fedspeed_fl_simulator").obj is FedSpeedFLSimulatorServer
    assert FedSpeedServer(SERVERS.get("fedspeed").params()).weighting({"delta": {}}) == {"delta": "uniform"}


def test_fedspeed_with_rho_zero_no_prox_and_no_correction_gives_fedavgs_metrics_bit_for_bit(tiny):
    local = {"lr": 0.05, "batch_size": 20, "local_epochs": 2}
    off = {"rho": 0.0, "lam": math.inf, "correction": False}
    speed = fedsim.run({**tiny, "algorithm": {"name": "fedspeed", **off, **local}}, write=False).metrics.rows
    avg = fedsim.run({**tiny, "algorithm": {"name": "fedavg", **local}, "server": {"name": "fedavg",
                                                                                  "weighting": "uniform"}},
                     write=False).metrics.rows
    assert len(speed) == len(avg) == tiny["rounds"] + 1
    for s, f in zip(speed, avg, strict=True):
        assert {k: v for k, v in s.items() if not k.endswith("_time")} == \
            {k: v for k, v in f.items() if not k.endswith("_time")}
    assert speed[-1]["loss"] < speed[0]["loss"]


def test_with_every_client_sampled_and_alpha_one_the_paper_and_fl_simulator_forms_agree(tiny):
    base = {**tiny, "clients_per_round": tiny["num_clients"], "partition": {"name": "labeldir", "alpha": 0.3}}
    local = {"lr": 0.2, "batch_size": 20, "local_epochs": 2, "lam": 1.0}
    paper = fedsim.run({**base, "algorithm": {"name": "fedspeed", "alpha": 1.0, **local}}, write=False).metrics.rows
    flsim = fedsim.run({**base, "algorithm": {**FL_SIMULATOR, **local}}, write=False).metrics.rows
    fedavg = fedsim.run({**base, "algorithm": {"name": "fedavg", "lr": 0.2, "batch_size": 20, "local_epochs": 2}},
                        write=False).metrics.last()
    for a, b in zip(paper, flsim, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    assert not math.isclose(paper[-1]["loss"], fedavg["loss"], rel_tol=1e-2)


def test_fl_simulator_server_correction_stays_the_mean_of_every_clients_h_end_to_end(tiny, monkeypatch):
    sims, servers = spy_on_run(monkeypatch, FedSpeedFLSimulatorServer)
    fedsim.run({**tiny, "algorithm": {**FL_SIMULATOR, "lr": 0.05, "batch_size": 20}}, write=False)
    sim = sims[0]
    sampled = {int(c) for t in range(tiny["rounds"]) for c in plan_round(
        tiny["seed"], t, sim.data.train_sizes, tiny["clients_per_round"], 0.0, 1, 20).clients}
    stored = {k for k in range(tiny["num_clients"]) if sim.states.get(k) is not None}
    assert stored == sampled and len(stored) < tiny["num_clients"]
    mean_h = {name: sum(sim.states.get(k)[name] for k in stored) / tiny["num_clients"]
              for name in sim.model.init_params}
    torch.testing.assert_close(servers[-1]["correction"], mean_h, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("algorithm", [{"name": "fedspeed"}, FL_SIMULATOR], ids=["paper", "fl_simulator"])
def test_vectorized_fedspeed_gives_the_sequential_numbers_and_states_with_stragglers_kept(tiny, algorithm,
                                                                                        monkeypatch):
    base = {**tiny, "rounds": 4, "partition": {"name": "labeldir", "alpha": 0.5},
            "algorithm": {**algorithm, "lr": 0.05, "batch_size": 7, "local_epochs": 2},
            "stragglers": {"fraction": 0.5, "handling": "keep"}}
    sequential, vectorized, sims = sequential_and_vectorized(monkeypatch, base, {"chunk_size": 3, "min_batch": 1})
    for a, b in zip(sequential.metrics.rows, vectorized.metrics.rows, strict=True):
        for key in ("loss", "test_loss", "accuracy", "bytes_up"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-9), (key, a, b)
    assert_same_client_states(sims, tiny["num_clients"])


def skewed_digits(algorithm: dict, seed: int, clients_per_round: int) -> dict:
    """Digits over 20 clients by Dirichlet(0.1) label skew, many local steps at a large step size: clients drift to
    their own optima, which FedSpeed's prox pull and correction are meant to counter."""
    return {"name": "drift", "seed": seed, "rounds": 10, "num_clients": 20, "clients_per_round": clients_per_round,
            "data": {"name": "digits"}, "partition": {"name": "labeldir", "alpha": 0.1}, "model": {"name": "logreg"},
            "algorithm": {**algorithm, "lr": 0.5, "batch_size": 40, "local_epochs": 3},
            "evaluation": {"every": 10}}


@pytest.mark.parametrize(("algorithm", "clients_per_round"), [({"name": "fedspeed"}, 20), (FL_SIMULATOR, 5)],
                         ids=["paper", "fl_simulator"])
def test_fedspeed_reaches_lower_training_loss_than_fedavg_under_label_skew(algorithm, clients_per_round):
    losses = {name: [fedsim.run(skewed_digits(a, seed, clients_per_round), write=False).metrics.last()["loss"]
                     for seed in range(2)] for name, a in (("fedavg", {"name": "fedavg"}), ("fedspeed", algorithm))}
    for name, values in losses.items():
        print(f"{name}: training loss mean {statistics.mean(values):.4f} per seed {[round(v, 4) for v in values]}")
    assert all(s < f - 0.1 for s, f in zip(losses["fedspeed"], losses["fedavg"], strict=True))


@pytest.mark.parametrize(("algorithm", "message"), [
    ({"name": "fedspeed", "rho": -0.1}, r"^algorithm\.rho: Input should be greater than or equal to 0"),
    ({"name": "fedspeed", "lam": 0.0}, r"^algorithm\.lam: Input should be greater than 0"),
    ({"name": "fedspeed", "lam": -1.0}, r"^algorithm\.lam: Input should be greater than 0"),
    ({"name": "fedspeed", "lam": math.nan}, r"^algorithm\.lam: Input should be greater than 0"),
    ({"name": "fedspeed", "alpha": -0.1}, r"^algorithm\.alpha: Input should be greater than or equal to 0"),
    ({"name": "fedspeed", "alpha": 1.5}, r"^algorithm\.alpha: Input should be less than or equal to 1"),
    ({"name": "fedspeed", "form": "flsim"}, r"^algorithm\.form: Input should be 'paper' or 'fl_simulator'"),
    ({**FL_SIMULATOR, "alpha": 0.5}, r"^algorithm\.alpha: the fl_simulator form steps on the ascent-point gradient "),
    ({**FL_SIMULATOR, "alpha": 1.5}, r"^algorithm\.alpha: Input should be less than or equal to 1"),
    ({**FL_SIMULATOR, "correction": False}, r"^algorithm\.correction: the fl_simulator form always keeps h_i"),
    ({**FL_SIMULATOR, "lam": 0.0}, r"^algorithm\.lam: Input should be greater than 0"),
])
def test_bad_hyperparameters_are_refused_naming_the_field(tiny, algorithm, message):
    with pytest.raises(ScenarioError, match=message):
        fedsim.run({**tiny, "algorithm": algorithm}, write=False)


def test_fl_simulator_server_refuses_sample_weighting(tiny):
    with pytest.raises(ScenarioError, match=r"^server\.weighting: Input should be 'uniform'"):
        fedsim.run({**tiny, "algorithm": FL_SIMULATOR,
                    "server": {"name": "fedspeed_fl_simulator", "weighting": "samples"}}, write=False)


@pytest.mark.parametrize(("form", "server"), [("fl_simulator", "fedspeed"), ("paper", "fedspeed_fl_simulator")])
def test_a_form_paired_with_the_other_forms_server_is_refused(tiny, form, server):
    with pytest.raises(ScenarioError, match=rf"^server\.name: FedSpeed's {form} form needs server"):
        fedsim.run({**tiny, "algorithm": {"name": "fedspeed", "form": form}, "server": {"name": server}},
                   write=False)
