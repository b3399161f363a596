"""FedBuff on the virtual clock: each server step adds the server lr times the mean (or sum) of K staleness-scaled
changes, each from its job's start version; FLSim's weight normalization; stale results refused; the same numbers
in every runtime; jobs of several versions in one vmapped chunk; bad settings named."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rulekit import aggregate_of, assert_runtimes_agree, numbers

import fedsim
from fedsim.errors import ScenarioError
from fedsim.protocol import ProtocolBase
from fedsim.recording import OUTCOMES
from fedsim.runtime.vectorized import VectorizedRuntime
from fedsim.servers.fedavgm import FedAvgMParams, FedAvgMServer
from fedsim.servers.fedbuff import FedBuff, FedBuffParams, staleness_weight


def scenario(**changes: Any) -> dict[str, Any]:
    """10 digits clients, 6 training at once with lognormal speeds, 8 server steps of FedBuff (K = 3) on logreg."""
    base = {
        "name": "fedbuff", "seed": 0, "rounds": 8, "num_clients": 10, "clients_per_round": 6,
        "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
        "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 1},
        "protocol": {"name": "fedbuff", "buffer_size": 3},
        "systems": {"name": "lognormal", "speed_sigma": 1.0},
    }
    return {**base, **changes}


@pytest.fixture
def steps(monkeypatch) -> list[tuple[FedBuff, list, dict, dict]]:
    """Every server step as (protocol, buffered results, model before, model after)."""
    log = []
    apply = FedBuff.apply

    def spy(self, results, steps, now):
        before = self.state["params"]
        apply(self, results, steps, now)
        log.append((self, list(results), before, self.state["params"]))

    monkeypatch.setattr(FedBuff, "apply", spy)
    return log


def replay(steps) -> list[tuple[dict, dict, list[tuple[int, int, dict]]]]:
    """Per server step t: (model before, model after, [(samples, staleness, Delta)] per buffered job), Delta
    recomputed by running the job alone from the model after step `job.version`; every buffered result arrived
    while the server was at t - 1."""
    models = {0: steps[0][2]}
    out = []
    for t, (protocol, results, before, after) in enumerate(steps, start=1):
        models[t] = after
        parts = [(r.num_samples, t - 1 - r.job.version,
                  protocol.sim.runtime.run_jobs([r.job], {"params": models[r.job.version]})[0].message["delta"])
                 for r in results]
        out.append((before, after, parts))
    return out


def weighted_mean(parts, params: FedBuffParams, by_samples: bool) -> dict:
    """sum_k w_k s(tau_k) Delta_k / sum_k w_k, w_k = n_k or 1."""
    weights = [float(n) if by_samples else 1.0 for n, _, _ in parts]
    scaled = [staleness_weight(params, tau) * w for w, (_, tau, _) in zip(weights, parts, strict=True)]
    return {key: sum(c * delta[key] for c, (_, _, delta) in zip(scaled, parts, strict=True)) / sum(weights)
            for key in parts[0][2]}


def test_each_step_adds_lr_times_the_sample_weighted_mean_of_polynomially_scaled_changes(steps):
    rows = fedsim.run(scenario(server={"name": "fedavg", "lr": 0.5}), write=False).metrics.rows
    params = steps[0][0].params
    assert params.staleness == "polynomial" and params.exponent == 0.5
    replayed = replay(steps)
    assert len(replayed) == 8 and all(len(parts) == 3 for _, _, parts in replayed)
    assert max(tau for _, _, parts in replayed for _, tau, _ in parts) > 0
    for before, after, parts in replayed:
        mean = weighted_mean(parts, params, by_samples=True)
        torch.testing.assert_close(after, {k: before[k] + 0.5 * mean[k] for k in before})
    assert [row["staleness"] for row in rows[1:]] == pytest.approx(
        [sum(tau for _, tau, _ in parts) / 3 for _, _, parts in replayed])
    assert [row["server_steps"] for row in rows] == list(range(9))
    assert [row["client_updates"] for row in rows] == [3 * t for t in range(9)]


def test_sum_reduction_steps_by_lr_times_the_sum_of_scaled_changes(steps):
    fedsim.run(scenario(server={"name": "fedavg", "lr": 0.2, "weighting": "uniform"},
                        protocol={"name": "fedbuff", "buffer_size": 3, "reduction": "sum"}), write=False)
    params = steps[0][0].params
    for before, after, parts in replay(steps):
        total = {k: sum(staleness_weight(params, tau) * delta[k] for _, tau, delta in parts) for k in before}
        torch.testing.assert_close(after, {k: before[k] + 0.2 * total[k] for k in before})


def test_a_fedopt_server_rule_runs_its_optimizer_on_the_buffered_mean(steps):
    fedsim.run(scenario(server={"name": "fedavgm", "lr": 0.5, "momentum": 0.9}), write=False)
    params = steps[0][0].params
    rule = FedAvgMServer(FedAvgMParams(lr=0.5, momentum=0.9))
    replayed = replay(steps)
    state = rule.init(replayed[0][0])
    for _, after, parts in replayed:
        state = rule.update(state, aggregate_of({"delta": weighted_mean(parts, params, by_samples=True)}))
        torch.testing.assert_close(after, state["params"])


def test_staleness_weights_of_each_kind_and_flsims_normalization():
    assert [staleness_weight(FedBuffParams(staleness="constant"), tau) for tau in (0, 5, 100)] == [1.0] * 3
    polynomial = FedBuffParams()
    assert staleness_weight(polynomial, 0) == 1.0
    assert staleness_weight(polynomial, 3) == pytest.approx(0.5)
    assert staleness_weight(FedBuffParams(exponent=1.0), 4) == pytest.approx(0.2)
    threshold = FedBuffParams(staleness="threshold", cutoff=2, value_after=0.25)
    assert [staleness_weight(threshold, tau) for tau in range(5)] == [1.0, 1.0, 1.0, 0.25, 0.25]
    flsim = FedBuffParams(normalize_at=1)
    for tau in range(6):
        assert staleness_weight(flsim, tau) == pytest.approx((2 / (1 + tau)) ** 0.5)
    assert staleness_weight(FedBuffParams(staleness="threshold", cutoff=0, value_after=0.5, normalize_at=1), 0) == 2.0


def test_one_change_per_step_with_constant_weights_is_asynchronous_sgd_on_the_current_model(steps):
    fedsim.run(scenario(rounds=10, protocol={"name": "fedbuff", "buffer_size": 1, "staleness": "constant"},
                        server={"name": "fedavg", "lr": 0.7}), write=False)
    replayed = replay(steps)
    assert len(replayed) == 10 and all(len(parts) == 1 for _, _, parts in replayed)
    assert any(tau > 0 for _, _, [(_, tau, _)] in replayed)
    for before, after, [(_, _, delta)] in replayed:
        torch.testing.assert_close(after, {k: before[k] + 0.7 * delta[k] for k in before})


@pytest.mark.parametrize("num_clients", [10, 6])
def test_an_arrival_starts_the_next_job_at_once_from_the_idle_clients_itself_included(steps, num_clients):
    fedsim.run(scenario(num_clients=num_clients), write=False)
    protocol = steps[0][0]
    log = protocol.recorder.timeline.columns
    assert sum(protocol.book.in_flight.values()) == 6 - 1
    arrived = list(zip(log["end"], log["client"], strict=True))
    for job, start, client in zip(log["job"], log["start"], log["client"], strict=True):
        if job >= 6:
            freed = [other for end, other in arrived if end == pytest.approx(start, abs=1e-12)]
            assert freed and (num_clients > 6 or freed == [client])


def test_max_staleness_refuses_stale_results_but_commits_their_client_state(steps, monkeypatch):
    commits = []
    commit = ProtocolBase.commit
    monkeypatch.setattr(ProtocolBase, "commit", lambda self, result: commits.append(result.job.id) or
                        commit(self, result))
    rows = fedsim.run(scenario(protocol={"name": "fedbuff", "buffer_size": 2, "max_staleness": 0}),
                      write=False).metrics.rows
    protocol = steps[0][0]
    outcomes = protocol.recorder.timeline.columns["outcome"]
    rejected = rows[-1]["rejected"]
    assert rejected > 0 and outcomes.count(OUTCOMES.index("stale")) == rejected
    assert outcomes.count(OUTCOMES.index("used")) == 2 * 8
    assert len(commits) == 2 * 8 + rejected
    assert all(tau == 0 for _, _, parts in replay(steps) for _, tau, _ in parts)
    assert [row["rejected"] for row in rows] == sorted(row["rejected"] for row in rows)


def test_a_large_max_staleness_refuses_nothing_and_changes_nothing():
    unlimited = numbers(fedsim.run(scenario(), write=False).metrics.rows)
    large = numbers(fedsim.run(scenario(protocol={"name": "fedbuff", "buffer_size": 3, "max_staleness": 1000}),
                               write=False).metrics.rows)
    assert large == unlimited and all(row["rejected"] == 0 for row in large)
    assert max(row["staleness"] for row in large) > 0


def test_the_buffer_defaults_to_ten_or_the_concurrency_when_smaller():
    default = {"name": "fedbuff"}
    few = fedsim.run(scenario(rounds=2, protocol=default), write=False).metrics.rows
    many = fedsim.run(scenario(rounds=2, num_clients=20, clients_per_round=12, protocol=default),
                      write=False).metrics.rows
    assert [row["client_updates"] for row in few] == [0, 6, 12]
    assert [row["client_updates"] for row in many] == [0, 10, 20]


def test_vectorized_runtime_matches_sequential_with_heterogeneous_speeds():
    rows = assert_runtimes_agree(lambda runtime: scenario(runtime=runtime))
    assert len(rows["vectorized"]) == 9 and max(row["staleness"] for row in rows["vectorized"]) > 0


def test_jobs_from_several_versions_share_a_vmapped_chunk(monkeypatch):
    chunks = []
    run_chunk = VectorizedRuntime._run_chunk

    def spy(self, slot, jobs, states, starts):
        chunks.append([job.version for job in jobs])
        return run_chunk(self, slot, jobs, states, starts)

    monkeypatch.setattr(VectorizedRuntime, "_run_chunk", spy)
    fedsim.run(scenario(), write=False)
    assert max(len(set(versions)) for versions in chunks) >= 2
    assert sum(len(versions) for versions in chunks) >= 3 * 8


def test_time_budget_stops_at_the_first_server_step_at_or_after_it():
    rows = fedsim.run(scenario(rounds=None, time_budget=0.5), write=False).metrics.rows
    assert rows[-2]["sim_time"] < 0.5 <= rows[-1]["sim_time"]
    assert [row["round"] for row in rows] == list(range(len(rows)))


@pytest.mark.parametrize(("protocol", "field"), [
    ({"buffer_size": 7}, "protocol.buffer_size"),
    ({"buffer_size": 0}, "protocol.buffer_size"),
    ({"exponent": -0.5}, "protocol.exponent"),
    ({"staleness": "threshold", "cutoff": -1, "value_after": 0.5}, "protocol.cutoff"),
    ({"staleness": "threshold", "value_after": 0.5}, "protocol.cutoff"),
    ({"staleness": "threshold", "cutoff": 2}, "protocol.value_after"),
    ({"staleness": "threshold", "cutoff": 0, "value_after": 0.0, "normalize_at": 1}, "protocol.normalize_at"),
    ({"max_staleness": -1}, "protocol.max_staleness"),
    ({"reduction": "median"}, "protocol.reduction"),
])
def test_bad_protocol_settings_name_their_field(protocol, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        fedsim.run(scenario(protocol={"name": "fedbuff", **protocol}), write=False)


@pytest.mark.parametrize(("changes", "field"), [
    ({"clients_per_round": None}, "clients_per_round"),
    ({"stragglers": {"fraction": 0.5}}, "stragglers.fraction"),
])
def test_bad_scenario_settings_name_their_field(changes, field):
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        fedsim.run(scenario(**changes), write=False)
