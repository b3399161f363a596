"""The v2 contracts every algorithm builds on: protocols as plugins with budgets, the runtime oracle's keyed
draws and per-step cost, per-job starts, client state committed on arrival, tasks owning the loss."""

from __future__ import annotations

import pytest
import torch
from rulekit import client_server_algorithms

import fedsim
from fedsim.clients import ALGORITHMS, LocalTrainingParams
from fedsim.clients.fedavg import LocalSGD
from fedsim.errors import FedsimError, ScenarioError
from fedsim.protocol import ProtocolBase
from fedsim.registry import Entry, NoParams
from fedsim.runtime import Job
from fedsim.runtime.local import message_template
from fedsim.scenario import load_scenarios
from fedsim.servers import PROTOCOLS
from fedsim.simulation import build_simulation


def losses(result):
    return [r["loss"] for r in result.metrics.rows]


class NoisySGD(LocalSGD):
    """SGD plus keyed Gaussian noise from the oracle, and two gradient evaluations charged per step."""

    step_cost = 2

    def step(self, state, batch, oracle):
        state = super().step(state, batch, oracle)
        noise = oracle.normal(batch, state["params"], stream=3)
        return {**state, "params": {k: w + 0.01 * noise[k] for k, w in state["params"].items()}}


@pytest.fixture
def noisy_rule(monkeypatch) -> str:
    monkeypatch.setitem(ALGORITHMS._entries, "noisy",
                        Entry("noisy", NoisySGD, LocalTrainingParams, {"stragglers": "keep", "server": "fedavg"}))
    return "noisy"


def test_oracle_draws_are_keyed_by_job_and_the_same_in_every_runtime(tiny, noisy_rule):
    tiny = {**tiny, "algorithm": {"name": noisy_rule, "lr": 0.05, "batch_size": 20},
            "stragglers": {"fraction": 0.5}}
    seq = fedsim.run({**tiny, "runtime": {"name": "sequential"}}, write=False)
    vec = fedsim.run({**tiny, "runtime": {"name": "vectorized", "min_batch": 2}}, write=False)
    again = fedsim.run({**tiny, "runtime": {"name": "sequential"}}, write=False)
    other_seed = fedsim.run({**tiny, "seed": 1, "runtime": {"name": "sequential"}}, write=False)
    assert losses(seq) == pytest.approx(losses(vec), rel=1e-5)
    assert losses(seq) == losses(again)
    assert losses(seq) != losses(other_seed)
    plain = fedsim.run({**tiny, "algorithm": {"name": "fedprox", "lr": 0.05, "batch_size": 20}}, write=False)
    assert losses(seq) != pytest.approx(losses(plain), rel=1e-4)  # the noise is really drawn


def test_the_clock_charges_a_rules_declared_step_cost(tiny, noisy_rule):
    systems = {"name": "homogeneous", "speed": 100.0, "latency": 0.0, "bandwidth_up": 1e12, "bandwidth_down": 1e12}
    tiny = {**tiny, "rounds": 1, "systems": systems}
    one = fedsim.run({**tiny, "algorithm": {"name": "fedprox", "lr": 0.05, "batch_size": 20}}, write=False)
    two = fedsim.run({**tiny, "algorithm": {"name": noisy_rule, "lr": 0.05, "batch_size": 20}}, write=False)
    assert two.metrics.last()["sim_time"] == pytest.approx(2 * one.metrics.last()["sim_time"], rel=1e-6)


def simulation(mapping):
    scenarios, _ = load_scenarios(mapping)
    return build_simulation(scenarios[0])


@pytest.mark.parametrize("runtime", ["sequential", "vectorized"])
def test_jobs_start_from_their_own_messages_and_state_waits_for_the_protocol(tiny, carry_rule, runtime):
    sim = simulation({**tiny, "algorithm": {"name": carry_rule, "lr": 0.1, "batch_size": 20},
                      "runtime": {"name": runtime}})
    init = sim.model.init_params
    shifted = {k: v + 1.0 for k, v in init.items()}
    jobs = [Job(0, 2, 3, version=0), Job(0, 5, 3, version=1), Job(1, 2, 3, version=1)]
    results = sim.runtime.run_jobs(jobs, [{"params": init}, {"params": shifted}, {"params": shifted}])
    alone = [sim.runtime.run_jobs([job], {"params": start})[0] for job, start in
             zip(jobs, [init, shifted, shifted], strict=True)]
    for batched, single in zip(results, alone, strict=True):
        for k in init:
            torch.testing.assert_close(batched.message["delta"][k], single.message["delta"][k])
    assert results[0].message["delta"]["1.weight"].ne(results[2].message["delta"]["1.weight"]).any()
    assert len(sim.states) == 0  # nothing is committed until a protocol says the result arrived
    assert results[0].client_state is not None


def test_protocols_are_named_in_the_scenario_and_synchronous_is_the_default(tiny):
    default = fedsim.run(tiny, write=False)
    named = fedsim.run({**tiny, "protocol": {"name": "synchronous"}}, write=False)
    assert losses(default) == losses(named)
    with pytest.raises(ScenarioError, match=r"^protocol\.name: unknown protocol 'asynchronous'"):
        fedsim.run({**tiny, "protocol": {"name": "asynchronous"}}, write=False)


