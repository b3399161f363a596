"""Runtimes: where and how client rules execute. They take jobs (a client, its local steps, the model version it
starts from), run the algorithm's client rule on the client's data from the job's start (the server's broadcast
message: one shared by all jobs, or one per job), and return results; the protocol and the clock decide when, and
the protocol commits a result's new client state when the result arrives. The sequential runtime is the reference
every other runtime (vectorized, MPI, Flower) must match. Callers that hold many jobs' starts as one pytree (a
gossip protocol's node rows) hand them over `Stacked` and take the results back stacked (`run_stacked`): the
vectorized runtime then runs them without a pytree per job (a `JobResult` per job is made only when one is read);
such callers may hand the jobs themselves as columns (`Jobs`), without a `Job` object per job.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, overload

import numpy as np
import torch
from numpy.typing import ArrayLike

from fedsim.aggregation import Sums, weighted_sums
from fedsim.params import Pytree, tree_leaves, tree_map, tree_unstack
from fedsim.registry import Registry


class Stacked(Sequence[Pytree]):
    """Per-job pytrees held as one pytree whose leaves carry a leading job axis: starts handed to `run_jobs` in one
    piece (a gossip protocol's node rows) and results' messages taken back so, without a pytree per job. As a
    sequence it yields row i's views on demand (copies with `copies`, for states that get stored: a view would keep
    the whole stack alive)."""

    def __init__(self, tree: Pytree, copies: bool = False) -> None:
        leaves = list(tree_leaves(tree))
        if not leaves or any(v.ndim == 0 or v.shape[0] != leaves[0].shape[0] for v in leaves):
            raise ValueError("Stacked: every leaf needs the same leading job axis")
        self.tree, self.copies, self._n = tree, copies, leaves[0].shape[0]

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Pytree: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Pytree]: ...

    def __getitem__(self, i: int | slice) -> Pytree | Sequence[Pytree]:
        if isinstance(i, slice):
            return Stacked(tree_map(lambda v: v[i], self.tree), self.copies)
        if not -self._n <= i < self._n:
            raise IndexError(f"Stacked: row {i} of {self._n}")
        return tree_map((lambda v: v[i].clone()) if self.copies else (lambda v: v[i]), self.tree)

    def __iter__(self) -> Iterator[Pytree]:
        """Every row, split off all at once (one `unbind` per leaf)."""
        rows = tree_unstack(self.tree, self._n)
        return (tree_map(torch.clone, row) for row in rows) if self.copies else iter(rows)

    def take(self, positions: Sequence[int]) -> Stacked:
        """The rows at `positions`, in that order: the same object for all rows in order, a view for a run of
        consecutive rows, else a copy."""
        index = torch.as_tensor(list(positions), dtype=torch.long)
        k = len(index)
        if k and bool((index.diff() == 1).all()):
            first = int(index[0])
            return self if k == self._n else self[first : first + k]
        return Stacked(tree_map(lambda v: v.index_select(0, index.to(v.device)), self.tree), self.copies)


Starts = Pytree | Sequence[Pytree]
"""The server messages jobs start from: one mapping shared by every job, or a sequence with one per job (a list,
or a `Stacked` pytree with a leading job axis)."""


@dataclass(frozen=True)
class Job:
    """One client's local work. `id` is the protocol's number for it, unique per client (the synchronous protocol
    numbers jobs by round): (seed, id, client) keys every random draw of the job, whichever runtime runs it.
    `version` is the server model version the job starts from (for staleness)."""

    id: int
    client: int
    steps: int
    version: int = 0


class Jobs(Sequence[Job]):
    """Many jobs held as columns, int64 arrays of ids, clients, steps and versions (a scalar: the same for every
    job): what a protocol that runs thousands of jobs at once (a gossip round) hands a runtime without a `Job`
    object per job. As a sequence it yields each `Job` on demand; runtimes read the columns (`Jobs.of`)."""

    def __init__(self, ids: ArrayLike, clients: ArrayLike, steps: ArrayLike, versions: ArrayLike = 0) -> None:
        columns = [np.asarray(c, dtype=np.int64) for c in (ids, clients, steps, versions)]
        shape = np.broadcast_shapes(*(c.shape for c in columns))
        if len(shape) != 1:
            raise ValueError("Jobs: the columns must be one-dimensional (or scalars next to one that is)")
        self.ids, self.clients, self.steps, self.versions = (np.array(np.broadcast_to(c, shape)) for c in columns)

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, i: int) -> Job: ...

    @overload
    def __getitem__(self, i: slice) -> Jobs: ...

    def __getitem__(self, i: int | slice) -> Job | Jobs:
        if isinstance(i, slice):
            return Jobs(self.ids[i], self.clients[i], self.steps[i], self.versions[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"Jobs: job {i} of {len(self)}")
        return Job(int(self.ids[i]), int(self.clients[i]), int(self.steps[i]), int(self.versions[i]))

    def __iter__(self) -> Iterator[Job]:
        columns = (self.ids.tolist(), self.clients.tolist(), self.steps.tolist(), self.versions.tolist())
        return itertools.starmap(Job, zip(*columns, strict=True))

    @classmethod
    def of(cls, jobs: Sequence[Job]) -> Jobs:
        """`jobs` as columns: itself if it is a `Jobs`, else read off the `Job` objects."""
        if isinstance(jobs, Jobs):
            return jobs
        n = len(jobs)
        return cls(*(np.fromiter((getattr(j, f) for j in jobs), dtype=np.int64, count=n)
                     for f in ("id", "client", "steps", "version")))


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


class StackedResults(Sequence[JobResult]):
    """Finished jobs whose messages stay on a leading job axis, row i being `jobs[i]`'s: what a runtime that runs
    jobs batched makes without a pytree per job. As a sequence it yields each job's `JobResult` on demand (the list
    API); callers that want the messages whole read `messages`, the work per job `work`, and commit states only when
    `has_states`."""

    def __init__(self, jobs: Sequence[Job], messages: Pytree, num_samples: Sequence[int], work: Sequence[int],
                 message_bytes: Sequence[int], client_states: Sequence[Pytree | None],
                 codec_states: Sequence[Pytree | None], has_states: bool) -> None:
        self.jobs, self.messages, self.num_samples, self.work = jobs, messages, num_samples, work
        self.message_bytes, self.client_states, self.codec_states = message_bytes, client_states, codec_states
        self.has_states = has_states
        self._rows = Stacked(messages) if jobs else None

    def __len__(self) -> int:
        return len(self.jobs)

    @overload
    def __getitem__(self, i: int) -> JobResult: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[JobResult]: ...

    def __getitem__(self, i: int | slice) -> JobResult | Sequence[JobResult]:
        if isinstance(i, slice):
            return [self[k] for k in range(len(self))[i]]
        if not -len(self) <= i < len(self):
            raise IndexError(f"StackedResults: result {i} of {len(self)}")
        assert self._rows is not None
        return JobResult(self.jobs[i], self._rows[i], self.num_samples[i], self.work[i], self.message_bytes[i],
                         self.client_states[i], self.codec_states[i])

    def __iter__(self) -> Iterator[JobResult]:
        if self._rows is None:
            return iter(())
        return itertools.starmap(JobResult, zip(self.jobs, self._rows, self.num_samples, self.work, self.message_bytes,
                                                self.client_states, self.codec_states, strict=True))

    @classmethod
    def of(cls, results: Sequence[JobResult]) -> StackedResults:
        """Results as they are (a StackedResults), or a list of results stacked (those another process holds, with
        no message here, left out)."""
        if isinstance(results, StackedResults):
            return results
        here = [r for r in results if r.here]
        messages = tree_map(lambda *leaves: torch.stack(leaves), *(r.message for r in here)) if here else {}
        client_states, codec_states = [r.client_state for r in here], [r.codec_state for r in here]
        return cls([r.job for r in here], messages, [r.num_samples for r in here], [r.work for r in here],
                   [r.message_bytes for r in here], client_states, codec_states,
                   any(s is not None for s in [*client_states, *codec_states]))

    @classmethod
    def concat(cls, parts: Sequence[StackedResults], order: Sequence[int] | None = None) -> StackedResults:
        """The parts one after another (one part: itself), rows then put in `order` (row k of the result is row
        order[k] of the concatenation; None: as they come)."""
        if len(parts) == 1 and order is None:
            return parts[0]
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls([], {}, [], [], [], [], [], False)
        at = list(range(sum(len(p) for p in parts))) if order is None else list(order)
        rows = Stacked(tree_map(lambda *leaves: torch.cat(leaves), *(p.messages for p in parts))).take(at)

        def joined(field: str) -> list[Any]:
            flat = [x for p in parts for x in getattr(p, field)]
            return [flat[k] for k in at]

        return cls(joined("jobs"), rows.tree, joined("num_samples"), joined("work"), joined("message_bytes"),
                   joined("client_states"), joined("codec_states"), any(p.has_states for p in parts))


class Runtime(Protocol):
    threads: int
    """torch intra-op threads while this runtime's simulation runs."""

    def run_jobs(self, jobs: Sequence[Job], starts: Starts) -> Sequence[JobResult]:
        """Run the jobs this process owns; return a result per job, in job order (a job another process ran has
        message None): a list, or for `Stacked` starts, from a runtime that runs jobs batched, a `StackedResults`."""
        ...

    def broadcast_payload(self, message: Pytree, payload: Pytree) -> None:
        """The downlink payload the decoded broadcast `message` came from: a runtime whose starts travel over a wire
        sends it in place of a start that is `message`; in-process runtimes need only the message."""
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

    def broadcast_payload(self, message: Pytree, payload: Pytree) -> None:
        """Nothing: jobs start from the decoded message in this process."""

    def reduce(self, results: Sequence[JobResult], weighting: Mapping[str, str], template: Pytree) -> Sums:
        return weighted_sums(results, weighting, template)

    def gather_messages(self, results: Sequence[JobResult]) -> list[Pytree]:
        return [r.message for r in results]


def jobs_starts(jobs: Sequence[Job], starts: Starts) -> Sequence[Pytree]:
    """One start per job, whether `starts` is shared or per job (a `Stacked` stays one, its rows made on demand; a
    per-job sequence of the wrong length is a bug)."""
    if isinstance(starts, Mapping):
        return [starts] * len(jobs)
    if len(starts) != len(jobs):
        raise ValueError(f"run_jobs: {len(starts)} starts for {len(jobs)} jobs")
    return starts if isinstance(starts, Stacked) else list(starts)


def run_stacked(runtime: Runtime, jobs: Sequence[Job], starts: Stacked) -> StackedResults:
    """Run the jobs from stacked starts and take their results back stacked: as the runtime made them where it runs
    jobs batched, else its list stacked here (results another process holds are left out)."""
    return StackedResults.of(runtime.run_jobs(jobs, starts))


RUNTIMES: Registry = Registry("runtime")
"""Entries: a Runtime class constructed with `(params, context)`; see `fedsim.runtime.context.RuntimeContext`."""

from fedsim.runtime import sequential, vectorized  # noqa: E402,F401  (fill the registry)
