"""FedAsync on the virtual clock: staleness-weighted mixing, jobs of several versions batched in one vmapped chunk,
the same numbers in every runtime, budgets in server steps and simulated seconds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rulekit import assert_runtimes_agree, numbers

import fedsim
from fedsim.errors import ScenarioError
from fedsim.protocol import ProtocolBase
from fedsim.runtime.vectorized import VectorizedRuntime
from fedsim.servers.fedasync import FedAsync, FedAsyncParams, staleness_weight


def scenario(**changes: Any) -> dict[str, Any]:
    """10 digits clients, 4 training at once with lognormal speeds, 12 server updates of FedAsync on logreg."""
    base = {
        "name": "fedasync", "seed": 0, "rounds": 12, "num_clients": 10, "clients_per_round": 4,
        "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
        "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 1},
        "protocol": {"name": "fedasync", "alpha": 0.6},
        "systems": {"name": "lognormal", "speed_sigma": 1.0},
    }
    return {**base, **changes}


@pytest.fixture
def updates(monkeypatch) -> list[tuple[FedAsync, Any, dict, dict]]:
    """Every server update as (protocol, job, model before, model after)."""
    log = []
    apply = FedAsync.apply

    def spy(self, results, steps, now):
        before = self.state["params"]
        apply(self, results, steps, now)
        log.append((self, results[0].job, before, self.state["params"]))

    monkeypatch.setattr(FedAsync, "apply", spy)
    return log


def used_staleness(protocol: FedAsync) -> list[int]:
    """Each server update's staleness, in update order (from the job timeline)."""
    columns = protocol.recorder.timeline.columns
    return [int(s) for s, o in zip(columns["staleness"], columns["outcome"], strict=True) if o == 0]


def check_mixing(updates, alpha: float, kind: str, a: float = 0.5, b: float = 4.0) -> None:
    """Each update is x_t = (1 - alpha_t) x_{t-1} + alpha_t (x_tau + Delta), with Delta from running the job
    alone from the model after update tau, and alpha_t = alpha s(t - 1 - tau)."""
    models = {0: updates[0][2]}
    for t, (protocol, job, before, after) in enumerate(updates, start=1):
        models[t] = after
        delta = protocol.sim.runtime.run_jobs([job], {"params": models[job.version]})[0].message["delta"]
        weight = alpha * staleness_weight(kind, t - 1 - job.version, a, b)
        expected = {k: (1 - weight) * before[k] + weight * (models[job.version][k] + delta[k]) for k in after}
        torch.testing.assert_close(after, expected)


def test_vectorized_runtime_matches_sequential_with_heterogeneous_speeds():
    rows = assert_runtimes_agree(lambda runtime: scenario(runtime=runtime))
    assert len(rows["vectorized"]) == 13


def test_jobs_from_several_versions_share_a_vmapped_chunk_and_one_start_per_version(monkeypatch):
    chunks = []
    run_chunk = VectorizedRuntime._run_chunk

    def spy(self, slot, jobs, states, starts):
        chunks.append([job.version for job in jobs])
        for i, job in enumerate(jobs):
            for other, start in zip(jobs, starts, strict=True):
                assert (start is starts[i]) == (other.version == job.version)
        return run_chunk(self, slot, jobs, states, starts)

    monkeypatch.setattr(VectorizedRuntime, "_run_chunk", spy)
    fedsim.run(scenario(), write=False)
    assert max(len(set(versions)) for versions in chunks) >= 2
    assert sum(len(versions) for versions in chunks) >= 12


def test_each_update_mixes_the_job_from_its_start_version_with_staleness_weight(updates):
    fedsim.run(scenario(protocol={"name": "fedasync", "alpha": 0.6, "staleness": "hinge", "a": 2.0, "b": 1.0}),
               write=False)
    assert len(updates) == 12
    check_mixing(updates, 0.6, "hinge", a=2.0, b=1.0)


def test_staleness_is_logged_per_update_and_positive_for_some_with_heterogeneous_speeds(updates):
    rows = fedsim.run(scenario(), write=False).metrics.rows
    log = used_staleness(updates[0][0])
    assert len(log) == 12 and min(log) >= 0 and max(log) > 0
    assert [job.version for _, job, _, _ in updates] == [t - s for t, s in enumerate(log)]
    assert [row["staleness"] for row in rows] == pytest.approx([0.0, *map(float, log)])
    assert [row["server_steps"] for row in rows] == list(range(13))


def test_staleness_row_is_the_mean_since_the_previous_row(updates):
    rows = fedsim.run(scenario(evaluation={"every": 5}), write=False).metrics.rows
    log = used_staleness(updates[0][0])
    assert [row["round"] for row in rows] == [0, 5, 10, 12]
    assert [row["staleness"] for row in rows] == pytest.approx(
        [0.0, sum(log[:5]) / 5, sum(log[5:10]) / 5, sum(log[10:]) / 2])


