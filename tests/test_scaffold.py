"""SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1, option II): the client's corrected steps and control
variates, the server's |S|/N control update, and end-to-end behaviour against FedAvg and across runtimes."""

from __future__ import annotations

import math
import statistics

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
from torch.func import vmap

import fedsim
from fedsim.aggregation import Aggregate, finish_means, total_weights, weighted_sums
from fedsim.clients import ALGORITHMS, Batch, LocalTrainingParams
from fedsim.clients.fedavg import LocalSGD
from fedsim.clients.scaffold import Scaffold
from fedsim.models import LogRegParams, build_model
from fedsim.oracle import AutogradOracle
from fedsim.params import Pytree, tree_map, tree_nbytes
from fedsim.registry import NoParams
from fedsim.runtime import Job, JobResult
from fedsim.runtime.local import job_info, message_template, run_client
from fedsim.sampling import plan_round
from fedsim.servers import SERVERS, ServerParams
from fedsim.servers.fedavg import FedAvgServer
from fedsim.servers.scaffold import ScaffoldServer, ScaffoldServerParams
from fedsim.tasks import Classification, Objective

HP = LocalTrainingParams(lr=0.1, batch_size=8, local_epochs=1)


def drive(rule, server, batches: list[Batch], clients: int, rounds: int, oracle) -> list[tuple[Pytree, dict]]:
    """Run `rounds` synchronous rounds by hand, every client taking the same minibatches and the aggregate built as
    the protocol builds it; returns the server state and the clients' states after each round."""
    state = server.init(oracle.objective.model.init_params)
    template = message_template(rule, server.broadcast(state))
    weighting = server.weighting(template)
    stored: dict[int, Pytree | None] = {}
    history = []
    for t in range(rounds):
        message = server.broadcast(state)
        results = []
        for k in range(clients):
            client_state = stored[k] if k in stored else rule.initial_state(message)
            out, new_state, processed = run_client(rule, oracle, message, client_state,
                                                   job_info(len(batches[0].y), len(batches), 0), batches)
            results.append(JobResult(Job(t, k, len(batches)), out, len(batches[0].y), processed, tree_nbytes(out),
                                     new_state))
            stored[k] = new_state
        totals = total_weights(results, weighting)
        mean = finish_means(weighted_sums(results, weighting, template), totals, template)
        aggregate = Aggregate(mean, weighting, totals, len(results), clients, t, results, None,
                              torch.zeros(2, dtype=torch.int64))
        state = server.update(state, aggregate)
        history.append((state, dict(stored)))
    return history


def test_with_identical_client_data_scaffold_follows_fedavg_as_control_variates_cancel():
    gen = torch.Generator().manual_seed(0)
    model = build_model("logreg", LogRegParams(), (5,), 3, seed=0)
    oracle = AutogradOracle(Objective(model, Classification(NoParams())))
    batches = [Batch(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen), torch.ones(8),
                     torch.zeros(2, dtype=torch.int64), torch.tensor(s)) for s in range(4)]
    # Every client sampled (|S| = N), all on the same data: c_i = c after each round, so c - c_i vanishes.
    scaffold = drive(Scaffold(HP), ScaffoldServer(ScaffoldServerParams()), batches, clients=4, rounds=3, oracle=oracle)
    fedavg = drive(LocalSGD(HP), FedAvgServer(ServerParams()), batches, clients=4, rounds=3, oracle=oracle)
    for (s_state, s_clients), (f_state, _) in zip(scaffold, fedavg, strict=True):
        torch.testing.assert_close(s_state["params"], f_state["params"], rtol=1e-6, atol=1e-7)
        assert max(float(v.abs().max()) for v in s_state["control"].values()) > 1e-3
        for c_i in s_clients.values():
            torch.testing.assert_close(c_i, s_state["control"], rtol=1e-6, atol=1e-7)
    assert not torch.equal(scaffold[-1][0]["params"]["1.weight"], model.init_params["1.weight"])


def test_server_control_stays_the_mean_of_every_clients_control_end_to_end(tiny, monkeypatch):
    sims, servers = spy_on_run(monkeypatch, ScaffoldServer)
    algorithm = {"name": "scaffold", "lr": 0.05, "batch_size": 20, "local_epochs": 1}
    fedsim.run({**tiny, "algorithm": algorithm}, write=False)
    sim = sims[0]
    sampled = {int(c) for t in range(tiny["rounds"]) for c in plan_round(
        tiny["seed"], t, sim.data.train_sizes, tiny["clients_per_round"], 0.0, 1, 20).clients}
    stored = {k for k in range(tiny["num_clients"]) if sim.states.get(k) is not None}
    assert stored == sampled and len(stored) < tiny["num_clients"]
    # c_0 = 0 and c += (1/N) sum_S (c_i+ - c_i) keep c = (1/N) sum_i c_i (unsampled clients hold zeros).
    mean_control = {name: sum(sim.states.get(k)[name] for k in stored) / tiny["num_clients"]
                    for name in sim.model.init_params}
    assert len(servers) == tiny["rounds"]
    torch.testing.assert_close(servers[-1]["control"], mean_control, rtol=1e-5, atol=1e-6)


def test_option_two_control_is_the_mean_gradient_along_the_local_path():
    rule = Scaffold(LocalTrainingParams(lr=0.1))
    x, c, c_i, g = (torch.tensor(v) for v in ([1.0, -1.0], [0.5, 0.0], [0.25, 1.0], [2.0, -4.0]))
    state = rule.init({"params": {"w": x}, "control": {"w": c}}, {"w": c_i}, job_info(10, 3, 0))
    for _ in range(3):
        state = rule.step(state, batch_of(torch.zeros(1), torch.zeros(1)), FixedGradient({"w": g}))
    message, new_state = rule.final(state)
    # y = x - K lr (g + c - c_i); option II: c_i+ = c_i - c + (x - y) / (K lr) = g.
    torch.testing.assert_close(message["delta"]["w"], -3 * 0.1 * (g + c - c_i))
    torch.testing.assert_close(new_state["w"], g)
    torch.testing.assert_close(message["control"]["w"], g - c_i)


