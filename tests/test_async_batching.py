"""Asynchronous protocols never fall back to one client at a time: with many clients in flight, the jobs
dispatched between two arrivals of not-yet-run jobs run together in one `run_jobs` call, whatever model versions
they start from (so the vectorized runtime stacks them)."""

from __future__ import annotations

import numpy as np
import pytest

import fedsim
from fedsim.runtime.vectorized import VectorizedRuntime
from fedsim.servers import PROTOCOLS

ASYNCHRONOUS = [e.name for e in PROTOCOLS if e.meta.get("asynchronous")]


@pytest.mark.parametrize("protocol", ASYNCHRONOUS)
def test_jobs_in_flight_run_in_batches_of_about_the_concurrency(monkeypatch, protocol):
    sizes: list[int] = []
    versions: list[int] = []
    run_jobs = VectorizedRuntime.run_jobs

    def spy(self, jobs, starts):
        sizes.append(len(jobs))
        versions.append(len({job.version for job in jobs}))
        return run_jobs(self, jobs, starts)

    monkeypatch.setattr(VectorizedRuntime, "run_jobs", spy)
    fedsim.run({"name": "batched", "seed": 0, "rounds": 40, "num_clients": 100, "clients_per_round": 16,
                "data": {"name": "digits"}, "partition": {"name": "iid"}, "model": {"name": "logreg"},
                "algorithm": {"name": "fedavg", "lr": 0.05, "batch_size": 20}, "protocol": {"name": protocol},
                "systems": {"name": "lognormal", "speed_sigma": 1.0}, "evaluation": {"every": 40}}, write=False)
    assert sizes[0] == 16 and np.mean(sizes) >= 8, sizes
    assert max(versions) > 1
