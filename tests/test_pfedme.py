"""pFedMe (Dinh, Tran, Nguyen, NeurIPS 2020, Algorithm 1): the inner loop against the closed-form prox, one local
round against hand computation, the server's beta mixing and weighting, personal models, and bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from rulekit import FixedGradient, aggregate_of, batch_of

import fedsim
from fedsim import api
from fedsim.aggregation import Aggregate, finish_means, total_weights, weighted_sums
from fedsim.clients import ALGORITHMS, Batch
from fedsim.clients.pfedme import PFedMe, PFedMeParams
from fedsim.errors import ScenarioError
from fedsim.models import LinearParams, build_model
from fedsim.oracle import AutogradOracle
from fedsim.params import tree_nbytes
from fedsim.runtime import Job, JobResult
from fedsim.runtime.local import job_info, message_template, run_client
from fedsim.servers import SERVERS
from fedsim.servers.fedavg import FedOpt
from fedsim.servers.pfedme import PFedMeServer, PFedMeServerParams
from fedsim.simulation import build_simulation
from fedsim.tasks import Objective, Regression, RegressionParams

W = {"w": torch.tensor([1.0, -2.0])}
G = {"w": torch.tensor([0.5, 1.0])}


def round_of(rule, server, state, clients: list[Batch], oracle) -> tuple[dict, list[JobResult]]:
    """One synchronous round by hand: every client one job of one local step on its batch, the aggregate built as
    the protocol builds it; returns the new server state and the results."""
    message = server.broadcast(state)
    results = []
    for k, batch in enumerate(clients):
        out, personal, processed = run_client(rule, oracle, message, rule.initial_state(message),
                                              job_info(len(batch.y), 1, 0), [batch])
        results.append(JobResult(Job(0, k, 1), out, len(batch.y), processed, tree_nbytes(out), personal))
    template = message_template(rule, message)
    weighting = server.weighting(template)
    totals = total_weights(results, weighting)
    mean = finish_means(weighted_sums(results, weighting, template), totals, template)
    aggregate = Aggregate(mean, weighting, totals, len(results), len(clients), 0, results, None,
                          torch.zeros(2, dtype=torch.int64))
    return server.update(state, aggregate), results


def least_squares_client(n: int, d: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    return batch_of(x, x @ torch.randn(d, generator=gen) + 0.1 * torch.randn(n, generator=gen))


def closed_form_prox(batch: Batch, w: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_theta 1/(2n) ||X theta - y||^2 + lam/2 ||theta - w||^2 = (X'X/n + lam I)^-1 (X'y/n + lam w)."""
    x, y, n = batch.x.double(), batch.y.double(), len(batch.y)
    return torch.linalg.solve(x.T @ x / n + lam * torch.eye(x.shape[1], dtype=torch.float64),
                              x.T @ y / n + lam * w.double().reshape(-1))


def test_with_beta_one_and_many_inner_steps_the_round_lands_on_the_closed_form_prox_of_each_client():
    # lr * lam = 1 makes w_loc = theta after one local round, and beta = 1 with uniform weighting makes the new
    # global model the clients' mean theta: (1/2) (prox_{f_1/lam}(w) + prox_{f_2/lam}(w)) on least squares.
    lam = 2.0
    rule = PFedMe(PFedMeParams(lr=1 / lam, lam=lam, K=300, personal_lr=0.1))
    server = PFedMeServer(PFedMeServerParams(beta=1.0))
    model = build_model("linear", LinearParams(), (4,), 1, seed=0)
    oracle = AutogradOracle(Objective(model, Regression(RegressionParams())))
    w = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    clients = [least_squares_client(32, 4, seed=1), least_squares_client(48, 4, seed=2)]
    new, results = round_of(rule, server, server.init({"1.weight": w}), clients, oracle)
    proxes = [closed_form_prox(batch, w, lam) for batch in clients]
    for prox, result in zip(proxes, results, strict=True):
        torch.testing.assert_close(result.client_state["1.weight"].double().reshape(-1), prox, rtol=1e-5, atol=1e-6)
        assert float((prox - w.double().reshape(-1)).norm()) > 0.5  # the prox really moved away from w
    torch.testing.assert_close(new["params"]["1.weight"].double().reshape(-1), (proxes[0] + proxes[1]) / 2,
                               rtol=1e-5, atol=1e-6)


