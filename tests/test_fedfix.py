"""FedFix and asynchronous FedAvg (Fraboni et al., JMLR 2023): each server step adds sum_i d_i Delta_i; FedFix with
a tick at least the slowest job is synchronous FedAvg bit for bit; small ticks step with the clients arrived by the
tick, early finishers idling until it; asynchronous FedAvg's weights; runtimes agree; bad settings are one line."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from rulekit import assert_runtimes_agree

import fedsim
from fedsim.errors import ScenarioError
from fedsim.servers.fedfix import AsyncFedAvg, FedFix

HUGE = 1e30
"""Bandwidth (bytes per second) that makes transfers take no time at all in float64 next to a 1-second job."""


def scenario(protocol: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """10 digits clients with Fraboni's F-80 speeds (client 0 slowest), 3 local steps of 20 samples (the same work
    for every client), no latency, instant transfers; 8 server steps on logreg."""
    base = {
        "name": "fraboni", "seed": 0, "rounds": 8, "num_clients": 10,
        "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
        "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_steps": 3},
        "systems": {"name": "linear", "spread": 80, "latency": 0, "bandwidth_up": HUGE, "bandwidth_down": HUGE},
        "runtime": {"name": "sequential"}, "protocol": protocol,
    }
    return {**base, **changes}


def rows_of(mapping: dict[str, Any]) -> list[dict[str, Any]]:
    return fedsim.run(mapping, write=False).metrics.rows


@pytest.fixture
def steps(monkeypatch) -> list[dict[str, Any]]:
    """Every server step of either protocol: the protocol, the jobs used, the scaled results, the model before and
    after, and the step's time."""
    log = []
    for cls in (FedFix, AsyncFedAvg):
        def spy(self, results, step, now, apply=cls.apply):
            before = self.state["params"]
            apply(self, results, step, now)
            log.append({"protocol": self, "jobs": [r.job for r in results], "before": before,
                        "after": self.state["params"], "now": now})
        monkeypatch.setattr(cls, "apply", spy)
    return log


