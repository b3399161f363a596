"""What the in-process runtimes share: settings for threads, devices, placement and client-state memory, and
the loop that spreads jobs over devices, each device with its own copy of the model and of the jobs' starts (a
stacked start goes whole, each device taking its share of the rows)."""

from __future__ import annotations

import copy
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from fedsim.params import Pytree, tree_to
from fedsim.registry import Params
from fedsim.runtime import InProcess, Job, JobResult, Stacked, StackedResults, Starts, jobs_starts
from fedsim.runtime.context import RuntimeContext
from fedsim.runtime.placement import Placement, PlacementParams, resolve_devices
from fedsim.sizes import parse_bytes
from fedsim.tasks import Objective


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (a run's runtime threads: reductions split over
    another number of threads round differently), restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class RuntimeParams(Params):
    threads: int = Field(1, ge=1, le=1024, description="torch intra-op threads; small models run fastest on one")
    devices: list[str] | Literal["auto"] = Field(default_factory=lambda: ["cpu"])
    placement: PlacementParams = PlacementParams()
    state_memory: int | float | str | None = Field(
        None, description="bytes of client state kept in memory; the rest spills to disk (default: keep all)")
    spill_dir: str | None = None

    @field_validator("state_memory")
    @classmethod
    def _state_memory_size(cls, value: int | float | str | None) -> int | None:
        return None if value is None else parse_bytes(value)


class PlacedRuntime(InProcess, ABC):
    """Runs each device's share of the jobs in its own worker; subclasses say how one device runs its jobs."""

    def __init__(self, params: RuntimeParams, context: RuntimeContext) -> None:
        self.ctx, self.threads = context, params.threads
        self.devices = resolve_devices(params.devices)
        self.placement = Placement(self.devices, params.placement)
        # functional_call swaps parameters into the module while it runs, so concurrent workers each need a copy.
        task = context.objective.task
        self.objectives = [context.objective] + [Objective(copy.deepcopy(context.model), task)
                                                 for _ in self.devices[1:]]

    def run_jobs(self, jobs: Sequence[Job], starts: Starts) -> Sequence[JobResult]:
        """A result per job, in job order: a list, or for `Stacked` starts a `StackedResults` (messages on a job
        axis, copied only where devices or chunks split the jobs)."""
        shares = self._run_shares(jobs, starts)
        if isinstance(starts, Stacked):
            positions = np.array([p for share, _ in shares for p in share], dtype=np.int64)
            in_order = bool((positions == np.arange(len(positions))).all())
            return StackedResults.concat([StackedResults.of(piece) for _, pieces in shares for piece in pieces],
                                         None if in_order else np.argsort(positions).tolist())
        ordered: list[JobResult | None] = [None] * len(jobs)
        for positions, pieces in shares:
            for p, result in zip(positions, itertools.chain.from_iterable(pieces), strict=True):
                ordered[p] = result
        return ordered  # type: ignore[return-value]

    def _run_shares(self, jobs: Sequence[Job],
                    starts: Starts) -> list[tuple[list[int], list[Sequence[JobResult]]]]:
        """Each device's share of the jobs (their positions) and its results in pieces (`run_on`), the shares run
        concurrently."""
        per_job = jobs_starts(jobs, starts)
        if len(self.devices) == 1:  # every policy puts every job on the one device
            shares = [(0, list(range(len(jobs))))] if jobs else []
        else:
            shares = [(slot, positions) for slot, positions in enumerate(self.placement.split(jobs)) if positions]
        if isinstance(per_job, Stacked):
            def starts_on(slot: int, positions: list[int]) -> Sequence[Pytree]:
                return Stacked(tree_to(per_job.take(positions).tree, self.devices[slot]))
        else:
            # Each distinct start goes to each device once (a shared start, or the few versions async jobs start from).
            distinct = {id(s): s for s in per_job}
            copies = {(key, d): tree_to(s, d) for key, s in distinct.items() for d in set(self.devices)}

            def starts_on(slot: int, positions: list[int]) -> Sequence[Pytree]:
                return [copies[id(per_job[p]), self.devices[slot]] for p in positions]

        # Stored states are read here, before the device workers start (a spilling store is not thread-safe).
        store = self.ctx.states
        stored = [store.get(j.client) for j in jobs] if len(store) else [None] * len(jobs)

        def work(share: tuple[int, list[int]]) -> list[Sequence[JobResult]]:
            slot, positions = share
            if len(positions) == len(jobs):
                return self.run_on(slot, jobs, stored, starts_on(slot, positions))
            return self.run_on(slot, [jobs[p] for p in positions], [stored[p] for p in positions],
                               starts_on(slot, positions))

        pool = self.placement.pool
        outputs = list(pool.map(work, shares)) if pool else [work(share) for share in shares]
        return [(positions, pieces) for (_, positions), pieces in zip(shares, outputs, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """Nothing that changes numbers (subclasses that keep such bookkeeping add it)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see `state_dict`)."""

    @abstractmethod
    def run_on(self, slot: int, jobs: Sequence[Job], stored: list[Pytree | None],
               starts: Sequence[Pytree]) -> list[Sequence[JobResult]]:
        """Run `jobs` on worker `slot`'s device, with its own model copy, each from its start (the server message,
        already on that device: a list, jobs sharing a start sharing the object, or a `Stacked`) and its client's
        stored state (None: the rule's initial state from the start); a result per job, in order, in pieces (a
        `StackedResults` per batch of jobs run together)."""

    def initial_states(self, stored: list[Pytree | None], starts: Sequence[Pytree]) -> list[Pytree | None]:
        """Each job's client state: the stored one, or the rule's initial state from the job's start."""
        rule = self.ctx.rule
        return [rule.initial_state(start) if s is None else s for s, start in zip(stored, starts, strict=True)]
