"""User-level DP-FedAvg (McMahan et al., ICLR 2018) around any client and server rule: Poisson client sampling, each
client's whole message clipped to S (flat or per layer, optionally after every local step) and weighted by
min(n_k / w_cap, 1), the fixed and bounded estimators with Gaussian noise of std z times their sensitivity, one
accounted release per round (empty rounds too), and one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedsim
from fedsim.accounting import PrivacyLedger
from fedsim.aggregation import Aggregate
from fedsim.clients import LocalTrainingParams
from fedsim.clients.fedavg import LocalSGD
from fedsim.errors import ScenarioError
from fedsim.keyed_random import key_from_seed
from fedsim.oracle import AutogradOracle
from fedsim.params import tree_leaves
from fedsim.privacy import Population
from fedsim.runtime.context import RuntimeContext, client_tensors
from fedsim.runtime.local import client_batches
from fedsim.sampling import plan_round
from fedsim.scenario import load_scenarios
from fedsim.servers import ServerParams
from fedsim.servers.dpfedavg import ClippedClient, DPFedAvgParams, NoisyServer, client_weights, clipped
from fedsim.servers.fedavg import FedAvgServer
from fedsim.simulation import build_simulation

Z, S = 0.8, 0.5


@pytest.fixture
def private(tiny) -> dict:
    return {**tiny, "rounds": 3, "clients_per_round": 4,
            "protocol": {"name": "synchronous", "client_sampling": "poisson"},
            "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20},
            "privacy": {"name": "dpfedavg", "clip": S, "noise_multiplier": Z}}


def norm(tree) -> float:
    return math.sqrt(sum(float(v.double().square().sum()) for v in tree_leaves(tree)))


def test_poisson_client_sampling_draws_each_client_with_probability_k_over_n():
    sizes = np.full(50, 10)
    counts = np.zeros(50)
    rounds = 2000
    for t in range(rounds):
        plan = plan_round(3, t, sizes, 5, 0.0, 1, 10, poisson=True)
        assert len(set(plan.clients.tolist())) == len(plan.clients)
        counts[plan.clients] += 1
    sd = math.sqrt(rounds * 0.1 * 0.9)
    assert np.abs(counts - rounds * 0.1).max() < 5 * sd


def test_without_noise_or_binding_clip_it_is_uniform_fedavg_over_every_client(tiny):
    everyone = {**tiny, "rounds": 2, "clients_per_round": 10, "algorithm": {"name": "fedavg", "lr": 0.05,
                                                                            "batch_size": 20}}
    plain = fedsim.run({**everyone, "server": {"name": "fedavg", "weighting": "uniform"}}, write=False).metrics.rows
    private = fedsim.run({**everyone, "protocol": {"name": "synchronous", "client_sampling": "poisson"},
                          "privacy": {"name": "dpfedavg", "clip": 1e6, "noise_multiplier": 0.0}},
                         write=False).metrics.rows
    for a, b in zip(plain, private, strict=True):
        assert b["client_updates"] == a["client_updates"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["accuracy"] == a["accuracy"]


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_a_clients_message_is_clipped_to_s_and_weighted(clipping):
    message = {"delta": {"w": torch.full((3, 4), 2.0), "b": torch.full((4,), -1.0)}, "control": torch.ones(5)}
    out = clipped(message, S, clipping)
    assert norm(out) <= S * (1 + 1e-6) and norm(out) == pytest.approx(S, rel=1e-5)
    if clipping == "per_layer":
        assert all(float(v.norm()) <= S / math.sqrt(3) * (1 + 1e-6) for v in tree_leaves(out))
    small = {"delta": torch.full((2,), 0.01)}
    assert torch.equal(clipped(small, S, clipping)["delta"], small["delta"])


def test_the_client_weight_is_samples_over_the_cap_at_most_one():
    assert client_weights(np.array([5, 20, 80]), 40.0).tolist() == [0.125, 0.5, 1.0]
    assert client_weights(np.array([5, 20]), None).tolist() == [1.0, 1.0]
    rule = ClippedClient(DPFedAvgParams(clip=1e6, weight_cap=40.0), LocalSGD(LocalTrainingParams(lr=0.1)))
    start = {"params": {"w": torch.zeros(2)}}
    state = rule.init(start, None, {"num_samples": torch.tensor(20), "steps": torch.tensor(0)})
    state = {**state, "inner": {**state["inner"], "params": {"w": torch.tensor([1.0, 2.0])}}}
    assert torch.equal(rule.final(state)[0]["delta"]["w"], torch.tensor([0.5, 1.0]))


def test_clipping_after_every_step_keeps_the_local_model_within_s_of_the_rounds_model(tiny):
    sim = build_simulation(load_scenarios({**tiny, "algorithm": {"name": "fedavg", "lr": 1.0, "batch_size": 5}})[0][0])
    rule = ClippedClient(DPFedAvgParams(clip=0.05, clip_every_step=True), sim.rule)
    start = {"params": sim.model.init_params}
    state = rule.init(start, None, {"num_samples": torch.tensor(100), "steps": torch.tensor(8)})
    x, y = client_tensors(RuntimeContext(sim.rule, sim.objective, sim.data, 0), 0, torch.device("cpu"))
    for batch in client_batches(x, y, 5, 8, torch.Generator().manual_seed(0), key_from_seed(1)):
        state = rule.step(state, batch, AutogradOracle(sim.objective))
        moved = {k: state["inner"]["params"][k] - start["params"][k] for k in start["params"]}
        assert norm(moved) <= 0.05 * (1 + 1e-5)
    assert norm(moved) == pytest.approx(0.05, rel=1e-4)  # lr 1 moves further than S: the projection binds


def aggregate_of_zeros(count: int, key: int, results=()) -> Aggregate:
    mean = {"delta": {"w": torch.zeros(4000)}}
    return Aggregate(mean, {"delta": "uniform"}, {"delta": float(count)}, count, 10, 0, list(results), None,
                     key_from_seed(key))


@pytest.mark.parametrize(("estimator", "std"), [("fixed", Z * S / (0.4 * 10)), ("bounded", 2 * Z * S / (0.4 * 6))])
def test_the_noise_std_is_z_times_the_estimators_sensitivity(estimator, std):
    params = DPFedAvgParams(clip=S, noise_multiplier=Z, estimator=estimator,
                            **({"min_weight": 6.0} if estimator == "bounded" else {}))
    server = NoisyServer(params, FedAvgServer(ServerParams()), Population(np.full(10, 50), 0.4))
    state = server.init({"w": torch.zeros(4000)})
    moved = server.update(state, aggregate_of_zeros(3, key=5))["params"]["w"]
    assert abs(float(moved.std()) / std - 1) < 0.05 and abs(float(moved.mean())) < 0.1 * std
    again = server.update(state, aggregate_of_zeros(3, key=5))["params"]["w"]
    assert torch.equal(moved, again)


def test_the_fixed_estimator_divides_the_sum_by_q_w_and_the_bounded_by_at_least_q_w_min(tiny):
    base = FedAvgServer(ServerParams())
    population = Population(np.full(10, 50), 0.4)
    fixed = NoisyServer(DPFedAvgParams(noise_multiplier=0.0), base, population)
    mean = {"delta": {"w": torch.tensor([1.0, -2.0])}}
    agg = Aggregate(mean, {"delta": "uniform"}, {"delta": 3.0}, 3, 10, 0, [], None, key_from_seed(0))
    step = fixed.update(fixed.init({"w": torch.zeros(2)}), agg)["params"]["w"]
    torch.testing.assert_close(step, torch.tensor([3.0, -6.0]) / 4.0)
    bounded = NoisyServer(DPFedAvgParams(noise_multiplier=0.0, estimator="bounded", min_weight=2.0), base, population)
    assert bounded.denominator(agg) == pytest.approx(0.8)


def test_each_round_is_one_release_of_z_and_q_empty_rounds_included(private):
    spec = {**private, "clients_per_round": 1, "rounds": 6}  # q = 0.1 over 10 clients: some rounds draw no one
    rows = fedsim.run(spec, write=False).metrics.rows
    updates = [b["client_updates"] - a["client_updates"] for a, b in zip(rows, rows[1:], strict=False)]
    assert 0 in updates, "seed 0 draws an empty round at q = 0.1"
    for r in rows:
        ledger = PrivacyLedger()
        if r["round"]:
            ledger.record(Z, 0.1, r["round"])
        assert r["epsilon_rdp"] == pytest.approx(ledger.epsilon(1e-5), rel=1e-12)
    empty = updates.index(0)
    assert rows[empty + 1]["loss"] != rows[empty]["loss"]  # the empty round's noise moved the model


@pytest.mark.parametrize("algorithm, server", [("scaffold", None), ("fedavg", {"name": "fedadam", "lr": 0.01})])
def test_it_wraps_scaffold_and_fedadam(private, algorithm, server):
    spec = {**private, "algorithm": {"name": algorithm, "lr": 0.05, "batch_size": 20}}
    if server is not None:
        spec["server"] = server
    rows = fedsim.run(spec, write=False).metrics.rows
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["epsilon_rdp"] > 0


def test_the_runtimes_agree(private):
    rows = {rt: fedsim.run({**private, "runtime": {"name": rt}}, write=False).metrics.rows
            for rt in ("sequential", "vectorized")}
    for a, b in zip(rows["sequential"], rows["vectorized"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["epsilon_rdp"] == a["epsilon_rdp"]


def test_a_target_epsilon_calibrates_z_over_the_rounds(private):
    spec = {**private, "rounds": 4, "privacy": {"name": "dpfedavg", "clip": S, "target_epsilon": 5.0}}
    last = fedsim.run(spec, write=False).metrics.rows[-1]
    assert 5.0 * 0.99 <= last["epsilon_rdp"] <= 5.0


@pytest.mark.parametrize(("change", "field"), [
    ({"protocol": {"name": "synchronous"}}, "protocol.client_sampling"),
    ({"privacy": {"name": "dpfedavg", "min_weight": 3.0}}, "privacy"),
    ({"privacy": {"name": "dpfedavg", "clip": 0}}, "privacy.clip"),
    ({"privacy": {"name": "dpfedavg", "noise_multiplier": -1.0}}, "privacy.noise_multiplier"),
    ({"privacy": {"name": "dpfedavg", "weight_cap": 0}}, "privacy.weight_cap"),
    ({"privacy": {"name": "dpfedavg", "estimator": "median"}}, "privacy.estimator"),
])
def test_bad_settings_are_one_line_errors_naming_the_field(private, change, field):
    with pytest.raises(ScenarioError) as exc:
        fedsim.run({**private, **change}, write=False)
    assert str(exc.value).startswith(field) and "\n" not in str(exc.value)
