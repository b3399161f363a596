"""FedAST and Sync-ST: several models trained at once on one client population (buffered asynchronous steps,
jobs in flight reallocated by update variance, tasks retiring at their targets, clients running their jobs one
after another), the same numbers in every runtime, and one-line errors for bad task lists."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rulekit import assert_runtimes_agree, restarted_rows

import fedsim
from fedsim.errors import ScenarioError
from fedsim.recording import JobLog
from fedsim.servers.fedast import FedAST, Simultaneous, Task, allocate, normalized_variance, score, share_out


def scenario(protocol: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """10 digits clients with lognormal speeds, 8 jobs in flight, logistic regression, 24 server steps in all."""
    base = {
        "name": "ast", "seed": 0, "rounds": 24, "num_clients": 10, "clients_per_round": 8,
        "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
        "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_epochs": 1},
        "systems": {"name": "lognormal", "speed_sigma": 1.0}, "protocol": protocol,
    }
    return {**base, **changes}


TWO_MODELS = [{"name": "logreg"}, {"name": "mlp", "model": {"name": "mlp", "hidden": [16]}}]


def by_variant(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["variant"], []).append(row)
    return out


@pytest.fixture
def steps(monkeypatch) -> list[tuple[Task, list, dict, dict, float]]:
    """Every server step as (task, results, model before, model after, simulated time)."""
    log = []
    apply = Task.apply

    def spy(self, results, step, now):
        before = self.state["params"]
        apply(self, results, step, now)
        log.append((self, list(results), before, self.state["params"], now))

    monkeypatch.setattr(Task, "apply", spy)
    return log


def test_one_task_with_buffer_one_adds_the_server_lr_times_the_job_run_alone_from_its_start_version(steps):
    fedsim.run(scenario({"name": "fedast", "buffer_size": 1, "reallocation": "none"},
                        server={"name": "fedavg", "lr": 0.5}, rounds=10), write=False)
    assert len(steps) == 10
    models = {0: steps[0][2]}
    stale = 0
    for t, (task, results, before, after, _) in enumerate(steps, start=1):
        models[t] = after
        (result,) = results
        stale += result.job.version < t - 1
        alone = task.sim.runtime.run_jobs([result.job], {"params": models[result.job.version]})[0]
        torch.testing.assert_close(after, {k: before[k] + 0.5 * alone.message["delta"][k] for k in after})
    assert stale > 0  # some jobs trained on an older model than the one they were added to


def test_buffers_hold_ceil_r_over_buffer_ratio_results(steps):
    rows = fedsim.run(scenario({"name": "fedast", "buffer_ratio": 3}, rounds=6), write=False).metrics.rows
    assert [len(results) for _, results, _, _, _ in steps] == [3] * 6  # ceil(8 / 3)
    assert [row["client_updates"] for row in rows] == [0, 3, 6, 9, 12, 15, 18]
    assert {row["jobs_in_flight"] for row in rows} == {8}


def test_allocation_is_proportional_to_the_standard_deviation_in_whole_chunks_and_the_codes_to_the_variance():
    variances = [1.0, 4.0, 16.0]
    assert allocate([score(v, "paper") for v in variances], 28, 4) == [4, 8, 16]
    assert allocate([score(v, "code_precedence") for v in variances], 28, 4) == [4, 4, 20]
    assert allocate([1e-6, 100.0], 16, 4) == [4, 12]  # at least one chunk each
    assert allocate([1.0, 1.0], 10, 4) == [6, 4]  # the last chunk is cut to what is left; ties to the first
    assert allocate([0.0, 0.0], 8, 2) == [4, 4]
    assert score(9.0, "paper") == 3.0 and score(9.0, "code_precedence") == 4.5


def test_normalized_variance_is_the_spread_of_the_deltas_over_their_mean_squared():
    same = torch.tensor([1.0, 2.0])
    assert normalized_variance([same, same]) == 0.0
    deltas = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])]  # mean (2, 0), squared distances 1 + 1
    assert normalized_variance(deltas) == pytest.approx(2 / (2 * 4))
    assert normalized_variance([torch.tensor([1.0]), torch.tensor([-1.0])]) == 0.0  # zero mean: no estimate


def test_share_out_splits_in_proportion_with_the_remainder_to_the_largest_fractions():
    assert share_out(2, [4.0, 2.0]) == [1, 1]
    assert share_out(7, [1.0, 1.0, 1.0]) == [3, 2, 2]
    assert share_out(8, [3.0, 1.0]) == [6, 2]


def test_variance_reallocation_moves_jobs_in_chunks_and_keeps_their_total(monkeypatch):
    seen = []
    reallocate = FedAST._reallocate

    def spy(self):
        reallocate(self)
        seen.append([t.jobs for t in self.tasks])

    monkeypatch.setattr(FedAST, "_reallocate", spy)
    protocol = {"name": "fedast", "tasks": TWO_MODELS, "buffer_ratio": 1, "window": 3, "realloc_every": 4}
    rows = fedsim.run(scenario(protocol, rounds=60), write=False).metrics.rows
    assert seen and all(sum(jobs) == 8 and min(jobs) >= 1 for jobs in seen)
    assert any(jobs != [4, 4] for jobs in seen)
    assert {r["jobs_in_flight"] for r in rows} - {4}


def test_a_retired_task_gets_no_more_jobs_and_its_jobs_move_to_the_others(steps):
    tasks = [{"name": "easy", "target": 0.3, "initial_jobs": 2}, {"name": "b", "initial_jobs": 4},
             {"name": "c", "initial_jobs": 2}]
    result = fedsim.run(scenario({"name": "fedast", "tasks": tasks, "reallocation": "none"}, rounds=40,
                                 evaluation={"every": 2}), write=False)
    rows = by_variant(result.metrics.rows)
    easy = rows["ast:easy"]
    assert easy[-1]["accuracy"] >= 0.3 > max(r["accuracy"] for r in easy[:-1])
    retired_at = easy[-1]["sim_time"]
    assert [r["jobs_in_flight"] for r in rows["ast:b"] if r["sim_time"] > retired_at][-1] == 5
    assert [r["jobs_in_flight"] for r in rows["ast:c"] if r["sim_time"] > retired_at][-1] == 3
    easy_task = next(task for task, *_ in steps if task.variant == "ast:easy")
    assert max(now for task, *_, now in steps if task is easy_task) == retired_at
    assert max(now for task, *_, now in steps if task is not easy_task) > retired_at
    assert easy_task.flying == {} and easy_task.book.pending == [] and easy_task.jobs == 0
    assert sum(r["server_steps"] for r in rows["ast:b"][-1:] + rows["ast:c"][-1:] + easy[-1:]) == 40


def test_the_run_ends_when_every_task_has_retired():
    tasks = [{"name": "a", "target": 0.25}, {"name": "b", "target": 0.3}]
    rows = by_variant(fedsim.run(scenario({"name": "fedast", "tasks": tasks, "reallocation": "none"}, rounds=500),
                                 write=False).metrics.rows)
    assert rows["ast:a"][-1]["accuracy"] >= 0.25 and rows["ast:b"][-1]["accuracy"] >= 0.3
    assert rows["ast:a"][-1]["server_steps"] + rows["ast:b"][-1]["server_steps"] < 500


def test_a_clients_jobs_run_one_after_another(monkeypatch):
    placed = []
    place = Simultaneous._place

    def spy(self, task, job, down, now):
        begin, phases = place(self, task, job, down, now)
        placed.append((job.client, now, begin, begin + phases.total))
        return begin, phases

    monkeypatch.setattr(Simultaneous, "_place", spy)
    tasks = [{**task, "initial_jobs": 4} for task in TWO_MODELS]
    result = fedsim.run(scenario({"name": "fedast", "tasks": tasks}, num_clients=3, clients_per_round=3, rounds=12),
                        write=False)
    previous: dict[int, float] = {}
    for client, now, begin, end in placed:
        assert begin == max(now, previous.get(client, 0.0))
        previous[client] = end
    assert sum(begin > now for _, now, begin, _ in placed) > 5  # clients held queued jobs
    assert len(result.metrics.rows) > 2


def test_two_tasks_with_different_data_and_models_both_learn():
    tasks = [{"name": "digits"},
             {"name": "synthetic", "data": {"name": "synthetic_iid", "num_features": 20, "num_classes": 5},
              "partition": {"name": "natural"}, "model": {"name": "mlp", "hidden": [16]},
              "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20, "local_steps": 10}}]
    rows = by_variant(fedsim.run(scenario({"name": "fedast", "tasks": tasks}, rounds=60, evaluation={"every": 5}),
                                 write=False).metrics.rows)
    assert set(rows) == {"ast:digits", "ast:synthetic"}
    for task_rows in rows.values():
        assert task_rows[-1]["accuracy"] > task_rows[0]["accuracy"] + 0.2
        assert task_rows[-1]["server_steps"] >= 10


def test_sync_st_keeps_each_tasks_first_k_arrivals_and_drops_the_rest(steps):
    result = fedsim.run(scenario({"name": "sync_st", "tasks": TWO_MODELS, "first": 3}, rounds=8), write=False)
    assert [len(results) for _, results, _, _, _ in steps] == [3] * 8
    assert [task.variant for task, *_ in steps] == ["ast:logreg", "ast:mlp"] * 4
    rows = by_variant(result.metrics.rows)
    assert [r["client_updates"] for r in rows["ast:mlp"]] == [0, 3, 6, 9, 12]
    assert [r["jobs_in_flight"] for r in rows["ast:mlp"]][1:] == [4] * 4


def test_sync_st_rounds_end_when_the_last_kept_job_arrives_and_the_others_are_logged_dropped(monkeypatch):
    ends = []
    job = JobLog.job

    def spy(self, job_, start, phases, outcome, staleness=0):
        ends.append((start + phases.total, outcome))
        job(self, job_, start, phases, outcome, staleness)

    monkeypatch.setattr(JobLog, "job", spy)
    protocol = {"name": "sync_st", "tasks": TWO_MODELS, "first": 3}
    rows = fedsim.run(scenario(protocol, rounds=4), write=False).metrics.rows
    used = [end for end, outcome in ends if outcome == "used"]
    assert len(used) == 12 and sum(outcome == "dropped" for _, outcome in ends) >= 2
    first_round_end = min(r["sim_time"] for r in rows if r["round"] == 1)
    assert first_round_end == pytest.approx(max(used[:6]))


@pytest.mark.parametrize("protocol", [
    {"name": "fedast", "tasks": TWO_MODELS, "buffer_ratio": 2, "window": 3, "realloc_every": 4},
    {"name": "sync_st", "tasks": TWO_MODELS, "first": 3},
])
def test_vectorized_runtime_matches_sequential(protocol):
    rows = assert_runtimes_agree(lambda runtime: scenario(protocol, rounds=30, runtime=runtime))
    assert len(rows["sequential"]) > 10
    assert [r["variant"] for r in rows["sequential"]] == [r["variant"] for r in rows["vectorized"]]


def test_without_tasks_the_base_scenario_is_the_one_task_under_the_variants_name():
    rows = fedsim.run(scenario({"name": "fedast"}, rounds=4), write=False).metrics.rows
    assert {r["variant"] for r in rows} == {"ast"}
    assert [r["server_steps"] for r in rows] == list(range(5))


@pytest.mark.parametrize(("protocol", "message"), [
    ({"name": "fedast", "tasks": [{"name": "a"}, {"name": "a", "model": {"name": "mlp"}}]},
     "protocol.tasks: two tasks are named 'a'"),
    ({"name": "sync_st", "tasks": []}, "protocol.tasks: give at least one task"),
    ({"name": "fedast", "tasks": [{"name": "a"}, {"name": "b", "model": {"name": "resnet"}}]},
     "protocol.tasks[1].model.name: unknown model 'resnet'"),
    ({"name": "fedast", "tasks": [{"name": "a"}, {"name": "b", "modle": {"name": "mlp"}}]},
     "protocol.tasks[1].modle: unknown field"),
    ({"name": "fedast", "tasks": [{"name": "a", "algorithm": {"name": "fedavg", "lr": -1.0}}]},
     "protocol.tasks[0].algorithm.lr: "),
    ({"name": "fedast", "tasks": [{"name": "a", "initial_jobs": 2}, {"name": "b"}]},
     "protocol.tasks[1].initial_jobs: give it for every task or for none"),
    ({"name": "fedast", "tasks": TWO_MODELS, "buffer_ratio": 5}, "protocol.buffer_ratio: reallocation gives"),
    ({"name": "sync_st", "tasks": [{"name": f"t{i}"} for i in range(9)]}, "clients_per_round: 8 cannot be shared"),
])
def test_bad_task_lists_are_one_line_naming_the_field(protocol, message):
    with pytest.raises(ScenarioError) as info:
        fedsim.run(scenario(protocol), write=False)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("changes", "field"), [
    ({"stragglers": {"fraction": 0.5}}, "stragglers.fraction"),
    ({"systems": {"name": "homogeneous", "dropout": 0.1}}, "systems.dropout"),
])
def test_stragglers_and_dropouts_are_refused(changes, field):
    with pytest.raises(ScenarioError, match=rf"^{field}: protocol 'sync_st'"):
        fedsim.run(scenario({"name": "sync_st"}, **changes), write=False)


@pytest.mark.parametrize("protocol", [
    {"name": "fedast", "tasks": [{"name": "a", "target": 0.8}, *TWO_MODELS[1:]], "buffer_ratio": 1, "window": 3,
     "realloc_every": 4},
    {"name": "sync_st", "tasks": [{"name": "a", "target": 0.8}, *TWO_MODELS[1:]], "first": 3},
])
def test_the_run_state_restores_every_task_to_the_uninterrupted_rows(protocol):
    """Task server states, buffers, variance windows, jobs in flight, client queues and the tasks' own client
    states (SCAFFOLD's control variates) come back from the run state, stopped at several points."""
    source = scenario(protocol, rounds=40, algorithm={"name": "scaffold", "lr": 0.05, "batch_size": 20})
    whole = restarted_rows(source, None)
    assert any(r["variant"] == "ast:a" and r["accuracy"] >= 0.8 for r in whole)  # task a retired on the way
    for stop_after in (9, 62):
        assert restarted_rows(source, stop_after) == whole, stop_after
