"""Ditto (Li, Hu, Beirami, Smith, ICML 2021, Algorithm 1): the personal model's proximal SGD beside FedAvg's local
SGD, exactness against LocalSGD at lambda = 0, persistence of v_k, personal evaluation and bad settings."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from rulekit import FixedGradient, assert_same_client_states, batch_of, sequential_and_vectorized

import fedsim
from fedsim.clients import ALGORITHMS, Batch, LocalTrainingParams
from fedsim.clients.ditto import Ditto, DittoParams
from fedsim.clients.fedavg import LocalSGD
from fedsim.errors import ScenarioError
from fedsim.models import MLPParams, build_model
from fedsim.oracle import AutogradOracle
from fedsim.registry import NoParams
from fedsim.runtime.local import job_info, local_steps, run_client
from fedsim.tasks import Classification, Objective

W = {"w": torch.tensor([1.0, -2.0])}
G = {"w": torch.tensor([0.5, 1.0])}


def digits_like(seed: int, steps: int) -> tuple[AutogradOracle, list[Batch]]:
    """An MLP on random 8-feature, 3-class data and `steps` minibatches of 6."""
    gen = torch.Generator().manual_seed(seed)
    model = build_model("mlp", MLPParams(hidden=[5]), (8,), 3, seed=seed)
    oracle = AutogradOracle(Objective(model, Classification(NoParams())))
    batches = [Batch(torch.randn(6, 8, generator=gen), torch.randint(0, 3, (6,), generator=gen), torch.ones(6),
                     torch.zeros(2, dtype=torch.int64), torch.tensor(s)) for s in range(steps)]
    return oracle, batches


def test_with_lambda_zero_the_personal_model_trains_exactly_as_local_sgd_from_its_own_start():
    oracle, batches = digits_like(0, 4)
    w = oracle.objective.model.init_params
    v = {k: p + 0.3 for k, p in w.items()}  # a personal model left by an earlier job
    hp = {"lr": 0.1, "batch_size": 6}
    message, personal, _ = run_client(Ditto(DittoParams(lam=0.0, **hp)), oracle, {"params": w}, v,
                                      job_info(24, 4, 0), batches)
    sgd = LocalSGD(LocalTrainingParams(**hp))
    from_v, _ = local_steps(sgd, sgd.init({"params": v}, None, job_info(24, 4, 0)), batches, oracle)
    from_w, _ = local_steps(sgd, sgd.init({"params": w}, None, job_info(24, 4, 0)), batches, oracle)
    for k in w:
        assert torch.equal(personal[k], from_v["params"][k])
        assert torch.equal(message["delta"][k], from_w["params"][k] - w[k])  # the global part is FedAvg's
    assert not torch.equal(personal["1.weight"], v["1.weight"])


def test_personal_steps_pull_towards_the_received_global_model_at_their_own_step_size():
    rule = Ditto(DittoParams(lr=0.1, lam=2.0, personal_lr=0.05, personal_steps=2))
    v = {"w": torch.tensor([0.0, 1.0])}
    state = rule.step(rule.init({"params": W}, v, job_info(10, 1, 0)), batch_of(torch.zeros(1), torch.zeros(1)),
                      FixedGradient(G))
    message, personal = rule.final(state)
    expected = v["w"]
    for _ in range(2):  # v <- v - eta (g + lam (v - w^t)), w^t fixed through the job
        expected = expected - 0.05 * (G["w"] + 2.0 * (expected - W["w"]))
    torch.testing.assert_close(personal["w"], expected)
    torch.testing.assert_close(message["delta"]["w"], -0.1 * G["w"])
    assert rule.step_cost == 3


def test_the_personal_model_starts_as_the_received_global_model_and_persists_between_jobs():
    oracle, batches = digits_like(1, 2)
    rule = Ditto(DittoParams(lr=0.1, lam=0.5, batch_size=6))
    first = {"params": oracle.objective.model.init_params}
    start = rule.initial_state(first)
    assert start is first["params"]
    _, after_first, _ = run_client(rule, oracle, first, start, job_info(12, 2, 0), batches)
    second = {"params": {k: p - 0.2 for k, p in first["params"].items()}}
    _, after_second, _ = run_client(rule, oracle, second, after_first, job_info(12, 2, 0), batches)
    # The second job continues from v_k, pulled towards the new global model.
    v = after_first
    for batch in batches:
        g = oracle.grad(v, batch)
        v = {k: p - 0.1 * (g[k] + 0.5 * (p - second["params"][k])) for k, p in v.items()}
    torch.testing.assert_close(after_second, v)
    assert rule.personalize(second, after_second, batches[0], oracle) is after_second
    assert rule.personalize(second, None, batches[0], oracle) is second["params"]


def test_ditto_is_registered_with_a_fedavg_server_and_drops_stragglers():
    entry = ALGORITHMS.get("ditto")
    assert entry.meta["server"] == "fedavg" and entry.meta["stragglers"] == "drop"
    assert Ditto(DittoParams()).step_cost == 2
    assert Ditto(DittoParams(lr=0.3)).personal_lr == 0.3


@pytest.mark.parametrize(("setting", "message"), [
    ({"lam": -1.0}, r"^algorithm\.lam: Input should be greater than or equal to 0"),
    ({"personal_lr": 0.0}, r"^algorithm\.personal_lr: Input should be greater than 0"),
    ({"personal_steps": 0}, r"^algorithm\.personal_steps: Input should be greater than or equal to 1"),
])
def test_bad_settings_fail_when_the_scenario_is_read_naming_the_field(tiny, setting, message):
    with pytest.raises(ScenarioError, match=message):
        fedsim.run({**tiny, "algorithm": {"name": "ditto", **setting}}, write=False)


def label_skew(seed: int) -> dict:
    """Digits over 10 clients by Dirichlet(0.1) label skew, every client every round: each trains a personal model."""
    return {"name": "skew", "seed": seed, "rounds": 10, "num_clients": 10, "clients_per_round": 10,
            "data": {"name": "digits"}, "partition": {"name": "labeldir", "alpha": 0.1}, "model": {"name": "logreg"},
            "algorithm": {"name": "ditto", "lr": 0.1, "batch_size": 20, "lam": 0.1}, "evaluation": {"every": 10}}


def test_personal_models_fit_their_clients_test_data_better_than_the_global_model_under_label_skew():
    rows = [fedsim.run(label_skew(seed), write=False).metrics.last() for seed in range(2)]
    for row in rows:
        print(f"global {row['accuracy']:.3f} personal {row['personal_accuracy']:.3f} "
              f"(worst 10% {row['personal_accuracy_worst10']:.3f}) over {row['personal_clients']} clients")
        assert row["personal_clients"] == 10
        assert row["personal_accuracy"] > row["accuracy"] + 0.04
    assert statistics.mean(r["personal_accuracy"] - r["accuracy"] for r in rows) > 0.1


def test_vectorized_ditto_keeps_the_sequential_personal_models_with_stragglers(tiny, monkeypatch):
    base = {**tiny, "rounds": 4, "partition": {"name": "labeldir", "alpha": 0.5},
            "algorithm": {"name": "ditto", "lr": 0.05, "batch_size": 7, "local_epochs": 3, "lam": 0.5,
                          "personal_lr": 0.1},
            "stragglers": {"fraction": 0.5, "handling": "keep"}}
    sequential, vectorized, sims = sequential_and_vectorized(monkeypatch, base, {"chunk_size": 3, "min_batch": 1})
    assert "personal_accuracy" in sequential.metrics.last()
    for a, b in zip(sequential.metrics.rows, vectorized.metrics.rows, strict=True):
        assert a["personal_clients"] == b["personal_clients"]
        for key in ("loss", "accuracy", "personal_accuracy", "personal_test_loss"):
            if key in a:
                assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-9), (key, a, b)
    assert_same_client_states(sims, tiny["num_clients"])
