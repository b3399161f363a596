"""What the in-process runtimes share: settings for threads, devices, placement and client-state memory, and
the loop that spreads jobs over devices, each device with its own copy of the model and of the jobs' starts."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from fedsim.params import Pytree, tree_to
from fedsim.registry import Params
from fedsim.runtime import InProcess, Job, JobResult, Starts, jobs_starts
from fedsim.runtime.context import RuntimeContext
from fedsim.runtime.placement import Placement, PlacementParams, resolve_devices
from fedsim.sizes import parse_bytes
from fedsim.tasks import Objective


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

    def run_jobs(self, jobs: Sequence[Job], starts: Starts) -> list[JobResult]:
        ctx = self.ctx
        per_job = jobs_starts(jobs, starts)
        states = [ctx.client_state(j.client, start) for j, start in zip(jobs, per_job, strict=True)]
        # Each distinct start goes to each device once (a shared start, or the few versions async jobs start from).
        distinct = {id(s): s for s in per_job}
        copies = {(key, d): tree_to(s, d) for key, s in distinct.items() for d in set(self.devices)}

        def work(slot: int, positions: list[int]) -> list[JobResult]:
            device = self.devices[slot]
            return self.run_on(slot, [jobs[p] for p in positions], [states[p] for p in positions],
                               [copies[id(per_job[p]), device] for p in positions])

        return self.placement.run(jobs, work)

    def state_dict(self) -> dict[str, Any]:
        """Nothing that changes numbers (subclasses that keep such bookkeeping add it)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore (see `state_dict`)."""

    @abstractmethod
    def run_on(self, slot: int, jobs: list[Job], states: list[Pytree | None],
               starts: list[Pytree]) -> list[JobResult]:
        """Run `jobs` (with the clients' current states) on worker `slot`'s device, with its own model copy, each
        from its start (the server message, already on that device; jobs sharing a start share the object)."""