def test_two_local_rounds_match_hand_computation_with_theta_warm_started():
    rule = PFedMe(PFedMeParams(lr=0.05, lam=3.0, K=2, personal_lr=0.1))
    state = rule.init({"params": W}, rule.initial_state({"params": W}), job_info(10, 2, 0))
    batch, oracle = batch_of(torch.zeros(1), torch.zeros(1)), FixedGradient(G)
    state = rule.step(state, batch, oracle)
    # theta1 = w - 0.1 g; theta2 = theta1 - 0.1 (g + 3 (theta1 - w)) = w - 0.17 g; w_loc = w - 0.15 (w - theta2).
    torch.testing.assert_close(state["theta"]["w"], W["w"] - 0.17 * G["w"])
    torch.testing.assert_close(state["local"]["w"], W["w"] - 0.0255 * G["w"])
    state = rule.step(state, batch, oracle)
    # theta continues from w - 0.17 g (not from w_loc): theta3 = theta2 - 0.1 (g + 3 (-0.17 + 0.0255) g)
    # = w - 0.22665 g, theta4 = w - 0.266305 g; w_loc = w_loc - 0.15 (w_loc - theta4) = w - 0.06162075 g.
    torch.testing.assert_close(state["theta"]["w"], W["w"] - 0.266305 * G["w"])
    message, personal = rule.final(state)
    torch.testing.assert_close(message["delta"]["w"], -0.06162075 * G["w"])
    torch.testing.assert_close(personal["w"], state["theta"]["w"])
    assert rule.step_cost == 3


def test_the_authors_hidden_l2_term_is_off_unless_asked():
    batch, oracle = batch_of(torch.zeros(1), torch.zeros(1)), FixedGradient(G)
    theta = {}
    for l2 in (0.0, 0.001):
        rule = PFedMe(PFedMeParams(lam=3.0, K=1, personal_lr=0.1, personal_l2=l2))
        theta[l2] = rule.step(rule.init({"params": W}, None, job_info(10, 1, 0)), batch, oracle)["theta"]["w"]
        torch.testing.assert_close(theta[l2], W["w"] - 0.1 * (G["w"] + l2 * W["w"]))
    assert torch.equal(theta[0.0], W["w"] - 0.1 * G["w"])
    assert not torch.allclose(theta[0.0], theta[0.001], rtol=0, atol=1e-5)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_server_mixes_the_mean_local_model_with_weight_beta(beta):
    server = PFedMeServer(PFedMeServerParams(beta=beta))
    w, delta = torch.tensor([1.0, 2.0]), torch.tensor([0.4, -0.2])
    new = server.update(server.init({"w": w}), aggregate_of({"delta": {"w": delta}}, count=2))
    # (1 - beta) w + beta mean(w_loc), with mean(w_loc) = w + mean(delta).
    torch.testing.assert_close(new["params"]["w"], (1 - beta) * w + beta * (w + delta))
    assert server.broadcast(new).keys() == {"params"}


class SizedGradient:
    """An oracle stand-in whose gradient is the batch size in every coordinate (clients of different sizes move
    differently)."""

    def grad(self, params, batch):
        return {"w": torch.full((2,), float(len(batch.y)))}


def test_server_averages_uniformly_as_the_paper_unless_told_to_weight_by_samples():
    rule = PFedMe(PFedMeParams(lr=0.05, lam=3.0, K=1))
    clients = [batch_of(torch.zeros(n), torch.zeros(n)) for n in (10, 30)]
    steps = {}
    for weighting in ("uniform", "samples"):
        server = PFedMeServer(PFedMeServerParams(weighting=weighting))
        new, results = round_of(rule, server, server.init(W), clients, SizedGradient())
        d = [r.message["delta"]["w"] for r in results]
        steps[weighting] = new["params"]["w"] - W["w"]
        expected = (d[0] + d[1]) / 2 if weighting == "uniform" else (10 * d[0] + 30 * d[1]) / 40
        torch.testing.assert_close(steps[weighting], expected)
    assert not torch.allclose(steps["uniform"], steps["samples"])
    assert SERVERS.get("pfedme").obj is PFedMeServer and issubclass(PFedMeServer, FedOpt)
    assert ALGORITHMS.get("pfedme").meta["server"] == "pfedme"


def test_personal_model_is_theta_by_default_and_the_local_copy_when_asked():
    batch, oracle = batch_of(torch.zeros(1), torch.zeros(1)), FixedGradient(G)
    message = {"params": W}
    personal = {}
    for choice in ("theta", "local_copy"):
        rule = PFedMe(PFedMeParams(lr=0.05, lam=3.0, K=2, personal_lr=0.1, personal_model=choice))
        out, state, _ = run_client(rule, oracle, message, rule.initial_state(message), job_info(10, 1, 0), [batch])
        personal[choice] = rule.personalize({"params": {"w": torch.zeros(2)}}, state, batch, oracle)
        torch.testing.assert_close(out["delta"]["w"], -0.0255 * G["w"])  # the message does not depend on it
    torch.testing.assert_close(personal["theta"]["w"], W["w"] - 0.17 * G["w"])
    torch.testing.assert_close(personal["local_copy"]["w"], W["w"] - 0.0255 * G["w"])


