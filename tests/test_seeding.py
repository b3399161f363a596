"""Seed derivation: the batched `derive_seeds` / `torch_generators` give exactly the per-key seeds and generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.runtime import Job
from fedsim.runtime.context import job_seeds
from fedsim.seeding import Stream, derive_seed, derive_seeds, torch_generator, torch_generators


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**40 + 5, 2**70 + 3])
@pytest.mark.parametrize("keys", [(), (0,), (7,), (3, 2**33)])
def test_derive_seeds_equals_derive_seed_per_key(seed, keys):
    last = [0, 1, 2**32 - 1, *np.random.default_rng(seed % 2**32).integers(0, 2**32, 20).tolist()]
    assert derive_seeds(seed, Stream.LOCAL, *keys, last=last) == [derive_seed(seed, Stream.LOCAL, *keys, k)
                                                                   for k in last]


@pytest.mark.parametrize("seed", [0, 2**40 + 5])
def test_derive_seeds_with_a_varying_job_id_equals_derive_seed_per_job(seed):
    rng = np.random.default_rng(3)
    ids, clients = rng.integers(0, 2**32, 30).tolist(), rng.integers(0, 2**32, 30).tolist()
    ids[:3], clients[:3] = [0, 2**32 - 1, 5], [0, 7, 2**32 - 1]
    assert derive_seeds(seed, Stream.ORACLE, ids, last=clients) == [derive_seed(seed, Stream.ORACLE, i, c)
                                                                    for i, c in zip(ids, clients, strict=True)]
    with pytest.raises(ValueError, match="a varying key must fit in 32 bits"):
        derive_seeds(seed, Stream.ORACLE, [2**32], last=[1])


def test_torch_generators_draw_what_torch_generator_draws():
    batched = torch_generators(5, Stream.LOCAL, 2, last=[4, 0, 9])
    for client, generator in zip([4, 0, 9], batched, strict=True):
        expected = torch.randperm(50, generator=torch_generator(5, Stream.LOCAL, 2, client))
        assert torch.equal(torch.randperm(50, generator=generator), expected)


def test_local_seeds_follow_each_jobs_id_and_client():
    jobs = [Job(0, 3, 1), Job(2, 8, 1), Job(0, 5, 1)]
    for job, seed in zip(jobs, job_seeds(11, Stream.LOCAL, jobs), strict=True):
        assert seed == derive_seed(11, Stream.LOCAL, job.id, job.client)


def test_keys_beyond_32_bits_in_the_batched_position_are_refused():
    with pytest.raises(ValueError, match="must fit in 32 bits"):
        derive_seeds(0, Stream.LOCAL, 1, last=[2**32])
