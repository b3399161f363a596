"""Per-FedAvg (Fallah, Mokhtari, Ozdaglar, NeurIPS 2020, Algorithm 1): first-order and Hessian steps against hand
computation on least squares, the Hessian-vector product against the exact one, how a step's minibatch is dealt
into parts in padded and unpadded runtimes, personalization on the training split, and bad settings."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch.func import vmap

import fedsim
from fedsim import api
from fedsim.clients import ALGORITHMS, Batch
from fedsim.clients.perfedavg import PerFedAvg, PerFedAvgParams, hessian_vector_product, split_batch
from fedsim.errors import ScenarioError
from fedsim.models import LinearParams, build_model
from fedsim.oracle import AutogradOracle, FuncOracle
from fedsim.params import tree_map
from fedsim.runtime.local import job_info
from fedsim.simulation import build_simulation
from fedsim.tasks import Objective, Regression, RegressionParams

D = 3
KEY = "1.weight"


def least_squares(ridge: float = 0.0) -> Objective:
    """f(w; X, y) = 1/(2n) ||X w - y||^2 (+ ridge/2 ||w||^2) on a bias-free linear model: gradient
    X'(Xw - y)/n (+ ridge w), Hessian X'X/n (+ ridge I)."""
    return Objective(build_model("linear", LinearParams(), (D,), 1, seed=0), Regression(RegressionParams(ridge=ridge)))


def batch_of(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None) -> Batch:
    return Batch(x, y, torch.ones(len(y)) if w is None else w, torch.zeros(2, dtype=torch.int64),
                 torch.zeros((), dtype=torch.int64))


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen), torch.randn(n, generator=gen)


def grad(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x.T @ (x @ w - y) / len(y)


def hessian(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / len(x)


W0 = torch.tensor([0.5, -1.0, 2.0])


def step(hp: PerFedAvgParams, batch: Batch, oracle) -> torch.Tensor:
    rule = PerFedAvg(hp)
    state = rule.step(rule.init({"params": {KEY: W0.reshape(1, D)}}, None, job_info(len(batch.y), 1, 0)), batch, oracle)
    return state["params"][KEY].reshape(D)


def test_first_order_step_matches_hand_computation_on_two_halves_of_the_minibatch():
    x, y = data(4, 0)
    oracle = AutogradOracle(least_squares())
    new = step(PerFedAvgParams(lr=0.3, alpha=0.2, variant="fo"), batch_of(x, y), oracle)
    # Parts are interleaved: D = rows 0, 2 and D' = rows 1, 3.
    adapted = W0 - 0.2 * grad(W0, x[0::2], y[0::2])
    torch.testing.assert_close(new, W0 - 0.3 * grad(adapted, x[1::2], y[1::2]))


@pytest.mark.parametrize(("hvp", "tolerance"), [("autodiff", 1e-6), ("finite_difference", 1e-4)])
def test_hessian_step_matches_hand_computation_on_three_thirds_of_the_minibatch(hvp, tolerance):
    x, y = data(6, 1)
    oracle = AutogradOracle(least_squares())
    new = step(PerFedAvgParams(lr=0.3, alpha=0.2, hvp=hvp, delta=0.01), batch_of(x, y), oracle)
    adapted = W0 - 0.2 * grad(W0, x[0::3], y[0::3])
    outer = grad(adapted, x[1::3], y[1::3])
    expected = W0 - 0.3 * (outer - 0.2 * hessian(x[2::3]) @ outer)
    torch.testing.assert_close(new, expected, rtol=tolerance, atol=tolerance)


def test_hessian_vector_product_is_the_exact_one_with_padding_masked_under_vmap():
    objective = least_squares(ridge=0.5)
    x, y = data(5, 2)
    v = torch.tensor([1.0, 0.5, -2.0])
    exact = hessian(x) @ v + 0.5 * v
    params = {KEY: W0.reshape(1, D)}
    alone = hessian_vector_product(AutogradOracle(objective), params, batch_of(x, y), {KEY: v.reshape(1, D)})
    torch.testing.assert_close(alone[KEY].reshape(D), exact)
    # Two clients on the vmap axis, the first padded with 3 rows of garbage (weight 0).
    padded_x = torch.stack([torch.cat([x, torch.full((3, D), 50.0)]), torch.cat([x, -x[:3]])])
    padded_y = torch.stack([torch.cat([y, torch.full((3,), 9.0)]), torch.cat([y, y[:3]])])
    w = torch.stack([torch.cat([torch.ones(5), torch.zeros(3)]), torch.ones(8)])
    batched = vmap(lambda b: hessian_vector_product(FuncOracle(objective, weighted=True), params, b,
                                                    {KEY: v.reshape(1, D)}))(
        Batch(padded_x, padded_y, w, torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)))
    torch.testing.assert_close(batched[KEY][0].reshape(D), exact)
    both = torch.cat([x, -x[:3]])
    torch.testing.assert_close(batched[KEY][1].reshape(D), hessian(both) @ v + 0.5 * v)


def test_parts_are_interleaved_so_padding_trails_each_part():
    batch = batch_of(torch.arange(7.0).reshape(7, 1), torch.arange(7.0), torch.tensor([1.0] * 5 + [0.0] * 2))
    parts = split_batch(batch, 3)
    assert [p.y.tolist() for p in parts] == [[0.0, 3.0, 6.0], [1.0, 4.0], [2.0, 5.0]]
    assert [p.w.tolist() for p in parts] == [[1.0, 1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("variant", ["fo", "hf"])
def test_a_padded_vmapped_step_takes_the_unpadded_steps_samples_and_a_step_without_enough_skips(variant):
    """Client 0 has 5 real samples of 8 rows, client 1 only 1 (fewer than the parts): the vmapped step with the
    weighted oracle gives what an unpadded runtime's step on the real rows gives, the model unchanged for client 1."""
    objective = least_squares()
    hp = PerFedAvgParams(lr=0.3, alpha=0.2, variant=variant)
    x, y = data(8, 3)
    alone = [step(hp, batch_of(x[:n], y[:n]), AutogradOracle(objective)) for n in (5, 1)]
    torch.testing.assert_close(alone[1], W0)
    rule = PerFedAvg(hp)
    start = rule.init({"params": {KEY: W0.reshape(1, D)}}, None, job_info(8, 1, 0))
    w = torch.stack([(torch.arange(8) < n).float() for n in (5, 1)])
    batch = Batch(torch.stack([x, x]), torch.stack([y, y]), w, torch.zeros(2, 2, dtype=torch.int64),
                  torch.zeros((), dtype=torch.int64))
    stacked = tree_map(lambda v: torch.stack([v, v]), start)
    new = vmap(rule.step, in_dims=(0, Batch(0, 0, 0, 0, None), None))(stacked, batch,
                                                                      FuncOracle(objective, weighted=True))
    torch.testing.assert_close(new["params"][KEY].reshape(2, D), torch.stack(alone))


