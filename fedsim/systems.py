"""System heterogeneity: each client's compute speed and link, and how they turn work and bytes into seconds.

Profiles are registry entries `fn(params, num_clients, rng) -> ClientSystems`; the clock charges a job
`latency + bytes_down / bandwidth_down` to receive the model, `work / speed * factor` to train (work: samples
processed times the rule's gradient evaluations per step; factor: 1, or drawn per job with mean 1 from the profile's
`compute` distribution, keyed by (seed, job, client) so every runtime and protocol order sees the same draws), and
`latency + bytes_up / bandwidth_up` to send its message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from fedsim.errors import ScenarioError
from fedsim.registry import Params, Registry
from fedsim.seeding import Stream, numpy_rng

Compute = Literal["constant", "exponential", "shifted_exponential", "half_normal", "lognormal", "uniform"]


@dataclass(frozen=True)
class ComputeDraw:
    """A job's compute-time factor, mean 1: constant; Exp(1); shift + (1 - shift) Exp(1); |N(0, 1)| sqrt(pi / 2);
    lognormal with log-std `spread` (mean 1); uniform on [1 - spread, 1 + spread]."""

    distribution: Compute
    spread: float
    seed: int

    def __call__(self, job: int, client: int) -> float:
        if self.distribution == "constant":
            return 1.0
        rng = numpy_rng(self.seed, Stream.SYSTEMS, job, client)
        if self.distribution == "exponential":
            return float(rng.exponential())
        if self.distribution == "shifted_exponential":
            return self.spread + (1.0 - self.spread) * float(rng.exponential())
        if self.distribution == "half_normal":
            return abs(float(rng.standard_normal())) * math.sqrt(math.pi / 2)
        if self.distribution == "lognormal":
            return float(rng.lognormal(-self.spread**2 / 2, self.spread))
        return float(rng.uniform(1.0 - self.spread, 1.0 + self.spread))


@dataclass(frozen=True)
class JobPhases:
    """A job's simulated seconds: receiving the model, training, sending its message."""

    download: float
    compute: float
    upload: float

    @property
    def total(self) -> float:
        return self.download + self.compute + self.upload


@dataclass(frozen=True)
class ClientSystems:
    """Per-client arrays: speed (sample-gradient evaluations per second), latency (s), bandwidths (bytes per second)."""

    speed: np.ndarray
    latency: np.ndarray
    bandwidth_up: np.ndarray
    bandwidth_down: np.ndarray
    compute: ComputeDraw = ComputeDraw("constant", 0.0, 0)

    def job_phases(self, job: int, client: int, work: int, bytes_down: int, bytes_up: int) -> JobPhases:
        """Simulated seconds of job `job` of `client`: download, local training (`work` sample-gradient
        evaluations, times the job's compute factor), upload."""
        down = self.latency[client] + bytes_down / self.bandwidth_down[client]
        up = self.latency[client] + bytes_up / self.bandwidth_up[client]
        return JobPhases(float(down), float(work / self.speed[client] * self.compute(job, client)), float(up))

    def job_seconds(self, job: int, client: int, work: int, bytes_down: int, bytes_up: int) -> float:
        """Simulated duration of job `job` of `client`, its three phases together."""
        return self.job_phases(job, client, work, bytes_down, bytes_up).total

    def mean_job_seconds(self, client: int, work: int, bytes_down: int, bytes_up: int) -> float:
        """A job's expected duration (the compute factor's mean is 1): what FedFix's weights and ticks use."""
        down = self.latency[client] + bytes_down / self.bandwidth_down[client]
        up = self.latency[client] + bytes_up / self.bandwidth_up[client]
        return float(down + work / self.speed[client] + up)


SYSTEMS: Registry = Registry("systems profile")