def test_one_client_at_a_time_with_alpha_one_replaces_the_model_by_the_clients_local_model(updates):
    fedsim.run(scenario(clients_per_round=1, rounds=6,
                        protocol={"name": "fedasync", "alpha": 1.0, "staleness": "constant"}), write=False)
    assert used_staleness(updates[0][0]) == [0] * 6
    assert [job.version for _, job, _, _ in updates] == list(range(6))
    check_mixing(updates, 1.0, "constant")


def test_weightings_follow_the_paper():
    assert staleness_weight("constant", 100, 0.5, 4.0) == 1.0
    assert staleness_weight("polynomial", 0, 0.5, 4.0) == 1.0
    assert staleness_weight("polynomial", 3, 0.5, 4.0) == pytest.approx(0.5)
    assert staleness_weight("polynomial", 4, 1.0, 4.0) == pytest.approx(0.2)
    assert [staleness_weight("hinge", d, 10.0, 4.0) for d in range(5)] == [1.0] * 5
    assert staleness_weight("hinge", 5, 10.0, 4.0) == pytest.approx(1 / 11)
    assert staleness_weight("hinge", 7, 10.0, 4.0) == pytest.approx(1 / 31)


def test_the_slope_defaults_to_the_papers_value_for_each_weighting():
    assert FedAsyncParams(staleness="polynomial").slope() == 0.5
    assert FedAsyncParams(staleness="hinge").slope() == 10.0
    assert FedAsyncParams(staleness="hinge", a=2.0).slope() == 2.0


def test_time_budget_stops_at_the_first_update_at_or_after_it():
    rows = fedsim.run(scenario(rounds=None, time_budget=0.5), write=False).metrics.rows
    assert rows[-2]["sim_time"] < 0.5 <= rows[-1]["sim_time"]
    assert [row["round"] for row in rows] == list(range(len(rows)))


@pytest.mark.parametrize("compression", [{}, {"uplink": {"name": "topk", "ratio": 0.1, "error_feedback": True},
                                              "downlink": {"name": "topk", "ratio": 0.5}}])
def test_job_durations_use_the_work_and_bytes_the_runtime_reports(monkeypatch, compression):
    seen = []
    commit = ProtocolBase.commit

    def spy(self, result):
        seen.append((int(self.sizes.work[result.client]), self.sizes.bytes_up, result.work, result.message_bytes + 8))
        commit(self, result)

    monkeypatch.setattr(ProtocolBase, "commit", spy)
    fedsim.run(scenario(algorithm={"name": "fedavg", "lr": 0.05, "batch_size": 7, "local_epochs": 2},
                        compression=compression), write=False)
    assert len(seen) == 12
    assert all(work == done and up == sent for work, up, done, sent in seen)


def test_each_job_starts_from_the_client_state_its_previous_arrival_committed(monkeypatch, carry_rule):
    committed: dict[int, dict] = {}
    commit = ProtocolBase.commit

    def spy(self, result):
        before = committed.get(result.client, {k: 0.0 for k in result.message["delta"]})
        expected = {k: before[k] + result.message["delta"][k] for k in before}
        torch.testing.assert_close(result.client_state, expected)
        committed[result.client] = result.client_state
        commit(self, result)

    monkeypatch.setattr(ProtocolBase, "commit", spy)
    fedsim.run(scenario(num_clients=5, rounds=20, algorithm={"name": carry_rule, "lr": 0.05, "batch_size": 20}),
               write=False)
    assert len(committed) == 5


def test_versions_are_released_when_no_job_in_flight_started_from_them(updates):
    fedsim.run(scenario(rounds=30), write=False)
    book = updates[0][0].book
    assert set(book.versions) == set(book.in_flight)
    assert all(count > 0 for version, count in book.in_flight.items() if version != book.latest)
    assert sum(book.in_flight.values()) == 4 - 1


def test_same_seed_same_metrics_and_another_seed_other_clients():
    first, again = (numbers(fedsim.run(scenario(), write=False).metrics.rows) for _ in range(2))
    assert first == again
    other = numbers(fedsim.run(scenario(seed=1), write=False).metrics.rows)
    assert other != first


@pytest.mark.parametrize(("changes", "field"), [
    ({"protocol": {"name": "fedasync", "alpha": 0.0}}, "protocol.alpha"),
    ({"protocol": {"name": "fedasync", "alpha": 1.5}}, "protocol.alpha"),
    ({"protocol": {"name": "fedasync", "staleness": "exponential"}}, "protocol.staleness"),
    ({"clients_per_round": None}, "clients_per_round"),
    ({"stragglers": {"fraction": 0.5}}, "stragglers.fraction"),
])
def test_bad_settings_name_their_field(changes, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        fedsim.run(scenario(**changes), write=False)