def test_personalize_takes_one_alpha_step_on_the_whole_training_split():
    x, y = data(9, 4)
    rule = PerFedAvg(PerFedAvgParams(alpha=0.25))
    personal = rule.personalize({"params": {KEY: W0.reshape(1, D)}}, None, batch_of(x, y),
                                AutogradOracle(least_squares()))
    torch.testing.assert_close(personal[KEY].reshape(D), W0 - 0.25 * grad(W0, x, y))
    assert rule.initial_state({"params": {KEY: W0}}) is None


def test_evaluation_personalizes_every_client_on_its_training_split_never_its_test_split(tiny, monkeypatch):
    sims, seen = [], []
    original = PerFedAvg.personalize

    def keep(scenario, data=None):
        sims.append(build_simulation(scenario, data))
        return sims[-1]

    def record(self, server_message, client_state, data, oracle):
        seen.append(data)
        return original(self, server_message, client_state, data, oracle)

    monkeypatch.setattr(api, "build_simulation", keep)
    monkeypatch.setattr(PerFedAvg, "personalize", record)
    row = fedsim.run({**tiny, "rounds": 1, "algorithm": {"name": "perfedavg"}}, write=False).metrics.last()
    assert row["personal_clients"] == tiny["num_clients"]
    data = sims[0].data
    assert len(seen) == 2 * tiny["num_clients"]  # evaluations at rounds 0 and 1
    for k, batch in enumerate(seen[: tiny["num_clients"]]):
        train_x, train_y = data.client_train(k)
        assert torch.equal(batch.x, train_x) and torch.equal(batch.y, train_y)


def test_step_costs_and_registration():
    assert PerFedAvg(PerFedAvgParams(variant="fo")).step_cost == 1
    assert PerFedAvg(PerFedAvgParams()).step_cost == 2
    assert PerFedAvgParams().variant == "hf" and PerFedAvgParams().hvp == "autodiff"
    entry = ALGORITHMS.get("perfedavg")
    assert entry.meta["server"] == "fedavg" and entry.meta["stragglers"] == "drop"


@pytest.mark.parametrize(("setting", "message"), [
    ({"alpha": 0.0}, r"^algorithm\.alpha: Input should be greater than 0"),
    ({"variant": "so"}, r"^algorithm\.variant: Input should be 'fo' or 'hf'"),
    ({"hvp": "exact"}, r"^algorithm\.hvp: Input should be 'autodiff' or 'finite_difference'"),
    ({"delta": -0.1}, r"^algorithm\.delta: Input should be greater than 0"),
    ({"lr": 0.0}, r"^algorithm\.lr: Input should be greater than 0"),
])
def test_bad_settings_fail_when_the_scenario_is_read_naming_the_field(tiny, setting, message):
    with pytest.raises(ScenarioError, match=message):
        fedsim.run({**tiny, "algorithm": {"name": "perfedavg", **setting}}, write=False)


def test_one_step_personalization_beats_the_global_model_under_label_skew():
    rows = [fedsim.run({"name": "skew", "seed": seed, "rounds": 10, "num_clients": 10, "clients_per_round": 10,
                        "data": {"name": "digits"}, "partition": {"name": "labeldir", "alpha": 0.1},
                        "model": {"name": "logreg"}, "evaluation": {"every": 10},
                        "algorithm": {"name": "perfedavg", "variant": "fo", "lr": 0.1, "alpha": 0.1,
                                      "batch_size": 20}}, write=False).metrics.last() for seed in range(2)]
    for row in rows:
        print(f"global {row['accuracy']:.3f} personalized {row['personal_accuracy']:.3f}")
        assert row["personal_accuracy"] > row["accuracy"] + 0.05
    assert statistics.mean(r["personal_accuracy"] - r["accuracy"] for r in rows) > 0.1
