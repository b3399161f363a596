"""Client selection and the FedProx straggler protocol."""

from __future__ import annotations

import numpy as np

import fedsim
from fedsim.runtime.sequential import SequentialRuntime
from fedsim.sampling import plan_round, samples_processed, steps_per_epoch

SIZES = np.array([95, 40, 7, 120, 33, 61, 88, 12, 50, 77, 19, 45])


def test_ten_clients_with_ninety_percent_stragglers_leave_one_active():
    plan = plan_round(0, 0, SIZES, 10, 0.9, 20, 10)
    assert len(plan.clients) == len(set(plan.clients)) == 10
    assert plan.straggler.sum() == 9


def test_straggler_epochs_are_drawn_from_one_to_e_minus_one():
    per_epoch = None
    seen = set()
    for t in range(200):
        plan = plan_round(1, t, SIZES, 10, 0.9, 5, 10)
        per_epoch = steps_per_epoch(SIZES[plan.clients], 10)
        epochs = plan.steps // per_epoch
        assert (plan.steps % per_epoch == 0).all()
        assert (epochs[~plan.straggler] == 5).all()
        seen |= set(epochs[plan.straggler].tolist())
    assert seen == {1, 2, 3, 4}


def test_with_one_epoch_stragglers_run_a_random_part_of_it():
    for t in range(50):
        plan = plan_round(2, t, SIZES, 10, 0.5, 1, 10)
        full = steps_per_epoch(SIZES[plan.clients], 10)
        late = plan.straggler & (full > 1)
        assert ((plan.steps[late] >= 1) & (plan.steps[late] < full[late])).all()
        assert (plan.steps[~plan.straggler] == full[~plan.straggler]).all()


def test_local_steps_replace_epochs_and_stragglers_take_fewer_steps():
    for t in range(50):
        plan = plan_round(3, t, SIZES, 10, 0.5, 4, 10, local_steps=7)
        assert (plan.steps[~plan.straggler] == 7).all()
        assert ((plan.steps[plan.straggler] >= 1) & (plan.steps[plan.straggler] < 7)).all()


def test_samples_processed_counts_whole_epochs_then_full_batches():
    sizes = np.array([25, 25, 30])
    # 25 samples in batches of 10: epochs of 3 steps (10, 10, 5).
    assert samples_processed(np.array([3, 4, 6]), sizes, 10).tolist() == [25, 35, 60]


def test_local_steps_set_every_jobs_step_count_end_to_end(tiny, monkeypatch):
    seen: list[int] = []
    original = SequentialRuntime.run_jobs

    def spy(self, jobs, starts):
        seen.extend(job.steps for job in jobs)
        return original(self, jobs, starts)

    monkeypatch.setattr(SequentialRuntime, "run_jobs", spy)
    fedsim.run({**tiny, "runtime": {"name": "sequential"},
                "algorithm": {"name": "fedavg", "batch_size": 5, "local_steps": 3}}, write=False)
    assert seen and set(seen) == {3}


def test_plan_depends_only_on_seed_and_round():
    a, b = plan_round(5, 3, SIZES, 6, 0.5, 4, 10), plan_round(5, 3, SIZES, 6, 0.5, 4, 10)
    assert (a.clients == b.clients).all() and (a.steps == b.steps).all()
    assert not (plan_round(5, 4, SIZES, 6, 0.5, 4, 10).clients == a.clients).all()


def test_every_method_sees_the_same_clients_and_stragglers(tiny, monkeypatch):
    seen: list[list[tuple[int, int]]] = []
    original = SequentialRuntime.run_jobs

    def spy(self, jobs, params):
        seen[-1].append([(j.client, j.steps) for j in jobs])
        return original(self, jobs, params)

    monkeypatch.setattr(SequentialRuntime, "run_jobs", spy)
    tiny["stragglers"] = {"fraction": 0.5}
    for mu in (0.0, 1.0):
        seen.append([])
        fedsim.run({**tiny, "algorithm": {**tiny["algorithm"], "mu": mu}}, write=False)
    seen.append([])
    fedsim.run({**tiny, "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20}}, write=False)
    assert seen[0] == seen[1]
    # FedAvg runs exactly the non-stragglers of the same draw.
    for kept, everyone in zip(seen[2], seen[0], strict=True):
        assert set(kept) < set(everyone) and len(kept) == 2
