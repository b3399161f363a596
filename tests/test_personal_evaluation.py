"""Personalized evaluation: each client's own model scored on its own test split, reported as a distribution over
clients next to the global model's metrics."""

from __future__ import annotations

import pytest
import torch

import fedsim
from fedsim.clients import ALGORITHMS, LocalTrainingParams
from fedsim.clients.fedavg import LocalSGD
from fedsim.data import build_federated_data
from fedsim.models import build_model
from fedsim.personal import personal_figures
from fedsim.registry import Entry
from fedsim.report import format_table, write_plot
from fedsim.runtime.sequential import SequentialRuntime


class KeepLastModel(LocalSGD):
    """Test rule: a client's personal model is the model its last job ended with."""

    def initial_state(self, server_message):
        return {k: torch.zeros_like(v) for k, v in server_message["params"].items()}

    def final(self, state):
        message, _ = super().final(state)
        return message, state["params"]

    def personalize(self, server_message, client_state, data, oracle):
        return client_state


class GlobalAsPersonal(LocalSGD):
    """Test rule without state whose personal model is the global one."""

    def personalize(self, server_message, client_state, data, oracle):
        assert client_state is None
        return server_message["params"]


@pytest.fixture
def personal_rules(monkeypatch):
    meta = {"stragglers": "drop", "server": "fedavg"}
    monkeypatch.setitem(ALGORITHMS._entries, "keeplast", Entry("keeplast", KeepLastModel, LocalTrainingParams, meta))
    monkeypatch.setitem(ALGORITHMS._entries, "globalpm", Entry("globalpm", GlobalAsPersonal, LocalTrainingParams,
                                                               meta))


def run(tiny, algorithm: str, runtime: str = "sequential", **extra):
    return fedsim.run({**tiny, "runtime": {"name": runtime},
                       "algorithm": {"name": algorithm, "lr": 0.05, "batch_size": 20}, **extra}, write=False)


def test_stateful_rules_are_scored_on_the_clients_that_trained_with_their_own_models(tiny, personal_rules,
                                                                                     monkeypatch):
    trained: list[set[int]] = []
    states: dict[int, dict] = {}
    original = SequentialRuntime.run_jobs

    def spy(self, jobs, starts):
        results = original(self, jobs, starts)
        trained.append((trained[-1] if trained else set()) | {r.client for r in results})
        states.update({r.client: r.client_state for r in results})
        return results

    monkeypatch.setattr(SequentialRuntime, "run_jobs", spy)
    rows = run(tiny, "keeplast").metrics.rows
    assert rows[0]["personal_clients"] == 0 and "personal_accuracy" not in rows[0]
    last = rows[-1]
    assert last["personal_clients"] == len(trained[-1]) < tiny["num_clients"]
    data = build_federated_data("digits", {}, "iid", {}, tiny["num_clients"], tiny["seed"])
    accuracy = {}
    for client in trained[-1]:
        x, y = data.client_test(client)
        model = build_model("logreg", {}, data.feature_shape, data.num_classes, 0)
        predicted = model.forward(states[client], x).argmax(1)
        accuracy[client] = float((predicted == y).double().mean())
    values = sorted(accuracy.values())
    assert last["personal_accuracy"] == pytest.approx(sum(values) / len(values), rel=1e-9)
    assert last["personal_accuracy_worst10"] == pytest.approx(values[0], rel=1e-9)
    assert sum(last["personal_accuracy_histogram"]) == len(values)


def test_a_stateless_rule_is_scored_on_every_client_and_pooled_equals_the_global_figure(tiny, personal_rules):
    rows = run(tiny, "globalpm").metrics.rows
    for row in rows:
        assert row["personal_clients"] == tiny["num_clients"]
        assert row["personal_accuracy_pooled"] == pytest.approx(row["accuracy"], rel=1e-12)
        assert row["personal_test_loss_pooled"] == pytest.approx(row["test_loss"], rel=1e-6)


def test_personal_evaluation_follows_the_evaluation_sample(tiny, personal_rules):
    rows = run(tiny, "globalpm", evaluation={"clients": 4}).metrics.rows
    assert {row["personal_clients"] for row in rows} == {4}
    assert all(row["personal_accuracy_pooled"] == pytest.approx(row["accuracy"], rel=1e-12) for row in rows)


def test_the_vectorized_runtime_gives_the_same_personal_figures(tiny, personal_rules):
    sequential, vectorized = run(tiny, "keeplast").metrics.rows, run(tiny, "keeplast", "vectorized").metrics.rows
    for a, b in zip(sequential, vectorized, strict=True):
        assert a["personal_clients"] == b["personal_clients"]
        if a["personal_clients"]:
            assert a["personal_accuracy"] == pytest.approx(b["personal_accuracy"], rel=1e-6)


def test_rules_without_personal_models_report_no_personal_figures(tiny):
    rows = fedsim.run(tiny, write=False).metrics.rows
    assert not any(key.startswith("personal") for row in rows for key in row)


def test_figures_are_per_client_means_worst_tenth_pooled_sums_and_a_histogram():
    # 10 clients, 0..9 correct out of 10 test samples each; one with no personal model yet.
    correct = torch.arange(10, dtype=torch.float64)
    scored = torch.ones(11, dtype=torch.float64)
    scored[10] = 0
    totals = {"scored": scored,
              "accuracy_sum": torch.cat([correct, torch.tensor([5.0])]), "accuracy_count": torch.full((11,), 10.0),
              "loss_sum": torch.cat([correct, torch.tensor([5.0])]), "loss_count": torch.full((11,), 10.0)}
    figures = personal_figures(totals, ["accuracy"])
    assert figures["personal_clients"] == 10
    assert figures["personal_accuracy"] == pytest.approx(0.45)
    assert figures["personal_accuracy_worst10"] == pytest.approx(0.0)
    assert figures["personal_test_loss_worst10"] == pytest.approx(0.9)
    assert figures["personal_accuracy_pooled"] == pytest.approx(45 / 100)
    assert figures["personal_accuracy_histogram"] == [1] * 10


def test_the_table_and_plot_show_personal_accuracy(tiny, personal_rules, tmp_path):
    rows = run(tiny, "keeplast").metrics.rows
    assert "personal acc" in format_table(rows)
    write_plot(rows, tmp_path / "plot.png", "personal")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_dpsgd_keeps_the_wrapped_rules_personal_model(tiny, personal_rules):
    rows = fedsim.run({**tiny, "runtime": {"name": "sequential"},
                       "algorithm": {"name": "keeplast", "lr": 0.05, "batch_size": 20, "sampling": "poisson"},
                       "privacy": {"name": "dpsgd", "clip": 1.0, "noise_multiplier": 0.5}}, write=False).metrics.rows
    assert rows[-1]["personal_clients"] > 0 and "personal_accuracy" in rows[-1]