def alone(protocol, job, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The job's change Delta, recomputed by running it alone from `start`."""
    return protocol.sim.runtime.run_jobs([job], {"params": start})[0].message["delta"]


def check_steps(steps: list[dict[str, Any]], d: Any, lr: float) -> None:
    """Each step is theta + lr sum_i d(protocol, client) Delta_i, Delta_i from the model after step `version`."""
    models = {0: steps[0]["before"]}
    for n, step in enumerate(steps, start=1):
        models[n] = step["after"]
        protocol, expected = step["protocol"], dict(step["before"])
        for job in step["jobs"]:
            delta = alone(protocol, job, models[job.version])
            expected = {k: expected[k] + lr * d(protocol, job.client) * delta[k] for k in expected}
        torch.testing.assert_close(step["after"], expected)


@pytest.mark.parametrize("runtime", ["sequential", "vectorized"])
@pytest.mark.parametrize("tick", [{"tick_fraction": 1.0}, {"tick_fraction": 1.7}, {"tick": 0.5}])
def test_fedfix_with_a_tick_at_least_the_slowest_job_is_synchronous_fedavg_bit_for_bit(tick, runtime):
    common = {"systems": {"name": "linear", "spread": 80, "latency": 0}, "runtime": {"name": runtime},
              "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 1}}
    sync = rows_of(scenario({"name": "synchronous"}, clients_per_round=10, **common))
    fix = rows_of(scenario({"name": "fedfix", **tick}, **common))
    assert len(fix) == len(sync) == 9
    for s, f in zip(sync, fix, strict=True):
        assert {k: v for k, v in f.items() if k in s and k not in ("sim_time", "wall_time")} == \
            {k: v for k, v in s.items() if k not in ("sim_time", "wall_time")}
        assert (f["staleness"], f["server_steps"]) == (0.0, f["round"])


def test_f0_with_a_tick_equal_to_the_job_time_is_synchronous_fedavg_and_arrivals_at_the_tick_count():
    """Every job takes exactly 1.0 s (60 samples at speed 60, no transfers) and the tick is 1.0: each job arrives
    exactly at the tick, and each tick is a round (simulated times included)."""
    common = {"systems": {"name": "linear", "spread": 0, "speed": 60.0, "latency": 0, "bandwidth_up": HUGE,
                          "bandwidth_down": HUGE}}
    sync = rows_of(scenario({"name": "synchronous"}, clients_per_round=10, **common))
    fix = rows_of(scenario({"name": "fedfix", "tick": 1.0}, **common))
    assert [row["sim_time"] for row in fix] == [float(t) for t in range(9)]
    assert [row["client_updates"] for row in fix] == [10 * t for t in range(9)]
    for s, f in zip(sync, fix, strict=True):
        assert {k: v for k, v in f.items() if k in s and k != "wall_time"} == \
            {k: v for k, v in s.items() if k != "wall_time"}


def test_a_job_lasting_a_whole_number_of_ticks_counts_at_that_tick_despite_float_error(steps):
    """Jobs of 60/77 s and a tick of a third of that: n tick + tau exceeds (n + 3) tick by an ulp for some n, and
    the job still counts at tick n + 3 (and spans ceil(tau / tick) = 3 ticks)."""
    systems = {"name": "linear", "spread": 0, "speed": 77.0, "latency": 0, "bandwidth_up": HUGE,
               "bandwidth_down": HUGE}
    result = fedsim.run(scenario({"name": "fedfix", "tick_fraction": 1 / 3}, systems=systems), write=False)
    tau, tick = 60 / 77, steps[0]["protocol"].tick
    assert tick == (1 / 3) * tau and steps[0]["protocol"].periods.tolist() == [3] * 10
    assert [n for n in range(0, 24, 3) if n * tick + tau > (n + 3) * tick] == [0, 3, 9, 12]
    assert result.timelines["fraboni"]["server_steps"].tolist() == [3 * n * tick for n in range(1, 9)]
    assert [len(step["jobs"]) for step in steps] == [10] * 8


@pytest.mark.parametrize(("weights", "slow", "fast"), [("unbiased", 2.5, 0.625), ("identical", 1.0, 1.0)])
def test_async_fedavg_step_sizes_follow_the_weights(steps, weights, slow, fast):
    """Two clients, job times 1 and 1/4 (uniform p_i = 1/2): unbiased d_i = (1 + 4) tau_i / 2, so the fast client,
    returning 4 times as often, gets 1/4 of the slow client's weight; identical d_i = 1."""
    fedsim.run(scenario({"name": "async_fedavg", "weights": weights}, num_clients=2, rounds=10,
                        server={"name": "fedavg", "weighting": "uniform"},
                        algorithm={"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_steps": 2},
                        systems={"name": "linear", "spread": 75, "speed": 40.0, "latency": 0,
                                 "bandwidth_up": HUGE, "bandwidth_down": HUGE}), write=False)
    assert steps[0]["protocol"].tau.tolist() == [1.0, 0.25]
    assert [step["jobs"][0].client for step in steps] == [1, 1, 1, 0, 1, 1, 1, 1, 0, 1]
    check_steps(steps, lambda protocol, client: (slow, fast)[client], lr=1.0)


@pytest.mark.parametrize("weights", ["unbiased", "identical"])
def test_each_fedfix_step_adds_the_weighted_changes_of_the_arrived_clients_from_their_start_models(steps, weights):
    """tick = 0.3 of the slowest job: ceil(tau_i / tick) = 4 4 3 3 3 2 2 2 1 1; d_i = ceil(tau_i / tick) n_i / n
    (unbiased) or n_i / n (identical); server lr 0.5."""
    fedsim.run(scenario({"name": "fedfix", "tick_fraction": 0.3, "weights": weights},
                        server={"name": "fedavg", "lr": 0.5}), write=False)
    protocol = steps[0]["protocol"]
    assert protocol.periods.tolist() == [4, 4, 3, 3, 3, 2, 2, 2, 1, 1]
    p = np.asarray(protocol.sim.data.train_sizes) / np.sum(protocol.sim.data.train_sizes)
    periods = protocol.periods if weights == "unbiased" else np.ones(10, dtype=np.int64)
    check_steps(steps, lambda protocol, client: float(periods[client] * p[client]), lr=0.5)


def test_small_ticks_step_with_the_clients_arrived_and_early_finishers_idle_until_the_tick(steps):
    result = fedsim.run(scenario({"name": "fedfix", "tick_fraction": 0.3}, rounds=12), write=False)
    tick = steps[0]["protocol"].tick
    line = result.timelines["fraboni"]
    jobs, clients, starts, ends = line["job"], line["client"], line["start"], line["end"]
    assert len(line["server_steps"]) == 12 and min(len(step["jobs"]) for step in steps) < 10
    assert (starts == jobs * tick).all()  # every job starts at a tick, the one its id counts
    used_at = {(job.id, job.client): step["now"] for step in steps for job in step["jobs"]}
    for job, client, end in zip(jobs.astype(int), clients.astype(int), ends, strict=True):
        assert used_at[job, client] == math.ceil(end / tick - 1e-9) * tick  # the first tick it has arrived by
    idle = [starts[(clients == c)][1:] - ends[(clients == c)][:-1] for c in range(10)]
    assert min(gap.min() for gap in idle if len(gap)) >= 0 and max(gap.max() for gap in idle if len(gap)) > 0
    rows = result.metrics.rows
    assert [row["server_steps"] for row in rows] == list(range(13))
    assert max(row["staleness"] for row in rows) > 0


@pytest.mark.parametrize("protocol", [{"name": "fedfix", "tick_fraction": 0.3}, {"name": "async_fedavg"}])
def test_vectorized_runtime_matches_sequential(protocol):
    systems = {"name": "linear", "spread": 80, "compute": "exponential"}
    assert_runtimes_agree(lambda runtime: scenario(protocol, runtime=runtime, systems=systems))


@pytest.mark.parametrize(("protocol", "changes", "field"), [
    ({"name": "fedfix", "tick": 0.0}, {}, "protocol.tick"),
    ({"name": "fedfix", "tick": -1.0}, {}, "protocol.tick"),
    ({"name": "fedfix", "tick": 1.0, "tick_fraction": 0.5}, {}, "protocol.tick"),
    ({"name": "fedfix"}, {"clients_per_round": 5}, "clients_per_round"),
    ({"name": "async_fedavg"}, {"clients_per_round": 9}, "clients_per_round"),
    ({"name": "async_fedavg", "weights": "fair"}, {}, "protocol.weights"),
    ({"name": "fedfix"}, {"systems": {"name": "linear", "dropout": 0.1}}, "systems.dropout"),
    ({"name": "async_fedavg"}, {"systems": {"name": "linear", "availability": {"kind": "bernoulli", "p": 0.5,
                                                                               "period": 1.0}}},
     "systems.availability"),
])
def test_bad_settings_name_their_field(protocol, changes, field):
    with pytest.raises(ScenarioError, match=f"^{field.replace('.', r'[.]')}"):
        fedsim.run(scenario(protocol, **changes), write=False)
