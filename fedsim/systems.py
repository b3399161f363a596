"""System heterogeneity: each client's compute speed and link, its availability, and how they turn work and bytes
into seconds.

Profiles are registry entries `fn(params, num_clients, rng) -> ClientSystems`; the clock charges a job
`latency + bytes_down / bandwidth_down` to receive the model, its compute time to train (`work / speed * factor`,
work: samples processed times the rule's gradient evaluations per step; factor: 1, or drawn per job with mean 1 from
the profile's `compute` distribution; or a value replayed from a trace), and `latency + bytes_up / bandwidth_up` to
send its message. Every profile also takes `availability` (always; on/off windows; available with probability p per
period) and `dropout` (the probability a job is abandoned midway); a job whose client stops being available before
it ends is abandoned then. Every draw is keyed by (seed, job, client) or (seed, period, client), so every runtime
and protocol order sees the same ones.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from pydantic import Field

from fedsim.availability import AlwaysAvailable, Availability, AvailabilityParams, Dropout
from fedsim.errors import ScenarioError
from fedsim.registry import Params, Registry
from fedsim.seeding import Stream, numpy_rng
from fedsim.systems_traces import ComputeModel, TraceCompute, read_trace

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

    def until(self, seconds: float) -> JobPhases:
        """The part of these phases within their first `seconds` (a job cut short by a dropout or deadline)."""
        download = min(self.download, seconds)
        compute = min(self.compute, seconds - download)
        return JobPhases(download, compute, min(self.upload, seconds - download - compute))


@dataclass(frozen=True)
class SpeedCompute:
    """Compute time from a per-client speed (sample-gradient evaluations per second): work / speed times the job's
    compute factor."""

    speed: np.ndarray
    draw: ComputeDraw = ComputeDraw("constant", 0.0, 0)

    def seconds(self, job: int, client: int, work: int) -> float:
        return float(work / self.speed[client] * self.draw(job, client))

    def mean_seconds(self, client: int, work: int) -> float:
        """Work over speed: the compute factor's mean is 1."""
        return float(work / self.speed[client])