class HomogeneousParams(Params):
    speed: float = Field(1000.0, gt=0, description="training samples per second")
    latency: float = Field(0.05, ge=0, description="seconds per message")
    bandwidth_up: float = Field(1e6, gt=0, description="bytes per second")
    bandwidth_down: float = Field(1e7, gt=0, description="bytes per second")
    compute: Compute = Field("constant", description="each job's compute time is work / speed times a factor of "
                                                     "mean 1 drawn per job from this distribution")
    compute_spread: float = Field(0.5, ge=0, le=1, description="shifted_exponential: the shift; lognormal: the "
                                                               "log-space std; uniform: the half-width")

    def compute_draw(self, rng: np.random.Generator) -> ComputeDraw:
        """The per-job factor, keyed by a seed drawn once from the profile's stream."""
        return ComputeDraw(self.compute, self.compute_spread, int(rng.integers(2**62)))


@SYSTEMS.register("homogeneous", params=HomogeneousParams)
def homogeneous(params: HomogeneousParams, num_clients: int, rng: np.random.Generator) -> ClientSystems:
    """Every client has the same speed and link."""
    full = np.full(num_clients, 1.0)
    return ClientSystems(full * params.speed, full * params.latency, full * params.bandwidth_up,
                         full * params.bandwidth_down, params.compute_draw(rng))


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
                         params.bandwidth_down * link, params.compute_draw(rng))


class TiersParams(HomogeneousParams):
    multipliers: list[float] = Field([1.3, 1.0, 0.7], min_length=1, description="speed multiplier of each tier")
    fractions: list[float] = Field([0.25, 0.5, 0.25], min_length=1, description="share of clients in each tier")


@SYSTEMS.register("tiers", params=TiersParams)
def tiers(params: TiersParams, num_clients: int, rng: np.random.Generator) -> ClientSystems:
    """Speed groups (FedAST's {1.3, 1.0, 0.7} at 25/50/25% by default): round(fraction N) clients per tier, the
    last tier taking the rest, assigned to clients in a random order drawn from the profile's stream."""
    if len(params.multipliers) != len(params.fractions):
        raise ScenarioError(f"systems.fractions: {len(params.fractions)} fractions for {len(params.multipliers)} "
                            f"multipliers; give one per tier")
    if any(m <= 0 for m in params.multipliers) or any(f < 0 for f in params.fractions) or \
            not math.isclose(sum(params.fractions), 1.0, abs_tol=1e-9):
        raise ScenarioError("systems.fractions: multipliers must be > 0 and fractions >= 0 summing to 1, got "
                            f"{params.multipliers} and {params.fractions}")
    counts = [round(f * num_clients) for f in params.fractions[:-1]]
    counts.append(num_clients - sum(counts))
    per_client = np.repeat(params.multipliers, np.maximum(counts, 0))[:num_clients]
    full = np.full(num_clients, 1.0)
    return ClientSystems(params.speed * per_client[rng.permutation(num_clients)], full * params.latency,
                         full * params.bandwidth_up, full * params.bandwidth_down, params.compute_draw(rng))


class LinearParams(HomogeneousParams):
    spread: float = Field(80.0, ge=0, lt=100, description="X of FedFix's F-X: the fastest client's job time is "
                                                          "1 - X/100 of the slowest's")


@SYSTEMS.register("linear", params=LinearParams)
def linear(params: LinearParams, num_clients: int, rng: np.random.Generator) -> ClientSystems:
    """Fraboni et al.'s F-X speeds (Accenture/Labs-Federated-Learning, get_tau_i): client i's job time is
    tau_i = 1 - i (X/100) / (N - 1) of client 0's, so speed_i = speed / tau_i (client 0 slowest)."""
    tau = 1.0 - np.arange(num_clients) * (params.spread / 100.0) / max(1, num_clients - 1)
    full = np.full(num_clients, 1.0)
    return ClientSystems(params.speed / tau, full * params.latency, full * params.bandwidth_up,
                         full * params.bandwidth_down, params.compute_draw(rng))