def test_a_budget_in_simulated_seconds_ends_the_run_at_the_first_round_past_it(tiny):
    full = fedsim.run({**tiny, "rounds": 10}, write=False)
    times = [r["sim_time"] for r in full.metrics.rows]
    budget = (times[3] + times[4]) / 2
    timed = fedsim.run({**{k: v for k, v in tiny.items() if k != "rounds"}, "time_budget": budget}, write=False)
    assert [r["round"] for r in timed.metrics.rows] == [0, 1, 2, 3, 4]  # round 4 starts past the budget
    both = fedsim.run({**tiny, "rounds": 2, "time_budget": budget}, write=False)
    assert both.metrics.last()["round"] == 2


def test_a_scenario_needs_a_budget_and_what_its_protocol_needs(tiny):
    with pytest.raises(ScenarioError, match=r"^rounds: a run needs a budget"):
        fedsim.run({k: v for k, v in tiny.items() if k != "rounds"}, write=False)
    with pytest.raises(ScenarioError, match=r"^clients_per_round: protocol 'synchronous' needs it"):
        fedsim.run({k: v for k, v in tiny.items() if k != "clients_per_round"}, write=False)


def test_client_server_protocols_refuse_peer_to_peer_graphs(tiny):
    with pytest.raises(ScenarioError, match=r"^topology\.name: protocol 'synchronous' runs on a client/server star"):
        fedsim.run({**tiny, "topology": {"name": "ring"}}, write=False)


@pytest.mark.parametrize("algorithm", [name for name in client_server_algorithms()
                                       if ALGORITHMS.get(name).obj.__module__.startswith("fedsim.clients")])
def test_each_algorithm_sends_and_reads_the_message_keys_it_declares(tiny, algorithm):
    sim = simulation({**tiny, "algorithm": {"name": algorithm}})
    meta = sim.scenario.components["algorithm"].entry.meta
    state = sim.server.init(sim.model.init_params)
    broadcast = sim.server.broadcast(state)
    assert set(message_template(sim.rule, broadcast)) == set(meta.get("sends", ("delta",)))
    assert set(meta.get("receives", ("params",))) <= set(broadcast)
    server_meta = sim.scenario.components["server"].entry.meta
    assert set(broadcast) == set(server_meta.get("broadcasts", ("params",)))


@pytest.mark.parametrize(("change", "message"), [
    ({"algorithm": {"name": "scaffold"}, "server": {"name": "fedavg"}},
     r"^server\.name: algorithm 'scaffold' needs \['control'\] from the server, which 'fedavg' does not broadcast; "
     r"use scaffold$"),
    ({"algorithm": {"name": "fedavg"}, "server": {"name": "scaffold"}},
     r"^server\.name: server 'scaffold' aggregates \['control'\], which algorithm 'fedavg' does not send$"),
    ({"algorithm": {"name": "scaffold"}, "protocol": {"name": "fedasync"}},
     r"^algorithm\.name: protocol 'fedasync' carries only \['delta'\] from a client; 'scaffold' sends"),
    ({"algorithm": {"name": "scaffold"}, "protocol": {"name": "dsgd"}, "topology": {"name": "ring"},
      "clients_per_round": None}, r"^algorithm\.name: protocol 'dsgd' carries only \['delta'\]"),
])
def test_rules_whose_messages_do_not_fit_are_refused_when_the_scenario_is_read(tiny, change, message):
    with pytest.raises(ScenarioError, match=message):
        load_scenarios({**tiny, **change})


class Idle(ProtocolBase):
    """Schedules one event and never another: its queue empties before the budget."""

    def start(self, clock):
        clock.schedule(1.5, "nothing")

    def handle(self, event, clock):
        self.evaluate_if_due(0, clock.now)


def test_a_queue_that_empties_before_the_budget_is_an_error(tiny, monkeypatch):
    monkeypatch.setitem(PROTOCOLS._entries, "idle", Entry("idle", Idle, NoParams, {}))
    with pytest.raises(FedsimError, match=r"protocol 'idle' ran out of events at simulated time 1.5 s before its "
                                          r"budget was spent"):
        fedsim.run({**tiny, "protocol": {"name": "idle"}}, write=False)


LEAST_SQUARES = {
    "name": "ls", "rounds": 40, "num_clients": 4, "clients_per_round": 4,
    "data": {"name": "least_squares", "num_features": 5, "samples_per_client": 40, "heterogeneity": 1.0,
             "noise": 0.1, "test_fraction": 0.25},
    "model": {"name": "linear"},
    "algorithm": {"name": "fedavg", "lr": 0.5, "batch_size": 1000, "local_epochs": 1},
}


@pytest.mark.parametrize("ridge", [0.0, 0.5])
def test_least_squares_full_batch_fedavg_converges_to_the_closed_form_optimum(ridge):
    # One full-batch step per round with sample weighting is gradient descent on the pooled objective.
    r = fedsim.run({**LEAST_SQUARES, "task": {"name": "regression", "ridge": ridge}}, write=False)
    distances = [row["distance_to_optimum"] for row in r.metrics.rows]
    assert distances[-1] < 1e-3 * distances[0]
    assert "accuracy" not in r.metrics.last()


def test_regression_losses_are_half_squared_errors_plus_the_ridge_penalty():
    r = fedsim.run({**LEAST_SQUARES, "rounds": 1, "task": {"name": "regression", "ridge": 0.5}}, write=False)
    sim = simulation({**LEAST_SQUARES, "rounds": 1})
    y = sim.data.y_train.double()
    assert r.metrics.rows[0]["loss"] == pytest.approx(float((0.5 * y**2).mean()), rel=1e-9)  # the model starts at 0


def test_a_task_must_fit_its_data(tiny):
    with pytest.raises(ScenarioError, match=r"^task\.name: 'regression' does not fit data set 'digits'"):
        fedsim.run({**tiny, "task": {"name": "regression"}}, write=False)