def test_server_moves_the_control_by_sampled_fraction_times_mean_control_change():
    server = ScaffoldServer(ScaffoldServerParams(lr=0.5))
    state = {**server.init({"w": torch.tensor([1.0, 2.0])}), "control": {"w": torch.tensor([0.1, -0.1])}}
    mean = {"delta": {"w": torch.tensor([0.4, -0.2])}, "control": {"w": torch.tensor([1.0, 3.0])}}
    new = server.update(state, aggregate_of(mean, count=2, population=10))
    torch.testing.assert_close(new["control"]["w"], torch.tensor([0.1 + 0.2 * 1.0, -0.1 + 0.2 * 3.0]))
    torch.testing.assert_close(new["params"]["w"], torch.tensor([1.0 + 0.5 * 0.4, 2.0 - 0.5 * 0.2]))
    assert server.broadcast(new).keys() == {"params", "control"}


def test_scaffold_weights_model_changes_uniformly_unless_told_and_controls_always_uniformly():
    template = {"delta": {}, "control": {}}
    assert ScaffoldServer(ScaffoldServerParams()).weighting(template) == {"delta": "uniform", "control": "uniform"}
    samples = ScaffoldServer(ScaffoldServerParams(weighting="samples"))
    assert samples.weighting(template) == {"delta": "samples", "control": "uniform"}
    entry = ALGORITHMS.get("scaffold")
    assert entry.meta["server"] == "scaffold" and entry.meta["stragglers"] == "drop"
    assert SERVERS.get("scaffold").obj is ScaffoldServer


def test_client_that_took_no_step_sends_zero_control_change_even_under_vmap():
    rule = Scaffold(LocalTrainingParams(lr=0.1))
    start = {"params": {"w": torch.tensor([1.0, -1.0])}, "control": {"w": torch.tensor([0.5, 0.3])}}
    c_i = {"w": torch.tensor([0.2, 0.7])}
    idle = rule.init(start, c_i, job_info(10, 0, 0))
    busy = rule.step(rule.init(start, c_i, job_info(10, 1, 0)), batch_of(torch.zeros(1), torch.zeros(1)),
                     FixedGradient({"w": torch.tensor([1.0, 1.0])}))
    messages, states = vmap(rule.final)(tree_map(lambda *v: torch.stack(v), idle, busy))
    assert all(bool(torch.isfinite(v).all()) for v in (messages["control"]["w"], states["w"]))
    torch.testing.assert_close(messages["control"]["w"][0], torch.zeros(2))
    torch.testing.assert_close(messages["delta"]["w"][0], torch.zeros(2))
    torch.testing.assert_close(states["w"][0], c_i["w"])
    torch.testing.assert_close(states["w"][1], torch.tensor([1.0, 1.0]))


def skewed_digits(algorithm: str, seed: int) -> dict:
    """Digits over 20 clients by Dirichlet(0.1) label skew, 5 a round, many local steps at a large step size:
    the regime where FedAvg's clients drift to their own optima (Karimireddy et al., Section 3)."""
    return {"name": "drift", "seed": seed, "rounds": 15, "num_clients": 20, "clients_per_round": 5,
            "data": {"name": "digits"}, "partition": {"name": "labeldir", "alpha": 0.1}, "model": {"name": "logreg"},
            "algorithm": {"name": algorithm, "lr": 0.5, "batch_size": 40, "local_epochs": 3},
            "evaluation": {"every": 15}}


def test_scaffold_reaches_lower_training_loss_than_fedavg_under_label_skew():
    losses = {a: [fedsim.run(skewed_digits(a, seed), write=False).metrics.last()["loss"] for seed in range(3)]
              for a in ("fedavg", "scaffold")}
    for name, values in losses.items():
        print(f"{name}: training loss mean {statistics.mean(values):.4f} sd {statistics.stdev(values):.4f} "
              f"per seed {[round(v, 4) for v in values]}")
    wins = sum(s < f for s, f in zip(losses["scaffold"], losses["fedavg"], strict=True))
    assert wins >= 2
    assert statistics.mean(losses["scaffold"]) < statistics.mean(losses["fedavg"]) - 0.1


@pytest.mark.parametrize("runtime", [{"chunk_size": 3, "min_batch": 1}, {"min_batch": 3}],
                         ids=["always-vmapped", "last-few-unbatched"])
def test_vectorized_scaffold_gives_the_sequential_numbers_with_stragglers_kept(tiny, runtime, monkeypatch):
    base = {**tiny, "rounds": 5, "partition": {"name": "labeldir", "alpha": 0.5},
            "algorithm": {"name": "scaffold", "lr": 0.05, "batch_size": 7, "local_epochs": 3},
            "stragglers": {"fraction": 0.5, "handling": "keep"}}
    sequential, vectorized, sims = sequential_and_vectorized(monkeypatch, base, runtime)
    sim = sims["sequential"]
    plans = [plan_round(0, t, sim.data.train_sizes, 4, 0.5, 3, 7) for t in range(5)]
    assert any(len(set(p.steps.tolist())) > 1 and p.straggler.any() for p in plans)  # K differs between clients
    for a, b in zip(sequential.metrics.rows, vectorized.metrics.rows, strict=True):
        for key in ("loss", "test_loss", "accuracy", "bytes_up"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-9), (key, a, b)
    assert_same_client_states(sims, tiny["num_clients"])