@dataclass(frozen=True)
class ClientSystems:
    """Per-client compute model and links (latency in s, bandwidths in bytes per second), availability, dropouts."""

    compute: ComputeModel
    latency: np.ndarray
    bandwidth_up: np.ndarray
    bandwidth_down: np.ndarray
    availability: Availability = AlwaysAvailable()
    dropout: Dropout = Dropout(0.0, 0)

    @property
    def speed(self) -> np.ndarray:
        """Per-client speeds of speed-based profiles (sample-gradient evaluations per second)."""
        return self.compute.speed

    @property
    def always_available(self) -> bool:
        """Whether every client is available at every moment (protocols then skip availability lookups)."""
        return isinstance(self.availability, AlwaysAvailable)

    def _transfers(self, client: int, bytes_down: int, bytes_up: int) -> tuple[float, float]:
        down = self.latency[client] + bytes_down / self.bandwidth_down[client]
        up = self.latency[client] + bytes_up / self.bandwidth_up[client]
        return float(down), float(up)

    def job_phases(self, job: int, client: int, work: int, bytes_down: int, bytes_up: int) -> JobPhases:
        """Simulated seconds of job `job` of `client`: download, local training (`work` sample-gradient
        evaluations, timed by the profile's compute model), upload."""
        down, up = self._transfers(client, bytes_down, bytes_up)
        return JobPhases(down, self.compute.seconds(job, client, work), up)

    def job_seconds(self, job: int, client: int, work: int, bytes_down: int, bytes_up: int) -> float:
        """Simulated duration of job `job` of `client`, its three phases together."""
        return self.job_phases(job, client, work, bytes_down, bytes_up).total

    def jobs_seconds(self, jobs: ArrayLike, clients: ArrayLike, work: ArrayLike, bytes_down: ArrayLike,
                     bytes_up: ArrayLike) -> np.ndarray:
        """`job_seconds` of many jobs at once (integer arguments broadcast against each other), the same floats as
        an array: one array operation per phase where compute time is work / speed with a constant factor (a
        gossip round over many nodes), else a call per job for the compute phase."""
        jobs, clients, work, down, up = np.broadcast_arrays(
            *(np.asarray(a, dtype=np.int64) for a in (jobs, clients, work, bytes_down, bytes_up)))
        compute = self.compute
        if isinstance(compute, SpeedCompute) and compute.draw.distribution == "constant":
            seconds = work / compute.speed[clients]
        else:
            seconds = np.array([compute.seconds(j, c, w) for j, c, w in
                                zip(jobs.tolist(), clients.tolist(), work.tolist(), strict=True)], dtype=np.float64)
        latency = self.latency[clients]
        return (latency + down / self.bandwidth_down[clients]) + seconds + (latency + up / self.bandwidth_up[clients])

    def mean_job_seconds(self, client: int, work: int, bytes_down: int, bytes_up: int) -> float:
        """A job's expected duration (the compute factor's mean is 1; a trace's mean over the client's rows): what
        FedFix's weights and ticks use."""
        down, up = self._transfers(client, bytes_down, bytes_up)
        return float(down + self.compute.mean_seconds(client, work) + up)

    def available_mask(self, clients: np.ndarray | Sequence[int], t: float) -> np.ndarray:
        """Which of `clients` are available at simulated time t (a bool array)."""
        return self.availability.mask(np.asarray(clients, dtype=np.int64), t)

    def available_times(self, clients: np.ndarray | Sequence[int], t: float) -> np.ndarray:
        """For each of `clients`, the earliest time >= t it is available (t when it is now; math.inf: never)."""
        return self.availability.times(np.asarray(clients, dtype=np.int64), t)

    def available_from(self, client: int, t: float) -> float:
        """The earliest time >= t `client` is available: t when it is now, math.inf when never."""
        return float(self.available_times([client], t)[0])

    def drop_time(self, job: int, client: int, start: float, phases: JobPhases) -> float | None:
        """Seconds after `start` at which job `job` of `client` (lasting `phases`) is abandoned, or None when it
        completes: the earlier of its keyed dropout draw and the moment its client stops being available (0 when it
        is not available at `start`; a job ending exactly as its window closes completes)."""
        drawn = self.dropout.time(job, client, phases.total)
        offline = self.availability.offline_within(client, start, start + phases.total)
        found = [d for d in (drawn, None if offline is None else offline - start) if d is not None]
        return min(found) if found else None


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
    availability: AvailabilityParams = Field(AvailabilityParams(), description="when clients can take and keep jobs")
    dropout: float = Field(0.0, ge=0, lt=1, description="probability a job is abandoned, at a moment uniform over "
                                                        "its duration; drawn per (job, client)")

    def compute_draw(self, rng: np.random.Generator) -> ComputeDraw:
        """The per-job factor, keyed by a seed drawn once from the profile's stream."""
        return ComputeDraw(self.compute, self.compute_spread, int(rng.integers(2**62)))

    def client_systems(self, compute: ComputeModel, latency: np.ndarray, bandwidth_up: np.ndarray,
                       bandwidth_down: np.ndarray, rng: np.random.Generator) -> ClientSystems:
        """Add dropouts and availability, drawing their seeds after the profile's other draws (so they leave the
        speeds and compute factors of a seed as they were without them)."""
        dropout = Dropout(self.dropout, int(rng.integers(2**62)))
        return ClientSystems(compute, latency, bandwidth_up, bandwidth_down,
                             self.availability.build(len(latency), rng), dropout)


@SYSTEMS.register("homogeneous", params=HomogeneousParams)
def homogeneous(params: HomogeneousParams, num_clients: int, rng: np.random.Generator) -> ClientSystems:
    """Every client has the same speed and link."""
    full = np.full(num_clients, 1.0)
    compute = SpeedCompute(full * params.speed, params.compute_draw(rng))
    return params.client_systems(compute, full * params.latency, full * params.bandwidth_up,
                                 full * params.bandwidth_down, rng)


class LogNormalParams(HomogeneousParams):
    speed_sigma: float = Field(1.0, ge=0, le=50, description="log-space std of the speed around its median (at "
                                                          "most 50, beyond which draws overflow)")
    bandwidth_sigma: float = Field(1.0, ge=0, le=50, description="log-space std of both bandwidths (at most 50)")


