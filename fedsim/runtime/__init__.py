"""Runtimes: where and how client rules execute. They take jobs (a client and its number of local steps),
run the algorithm's client rule on the client's data, and return messages; the protocol and the clock decide
when. The sequential runtime is the reference every other runtime (vectorized, MPI, Flower) must match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedsim.aggregation import weighted_mean
from fedsim.params import Pytree, tree_nbytes
from fedsim.registry import Registry


@dataclass(frozen=True)
class Job:
    """One client's local work in one round, starting from the model version it was sent."""

    client: int
    steps: int
    round: int


@dataclass(frozen=True)
class JobResult:
    """A finished job: its message (None where another process holds it), the client's training samples, the
    samples it processed (for the clock), and the exact size of its message in bytes."""

    client: int
    message: Pytree | None
    num_samples: int
    samples_processed: int
    message_bytes: int

    @classmethod
    def of(cls, client: int, message: Pytree, num_samples: int, samples_processed: int) -> JobResult:
        return cls(client, message, num_samples, samples_processed, tree_nbytes(message))


class Runtime(Protocol):
    threads: int
    """torch intra-op threads while this runtime's simulation runs."""

    def run_jobs(self, jobs: Sequence[Job], global_params: Pytree) -> list[JobResult]:
        """Run the jobs this process owns; return a result per job (a job another process ran has message None)."""
        ...

    def aggregate(self, results: Sequence[JobResult], weighting: str) -> Pytree:
        """The weighted mean of the results' messages, over every process's share."""
        ...


class InProcess:
    """Aggregation for runtimes whose results are all in this process: the weighted mean, as it is."""

    def aggregate(self, results: Sequence[JobResult], weighting: str) -> Pytree:
        return weighted_mean(results, weighting)


RUNTIMES: Registry = Registry("runtime")
"""Entries: a Runtime class constructed with `(params, context)`; see `fedsim.runtime.context.RuntimeContext`."""

from fedsim.runtime import sequential, vectorized  # noqa: E402,F401  (fill the registry)
