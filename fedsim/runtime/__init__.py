"""Runtimes: where and how client rules execute. They take jobs (a client and its number of local steps),
run the algorithm's client rule on the client's data, and return messages; the protocol and the clock decide
when. The sequential runtime is the reference every other runtime (vectorized, MPI, Flower) must match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedsim.params import Pytree
from fedsim.registry import Registry


@dataclass(frozen=True)
class Job:
    """One client's local work in one round, starting from the model version it was sent."""

    client: int
    steps: int
    round: int


@dataclass(frozen=True)
class JobResult:
    client: int
    message: Pytree
    num_samples: int
    samples_processed: int


class Runtime(Protocol):
    threads: int
    """torch intra-op threads while this runtime's simulation runs."""

    def run_jobs(self, jobs: Sequence[Job], global_params: Pytree) -> list[JobResult]: ...


RUNTIMES: Registry = Registry("runtime")
"""Entries: a Runtime class constructed with `(params, context)`; see `fedsim.runtime.context.RuntimeContext`."""

from fedsim.runtime import sequential, vectorized  # noqa: E402,F401  (fill the registry)
