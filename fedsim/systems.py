"""System heterogeneity: each client's compute speed and link, and how they turn work and bytes into seconds.

Profiles are registry entries `fn(params, num_clients, rng) -> ClientSystems`; the clock charges a job
`latency + bytes_down / bandwidth_down` to receive the model, `work / speed` to train (work: samples processed
times the rule's gradient evaluations per step), and
`latency + bytes_up / bandwidth_up` to send its message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field

from fedsim.registry import Params, Registry


@dataclass(frozen=True)
class ClientSystems:
    """Per-client arrays: speed (sample-gradient evaluations per second), latency (s), bandwidths (bytes per second)."""

    speed: np.ndarray
    latency: np.ndarray
    bandwidth_up: np.ndarray
    bandwidth_down: np.ndarray

    def job_seconds(self, client: int, work: int, bytes_down: int, bytes_up: int) -> float:
        """Simulated duration of one job: download, local training (`work` sample-gradient evaluations), upload."""
        down = self.latency[client] + bytes_down / self.bandwidth_down[client]
        up = self.latency[client] + bytes_up / self.bandwidth_up[client]
        return float(down + work / self.speed[client] + up)


SYSTEMS: Registry = Registry("systems profile")


class HomogeneousParams(Params):
    speed: float = Field(1000.0, gt=0, description="training samples per second")
    latency: float = Field(0.05, ge=0, description="seconds per message")
    bandwidth_up: float = Field(1e6, gt=0, description="bytes per second")
    bandwidth_down: float = Field(1e7, gt=0, description="bytes per second")


@SYSTEMS.register("homogeneous", params=HomogeneousParams)
def homogeneous(params: HomogeneousParams, num_clients: int, rng: np.random.Generator) -> ClientSystems:
    """Every client has the same speed and link."""
    full = np.full(num_clients, 1.0)
    return ClientSystems(full * params.speed, full * params.latency, full * params.bandwidth_up,
                         full * params.bandwidth_down)


class LogNormalParams(HomogeneousParams):
    speed_sigma: float = Field(1.0, ge=0, le=50, description="log-space std of the speed around its median (at "
                                                          "most 50, beyond which draws overflow)")
    bandwidth_sigma: float = Field(1.0, ge=0, le=50, description="log-space std of both bandwidths (at most 50)")


@SYSTEMS.register("lognormal", params=LogNormalParams)
def lognormal(params: LogNormalParams, num_clients: int, rng: np.random.Generator) -> ClientSystems:
    """Speeds and bandwidths lognormal around the given medians (a common model of device heterogeneity)."""
    speed = params.speed * rng.lognormal(0.0, params.speed_sigma, num_clients)
    link = rng.lognormal(0.0, params.bandwidth_sigma, num_clients)
    return ClientSystems(speed, np.full(num_clients, params.latency), params.bandwidth_up * link,
                         params.bandwidth_down * link)
