"""What the in-process runtimes share: settings for threads, devices, placement and client-state memory, and
the loop that spreads a round's jobs over devices and files the clients' new states."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, field_validator

from fedsim.params import Pytree, tree_to
from fedsim.registry import Params
from fedsim.runtime import InProcess, Job, JobResult
from fedsim.runtime.context import RuntimeContext
from fedsim.runtime.placement import Placement, PlacementParams, resolve_devices
from fedsim.sizes import parse_bytes

Outcome = tuple[JobResult, Pytree | None]
"""A job's result and the client's new persistent state."""


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
        self.models = [context.model] + [copy.deepcopy(context.model) for _ in self.devices[1:]]

    def run_jobs(self, jobs: Sequence[Job], global_params: Pytree) -> list[JobResult]:
        ctx = self.ctx
        states = [ctx.client_state(j.client, global_params) for j in jobs]
        copies = {d: tree_to(global_params, d) for d in set(self.devices)}

        def work(slot: int, positions: list[int]) -> list[Outcome]:
            return self.run_on(slot, [jobs[p] for p in positions], [states[p] for p in positions],
                               copies[self.devices[slot]])

        outcomes = self.placement.run(jobs, work)
        for job, (_, state) in zip(jobs, outcomes, strict=True):
            ctx.states.put(job.client, state)
        return [result for result, _ in outcomes]

    @abstractmethod
    def run_on(self, slot: int, jobs: list[Job], states: list[Pytree | None],
               global_params: Pytree) -> list[Outcome]:
        """Run `jobs` (with the clients' current states) on worker `slot`'s device, with its own model copy,
        from the model `global_params` already on that device."""
