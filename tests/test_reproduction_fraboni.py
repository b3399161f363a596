"""Fraboni et al. (JMLR 2023) on MNIST-1D, 20 clients with F-80 speeds whose labels follow their speed
(scenarios/fraboni_async.yaml): asynchronous FedAvg with identical weights is biased toward the fast clients: its
training loss under the clients' p-weighted objective ends above the other methods', its global model scores the
fast clients' labels better and the slow clients' worse than theirs, and it is ahead of them all on the surrogate
objective that weights client i by 1 / tau_i. Weighting by job time and FedFix remove the bias. CI runs 20
simulated seconds on two seeds; the full 100 seconds on three seeds is marked slow. The exact equalities (FedFix
with a tick >= the slowest job, and F-0 with tick 1, are synchronous FedAvg) are in tests/test_fedfix.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedsim
from fedsim.evaluation import split_sums
from fedsim.recording import Recorder

SCENARIO = Path(__file__).parent.parent / "scenarios" / "fraboni_async.yaml"
UNBIASED = ["fedavg_sync", "fedfix", "async_weighted"]
SLOW, FAST = range(0, 4), range(16, 20)
"""The four slowest clients (job times 1 to 0.87 s) hold digits 0-1, the four fastest (0.33 to 0.2 s) 8-9."""
TAU = 1 - 0.8 * np.arange(20) / 19
"""F-80 job times (the slowest 1): identical weights make client i count in proportion to 1 / tau_i."""


def run_with_final_models(monkeypatch, overrides: dict[str, Any]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """Every variant's metrics rows, and for its last evaluated (global) model: the test accuracy on the slow and on
    the fast clients' test samples, and the training loss under identical weights' surrogate objective
    sum_i q_i f_i, q_i proportional to n_i / tau_i; read off the evaluations the run makes."""
    final: dict[str, tuple[Any, Any]] = {}

    def spy(self, round_index, sim_time, params, *args, evaluate=Recorder.evaluate, **kwargs):
        final[kwargs.get("variant") or self.variant] = (kwargs.get("evaluator") or self.evaluator, params)
        return evaluate(self, round_index, sim_time, params, *args, **kwargs)

    monkeypatch.setattr(Recorder, "evaluate", spy)
    result = fedsim.run(SCENARIO, overrides=overrides, write=False)
    rows = {v: [r for r in result.metrics.rows if r["variant"] == v] for v in final}
    groups = {v: {"slow": accuracy_on(ev, params, SLOW), "fast": accuracy_on(ev, params, FAST),
                  "surrogate": surrogate_loss(ev, params)} for v, (ev, params) in final.items()}
    return rows, groups


def accuracy_on(evaluator, params, clients: range) -> float:
    """Pooled test accuracy of `params` over the test samples of `clients`."""
    sums = [split_sums(evaluator.objective, params, *evaluator.data.client_test(k)) for k in clients]
    return float(sum(s["accuracy"] for s in sums) / sum(s["count"] for s in sums))


def surrogate_loss(evaluator, params) -> float:
    """Training loss with client i weighted by n_i / tau_i (how often its samples reach the server)."""
    sums = [split_sums(evaluator.objective, params, *evaluator.data.client_train(k)) for k in range(len(TAU))]
    return float(sum(s["loss"] / t for s, t in zip(sums, TAU, strict=True)) /
                 sum(s["count"] / t for s, t in zip(sums, TAU, strict=True)))


def late_loss(rows: list[dict], budget: float) -> float:
    """Mean training loss over the last quarter of the simulated time (asynchronous losses jitter per step)."""
    return float(np.mean([r["loss"] for r in rows if r["sim_time"] >= 0.75 * budget]))


def assert_identical_weights_are_biased(rows: dict[str, list[dict]], groups: dict[str, dict], budget: float) -> None:
    loss = {v: late_loss(r, budget) for v, r in rows.items()}
    gap = {v: g["fast"] - g["slow"] for v, g in groups.items()}
    assert all(loss["async_identical"] > loss[v] for v in UNBIASED), loss
    assert all(gap["async_identical"] > gap[v] + 0.1 for v in UNBIASED), groups
    assert groups["async_identical"]["slow"] < groups["async_weighted"]["slow"], groups
    # ... because it minimises the surrogate sum_i q_i f_i, q_i ~ n_i / tau_i, where it is ahead of every method
    assert all(groups["async_identical"]["surrogate"] < groups[v]["surrogate"] for v in UNBIASED), groups


@pytest.mark.parametrize("seed", [0, 1])
def test_identical_weights_favour_fast_clients_and_job_time_weights_and_fedfix_do_not_reduced(monkeypatch, seed):
    rows, groups = run_with_final_models(monkeypatch, {"seed": seed, "time_budget": 20})
    assert {v: r[-1]["sim_time"] >= 20 for v, r in rows.items()} == dict.fromkeys(rows, True)
    assert_identical_weights_are_biased(rows, groups, 20)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_weights_favour_fast_clients_and_job_time_weights_and_fedfix_do_not_full(monkeypatch, seed):
    rows, groups = run_with_final_models(monkeypatch, {"seed": seed})
    assert_identical_weights_are_biased(rows, groups, 100)
