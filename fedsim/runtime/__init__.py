"""Runtimes: where and how client rules execute. They take jobs (a client, its local steps, the model version it
starts from), run the algorithm's client rule on the client's data from the job's start (the server's broadcast
message: one shared by all jobs, or one per job), and return results; the protocol and the clock decide when, and
the protocol commits a result's new client state when the result arrives. The sequential runtime is the reference
every other runtime (vectorized, MPI, Flower) must match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedsim.aggregation import Sums, weighted_sums
from fedsim.params import Pytree
from fedsim.registry import Registry

Starts = Pytree | Sequence[Pytree]
"""The server messages jobs start from: one mapping shared by every job, or a sequence with one per job."""


@dataclass(frozen=True)
class Job:
    """One client's local work. `id` is the protocol's number for it, unique per client (the synchronous protocol
    numbers jobs by round): (seed, id, client) keys every random draw of the job, whichever runtime runs it.
    `version` is the server model version the job starts from (for staleness)."""

    id: int
    client: int
    steps: int
    version: int = 0


@dataclass(frozen=True)
class JobResult:
    """A finished job: the message as the server decodes it (None where another MPI rank holds it), the client's
    training samples, its work (samples processed times the rule's step cost, for the clock), the exact bytes of
    the payload sent, and the client's new persistent state and codec state (committed by the protocol on arrival;
    None for stateless rules, and where another rank holds them)."""

    job: Job
    message: Pytree | None
    num_samples: int
    work: int
    message_bytes: int
    client_state: Pytree | None = None
    codec_state: Pytree | None = None

    @property
    def client(self) -> int:
        return self.job.client

    @property
    def here(self) -> bool:
        """Whether this process holds the message and states (false for another MPI rank's jobs)."""
        return self.message is not None


class Runtime(Protocol):
    threads: int
    """torch intra-op threads while this runtime's simulation runs."""

    def run_jobs(self, jobs: Sequence[Job], starts: Starts) -> list[JobResult]:
        """Run the jobs this process owns; return a result per job, in job order (a job another process ran has
        message None)."""
        ...

    def reduce(self, results: Sequence[JobResult], weighting: Mapping[str, str], template: Pytree) -> Sums:
        """Per message key, the weighted sum of the results' messages and the total weight, over every process's
        share (see `fedsim.aggregation`)."""
        ...

    def gather_messages(self, results: Sequence[JobResult]) -> list[Pytree]:
        """Every result's message, in result order, from whichever process holds it (per-result server rules)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Bookkeeping that can change numbers when a run resumes (the vectorized runtime's compiled chunk sizes)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class InProcess:
    """Reductions for runtimes whose results are all in this process."""

    def reduce(self, results: Sequence[JobResult], weighting: Mapping[str, str], template: Pytree) -> Sums:
        return weighted_sums(results, weighting, template)

    def gather_messages(self, results: Sequence[JobResult]) -> list[Pytree]:
        return [r.message for r in results]


def jobs_starts(jobs: Sequence[Job], starts: Starts) -> list[Pytree]:
    """One start per job, whether `starts` is shared or per job (a per-job sequence of the wrong length is a bug)."""
    if isinstance(starts, Mapping):
        return [starts] * len(jobs)
    if len(starts) != len(jobs):
        raise ValueError(f"run_jobs: {len(starts)} starts for {len(jobs)} jobs")
    return list(starts)


RUNTIMES: Registry = Registry("runtime")
"""Entries: a Runtime class constructed with `(params, context)`; see `fedsim.runtime.context.RuntimeContext`."""

from fedsim.runtime import sequential, vectorized  # noqa: E402,F401  (fill the registry)
