"""Poisson-sampled local batches (`algorithm.sampling: poisson`): each sample taken independently with probability
batch_size / n, keyed by the job so every runtime draws the same batches, the loss summed over the sample and
divided by the expected size, padding and empty steps that count for nothing, and clients too small refused."""

from __future__ import annotations

import math

import pytest
import torch
from rulekit import assert_runtimes_agree

import fedsim
from fedsim.clients import Batch, LocalTrainingParams
from fedsim.errors import ScenarioError
from fedsim.keyed_random import key_from_seed
from fedsim.models import MODELS, build_model
from fedsim.oracle import AutogradOracle, local_oracle
from fedsim.registry import NoParams
from fedsim.runtime import Job, context
from fedsim.runtime.context import job_seeds, padded_poisson_schedules, poisson_schedule
from fedsim.runtime.local import job_batches
from fedsim.seeding import Stream
from fedsim.tasks import Classification, Objective


def test_each_sample_is_taken_with_probability_batch_size_over_n_independently():
    n, b, steps = 50, 5, 4000
    rows = poisson_schedule(17, n, b, steps)
    taken = torch.zeros(steps, n, dtype=torch.bool)
    for s, row in enumerate(rows):
        kept = row[row >= 0]
        assert bool((kept[1:] > kept[:-1]).all()) and bool((row[len(kept):] == -1).all())
        taken[s, kept] = True
    q, sd = b / n, math.sqrt(steps * (b / n) * (1 - b / n))
    per_sample = taken.sum(0).double()
    assert float((per_sample - steps * q).abs().max()) < 5 * sd  # every sample: Binomial(steps, q)
    assert abs(float(taken.sum(1).double().mean()) - b) < 0.1  # the expected batch size is b
    both = (taken[:, 0] & taken[:, 1]).double().mean()  # independence of two samples: P(both) = q^2
    assert abs(float(both) - q * q) < 5 * math.sqrt(q * q / steps)


def test_the_schedule_repeats_with_the_seed_and_changes_with_it():
    assert torch.equal(poisson_schedule(3, 40, 4, 30), poisson_schedule(3, 40, 4, 30))
    assert not torch.equal(poisson_schedule(3, 40, 4, 30), poisson_schedule(4, 40, 4, 30))


def test_many_jobs_schedules_are_each_jobs_own_padded_to_a_common_width():
    jobs = [Job(0, 2, 6), Job(0, 5, 3), Job(0, 7, 0)]
    sizes = [30, 12, 9]
    out = padded_poisson_schedules(11, jobs, sizes, 3)
    assert out.shape[:2] == (6, 3)
    for j, (seed, job) in enumerate(zip(job_seeds(11, Stream.LOCAL, jobs), jobs, strict=True)):
        own = poisson_schedule(seed, sizes[j], 3, job.steps)
        assert torch.equal(out[: job.steps, j, : own.shape[1]], own)
        assert bool((out[: job.steps, j, own.shape[1]:] == -1).all()) and bool((out[job.steps:, j] == -1).all())


def objective() -> Objective:
    model = build_model("logreg", MODELS.get("logreg").params(), (4,), 3, seed=2)
    return Objective(model, Classification(NoParams()))


def test_the_loss_is_the_sum_over_the_sample_divided_by_the_expected_batch_size():
    obj, g = objective(), torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    hp = LocalTrainingParams(batch_size=6, sampling="poisson")
    batches = list(job_batches(x, y, hp, 5, local_seed=9, key=key_from_seed(1)))
    params = obj.model.init_params
    for batch in batches:
        kept = batch.w > 0
        by_hand = AutogradOracle(obj).grad(params, Batch(batch.x[kept], batch.y[kept], batch.w[kept], batch.key,
                                                         batch.step))
        scale = float(kept.sum()) / hp.batch_size
        got = local_oracle(obj, hp).grad(params, batch)
        torch.testing.assert_close(got, {k: v * scale for k, v in by_hand.items()}, atol=1e-6, rtol=1e-5)


def test_a_step_that_takes_no_sample_leaves_sgd_where_it_was():
    obj = objective()
    x, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    hp = LocalTrainingParams(batch_size=1, sampling="poisson")
    batches = list(job_batches(x, y, hp, 40, local_seed=3, key=key_from_seed(1)))
    empty = [b for b in batches if not bool((b.w > 0).any())]
    assert empty, "with q = 0.2 over 5 samples some of 40 steps take nothing"
    grads = local_oracle(obj, hp).grad(obj.model.init_params, empty[0])
    assert all(bool((v == 0).all()) for v in grads.values())


@pytest.mark.parametrize("runtime_params", [{}, {"min_batch": 1}, {"min_batch": 10**6}],
                         ids=["default", "always-vmapped", "one-by-one"])
def test_runtimes_agree_with_poisson_sampling(tiny, runtime_params):
    spec = {**tiny, "rounds": 2, "partition": {"name": "quantity", "sigma": 1.0},
            "algorithm": {**tiny["algorithm"], "batch_size": 7, "sampling": "poisson"}}
    assert_runtimes_agree(lambda rt: {**spec, "runtime": {**rt, **(runtime_params if rt["name"] == "vectorized"
                                                                   else {})}})


def test_poisson_sampling_is_not_the_shuffled_schedule(tiny):
    shuffled = fedsim.run({**tiny, "rounds": 1}, write=False)
    poisson = fedsim.run({**tiny, "rounds": 1, "algorithm": {**tiny["algorithm"], "sampling": "poisson"}},
                         write=False)
    assert poisson.metrics.rows[-1]["loss"] != shuffled.metrics.rows[-1]["loss"]


def test_a_client_with_fewer_samples_than_the_batch_is_refused_naming_the_field(tiny):
    spec = {**tiny, "algorithm": {**tiny["algorithm"], "batch_size": 500, "sampling": "poisson"}}
    with pytest.raises(ScenarioError, match=r"^algorithm\.batch_size: Poisson sampling takes each sample") as exc:
        fedsim.run(spec, write=False)
    assert "\n" not in str(exc.value)


def test_big_clients_are_drawn_in_blocks_of_steps_with_the_same_statistics(monkeypatch):
    monkeypatch.setattr(context, "POISSON_DRAWS", 100)  # 2 steps a block for 50 samples
    n, b, steps = 50, 5, 4000
    rows = context.poisson_schedule(17, n, b, steps)
    counts = (rows >= 0).sum(1).double()
    assert abs(float(counts.mean()) - b) < 0.1 and float(counts.var()) == pytest.approx(b * (1 - b / n), rel=0.1)
    monkeypatch.setattr(context, "POISSON_DRAWS", 1 << 22)
    assert not torch.equal(rows, context.poisson_schedule(17, n, b, steps))  # the blocks are drawn apart