@SYSTEMS.register("lognormal", params=LogNormalParams)
def lognormal(params: LogNormalParams, num_clients: int, rng: np.random.Generator) -> ClientSystems:
    """Speeds and bandwidths lognormal around the given medians (a common model of device heterogeneity)."""
    speed = params.speed * rng.lognormal(0.0, params.speed_sigma, num_clients)
    link = rng.lognormal(0.0, params.bandwidth_sigma, num_clients)
    compute = SpeedCompute(speed, params.compute_draw(rng))
    return params.client_systems(compute, np.full(num_clients, params.latency), params.bandwidth_up * link,
                                 params.bandwidth_down * link, rng)


class TiersParams(HomogeneousParams):
    multipliers: list[float] = Field([1 / 1.3, 1.0, 1 / 0.7], min_length=1,
                                     description="speed multiplier of each tier (FedAST's delay groups 1.3, 1.0, "
                                                 "0.7 by default: the slow quarter's jobs take 1.3 times as long)")
    fractions: list[float] = Field([0.25, 0.5, 0.25], min_length=1, description="share of clients in each tier")


@SYSTEMS.register("tiers", params=TiersParams)
def tiers(params: TiersParams, num_clients: int, rng: np.random.Generator) -> ClientSystems:
    """Speed groups (by default FedAST's delay groups: job times x1.3, x1.0, x0.7 for 25/50/25% of the clients, as
    its code's `createClientDelays` multiplies delays): round(fraction N) clients per tier, the last tier taking
    the rest, assigned to clients in a random order drawn from the profile's stream."""
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
    compute = SpeedCompute(params.speed * per_client[rng.permutation(num_clients)], params.compute_draw(rng))
    return params.client_systems(compute, full * params.latency, full * params.bandwidth_up,
                                 full * params.bandwidth_down, rng)


class LinearParams(HomogeneousParams):
    spread: float = Field(80.0, ge=0, lt=100, description="X of FedFix's F-X: the fastest client's job time is "
                                                          "1 - X/100 of the slowest's")


@SYSTEMS.register("linear", params=LinearParams)
def linear(params: LinearParams, num_clients: int, rng: np.random.Generator) -> ClientSystems:
    """Fraboni et al.'s F-X speeds (Accenture/Labs-Federated-Learning, get_tau_i): client i's job time is
    tau_i = 1 - i (X/100) / (N - 1) of client 0's, so speed_i = speed / tau_i (client 0 slowest)."""
    tau = 1.0 - np.arange(num_clients) * (params.spread / 100.0) / max(1, num_clients - 1)
    full = np.full(num_clients, 1.0)
    return params.client_systems(SpeedCompute(params.speed / tau, params.compute_draw(rng)), full * params.latency,
                                 full * params.bandwidth_up, full * params.bandwidth_down, rng)


class TraceParams(HomogeneousParams):
    path: str = Field(min_length=1, description="CSV file with header client,duration (seconds of a job's local "
                                                "training) or client,samples_per_second")
    missing: Literal["error", "speed"] = Field("error", description="clients without a row: an error, or timed "
                                                                    "by speed (and compute) as in homogeneous")


def check_trace(params: TraceParams, spec: Any, components: Any) -> None:
    """Read the trace when the scenario is checked, so a bad file is refused before anything is built."""
    read_trace(params.path, spec.num_clients, params.missing == "speed")


@SYSTEMS.register("trace", params=TraceParams, check=check_trace)
def trace(params: TraceParams, num_clients: int, rng: np.random.Generator) -> ClientSystems:
    """Compute times replayed from a CSV trace of (client, duration) or (client, samples/s) rows: each job draws
    one of its client's rows; links as in homogeneous."""
    table = read_trace(params.path, num_clients, params.missing == "speed")
    full = np.full(num_clients, 1.0)
    draw = params.compute_draw(rng)
    compute = TraceCompute(table, draw.seed, SpeedCompute(full * params.speed, draw))
    return params.client_systems(compute, full * params.latency, full * params.bandwidth_up,
                                 full * params.bandwidth_down, rng)