def test_a_client_that_never_trained_personalizes_by_the_prox_of_the_global_model():
    batch, oracle = batch_of(torch.zeros(1), torch.zeros(1)), FixedGradient(G)
    theta = PFedMe(PFedMeParams(lam=3.0, K=2, personal_lr=0.1)).personalize({"params": W}, None, batch, oracle)
    torch.testing.assert_close(theta["w"], W["w"] - 0.17 * G["w"])
    copy = PFedMe(PFedMeParams(personal_model="local_copy")).personalize({"params": W}, None, batch, oracle)
    torch.testing.assert_close(copy["w"], W["w"])


@pytest.mark.parametrize(("algorithm", "server", "message"), [
    ({"lam": -1.0}, {}, r"^algorithm\.lam: "),
    ({"lam": 0.0}, {}, r"^algorithm\.lam: "),
    ({"K": 0}, {}, r"^algorithm\.K: "),
    ({"personal_lr": 0.0}, {}, r"^algorithm\.personal_lr: "),
    ({"personal_l2": -0.001}, {}, r"^algorithm\.personal_l2: "),
    ({"personal_model": "w"}, {}, r"^algorithm\.personal_model: "),
    ({}, {"beta": 0.0}, r"^server\.beta: "),
    ({}, {"beta": 2.5}, r"^server\.beta: "),
])
def test_bad_settings_fail_when_the_scenario_is_read_naming_the_field(tiny, algorithm, server, message):
    scenario = {**tiny, "algorithm": {"name": "pfedme", **algorithm}, "server": {"name": "pfedme", **server}}
    with pytest.raises(ScenarioError, match=message):
        fedsim.run(scenario, write=False)


def skewed(runtime: dict, stragglers: float = 0.0) -> dict:
    """Digits over 10 clients by Dirichlet(0.1) label skew, all sampled each round: each client sees few labels."""
    return {"name": "pfedme", "seed": 0, "rounds": 4, "num_clients": 10, "clients_per_round": 10,
            "data": {"name": "digits"}, "partition": {"name": "labeldir", "alpha": 0.1}, "model": {"name": "logreg"},
            "algorithm": {"name": "pfedme", "lr": 0.05, "batch_size": 20, "lam": 15.0, "K": 5, "personal_lr": 0.05},
            "stragglers": {"fraction": stragglers}, "runtime": runtime, "evaluation": {"every": 4}}


def run_keeping(scenario: dict, monkeypatch) -> tuple:
    """Runs the scenario; returns the simulation (client states) and the server states after each round."""
    sims, servers = [], []

    def keep_sim(resolved, data=None):
        sims.append(build_simulation(resolved, data))
        return sims[-1]

    def keep_state(self, state, aggregate):
        servers.append(FedOpt.update(self, state, aggregate))
        return servers[-1]

    monkeypatch.setattr(api, "build_simulation", keep_sim)
    monkeypatch.setattr(PFedMeServer, "update", keep_state)
    result = fedsim.run(scenario, write=False)
    return sims[0], servers, result


def test_personal_models_fit_their_clients_test_data_better_than_the_global_model_under_label_skew(monkeypatch):
    sim, servers, _ = run_keeping(skewed({"name": "sequential"}), monkeypatch)
    w = servers[-1]["params"]
    correct = {"personal": 0, "global": 0}
    total = 0
    for k in range(sim.data.num_clients):
        personal = sim.states.get(k)
        assert personal is not None
        x, y = sim.data.client_test(k)
        total += len(y)
        for name, params in (("personal", personal), ("global", w)):
            correct[name] += int((sim.model.forward(params, x).argmax(1) == y).sum())
    accuracy = {name: c / total for name, c in correct.items()}
    print(f"pfedme under labeldir(0.1): test accuracy personal {accuracy['personal']:.3f} global "
          f"{accuracy['global']:.3f}")
    assert accuracy["personal"] > accuracy["global"] + 0.1


def test_vectorized_pfedme_keeps_the_sequential_personal_models_with_stragglers(monkeypatch):
    seq_sim, _, seq = run_keeping(skewed({"name": "sequential"}, stragglers=0.3), monkeypatch)
    vectorized = {"name": "vectorized", "min_batch": 1, "chunk_size": 4}
    vec_sim, _, vec = run_keeping(skewed(vectorized, stragglers=0.3), monkeypatch)
    for a, b in zip(seq.metrics.rows, vec.metrics.rows, strict=True):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
        assert a["sim_time"] == pytest.approx(b["sim_time"], rel=1e-9)
    stored = [k for k in range(seq_sim.data.num_clients) if seq_sim.states.get(k) is not None]
    assert len(stored) > 0
    for k in range(seq_sim.data.num_clients):
        torch.testing.assert_close(vec_sim.states.get(k), seq_sim.states.get(k), rtol=1e-4, atol=1e-5)
