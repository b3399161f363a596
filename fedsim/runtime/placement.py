"""Where clients run: the devices a runtime uses and the policy that spreads jobs over them.

`devices: [cpu]`, `[cuda:0, cuda:1]` or `auto` (every CUDA device, else the CPU). A device that does not exist is
an error, never a silent fallback. Listing a device twice gives it two workers. Policies: `round_robin` (the
round's i-th job to device i mod D), `by_client` (client k to device k mod D, so a client always runs on the same
device) and `map` (an explicit client -> device map; unmapped clients go round robin). Each device is driven by
its own worker thread; results come back in job order, so placement never changes the numbers beyond float
differences between device types.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import torch
from pydantic import Field, field_validator

from fedsim.errors import ScenarioError
from fedsim.registry import Params
from fedsim.runtime import Job

T = TypeVar("T")


class PlacementParams(Params):
    policy: Literal["round_robin", "by_client", "map"] = "round_robin"
    map: dict[int, str] = Field(default_factory=dict, description="client id -> device, for policy 'map'")

    @field_validator("map", mode="before")
    @classmethod
    def _client_ids(cls, value: Any) -> Any:
        """Client ids as YAML keys are strings ('0': cuda:0, since scenario keys must be strings): read them back."""
        if not isinstance(value, dict):
            return value
        return {int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else k: v for k, v in value.items()}


def _parse(name: str, setting: str) -> torch.device:
    """A device name as torch reads it (cuda means cuda:0), or a ScenarioError naming the setting."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ScenarioError(f"{setting}: {name!r} is not a device name (use cpu, cuda, cuda:0, ...)") from None
    return torch.device("cuda", device.index or 0) if device.type == "cuda" else device


def resolve_device(name: str) -> torch.device:
    """The torch device named, if it exists here, or a ScenarioError naming the setting."""
    device = _parse(name, "runtime.devices")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise ScenarioError(f"runtime.devices: {name} does not exist here ({count} CUDA devices)")
        return device
    if device.type != "cpu":
        raise ScenarioError(f"runtime.devices: {name!r} is not supported; use cpu or cuda[:N]")
    return device


def resolve_devices(spec: Sequence[str] | str) -> list[torch.device]:
    """The listed devices, or for `auto` every CUDA device (the CPU when there is none)."""
    if spec == "auto":
        count = torch.cuda.device_count()
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    if isinstance(spec, str) or not spec:
        raise ScenarioError(f"runtime.devices: expected a list of devices or 'auto', got {spec!r}")
    return [resolve_device(name) for name in spec]


class Placement:
    """Assigns jobs to device slots and runs each slot's share concurrently."""

    def __init__(self, devices: list[torch.device], params: PlacementParams) -> None:
        self.devices, self.params = devices, params
        self.mapped = {}
        for client, name in params.map.items():
            device = _parse(name, "runtime.placement.map")
            if device not in devices:
                raise ScenarioError(f"runtime.placement.map: client {client} is mapped to {name}, which is not in "
                                    f"runtime.devices ({', '.join(map(str, devices))})")
            self.mapped[client] = devices.index(device)
        if params.policy == "map" and not params.map:
            raise ScenarioError("runtime.placement.map: policy 'map' needs a client -> device map")
        self.pool = ThreadPoolExecutor(max_workers=len(devices)) if len(devices) > 1 else None

    def slot(self, position: int, job: Job) -> int:
        d = len(self.devices)
        if self.params.policy == "by_client":
            return job.client % d
        if self.params.policy == "map" and job.client in self.mapped:
            return self.mapped[job.client]
        return position % d

    def split(self, jobs: Sequence[Job]) -> list[list[int]]:
        """For each device slot, the positions of the jobs it runs."""
        shares: list[list[int]] = [[] for _ in self.devices]
        for position, job in enumerate(jobs):
            shares[self.slot(position, job)].append(position)
        return shares

    def run(self, jobs: Sequence[Job], work: Callable[[int, list[int]], list[T]]) -> list[T]:
        """`work(slot, positions)` for every slot with jobs, concurrently; the outputs in the original job order."""
        shares = [(slot, positions) for slot, positions in enumerate(self.split(jobs)) if positions]
        outputs = list(self.pool.map(lambda share: work(*share), shares)) if self.pool else [work(*s) for s in shares]
        ordered: list[T | None] = [None] * len(jobs)
        for (_, positions), out in zip(shares, outputs, strict=True):
            for p, item in zip(positions, out, strict=True):
                ordered[p] = item
        return ordered  # type: ignore[return-value]
