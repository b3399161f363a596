"""FedFix and asynchronous FedAvg (Fraboni, Vidal, Kameni, Lorenzi, "A General Theory for Federated Optimization
with Asynchronous and Heterogeneous Clients Updates", JMLR 2023, arXiv 2206.10189) on the virtual clock.

Every client is always training (the paper's full participation). Server step n applies the changes of the
clients that returned in it, each from the (possibly stale) model it started from, to the current model:
theta <- theta + eta_g sum_i d_i (theta_i - theta^{rho_i(n)}). The schedules and weights follow the authors' code
(Accenture/Labs-Federated-Learning, branch asynchronous_FL: FL/clients_schedule.py `clients_time_schedule`,
FL/server.py `Server.clients_importances` and `aggregation`):
- `fedfix`: the server steps at fixed ticks n * tick; every client whose job arrived by then contributes, gets the
  new model at the tick and restarts then (early finishers idle until the tick; the others keep training on their
  stale model). A tick nobody arrived by takes no step (the authors' code counts it as one that leaves the model
  as it is; here staleness and the `rounds` budget count steps that change the model). Weights: unbiased
  d_i = ceil(tau_i / tick) p_i (a client returns about once every ceil(tau_i / tick) ticks); identical d_i = p_i
  (FedAvg's weights; the code defines FedFix with the unbiased weights only).
- `async_fedavg`: a server step at every arrival; the client restarts at once from the new model. Weights:
  identical d_i = 1 (the code's Async_identical, biased toward fast clients), unbiased
  d_i = (sum_j 1/tau_j) tau_i p_i (Async_weight).
tau_i is client i's expected job time (`ClientSystems.mean_job_seconds`), p_i its share of the server's weighting
of "delta" (samples: n_i / n; uniform: 1 / M).

The step goes through the server rule (`ProtocolBase.apply`), so server optimizers apply: the rule takes the
weighted mean of the step's deltas with weights w_i (n_i or 1), so each delta is scaled by
c_i = d_i (sum_step w_j) / w_i = (d_i / p_i) (sum_step w_j) / W (W: the weight of all clients), which makes the
mean sum_i d_i Delta_i. c_i is formed in exact fractions where d_i / p_i is rational, so with every client in a
step and ceil(tau_i / tick) = 1 it is exactly 1 and FedFix is synchronous FedAvg bit for bit.

FedFix jobs are numbered by the tick they start at, so (tick, client) keys a job's draws and, with a tick at least
the slowest job, tick n is synchronous round n with the same minibatches. Arrivals are not events: each job's
arrival time is kept and compared with the tick (within 1e-9 tick, for float error in sums of phase times), so a
job arriving exactly at a tick counts whatever the event order.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from fedsim.async_jobs import JobBook, RecentStaleness, job_sizes, scale_delta
from fedsim.clock import Clock, Event
from fedsim.errors import ScenarioError
from fedsim.protocol import SAMPLE_COUNT_BYTES, ProtocolBase
from fedsim.recording import Recorder
from fedsim.registry import Params
from fedsim.runtime import Job, JobResult
from fedsim.servers import PROTOCOLS
from fedsim.systems import JobPhases

if TYPE_CHECKING:
    from fedsim.scenario import Component, ScenarioSchema

Weights = Literal["unbiased", "identical"]
TICK_TOLERANCE = 1e-9
"""A job arriving within this fraction of a tick after the tick counts at it (float error in summed phases)."""
DEFAULT_TICK_FRACTION = 0.5


class AsyncFedAvgParams(Params):
    """How each returning client's change is weighted."""

    weights: Weights = Field("unbiased", description="unbiased: d_i proportional to the client's expected job "
                                                     "time, so the optimum is the p-weighted one; identical: the "
                                                     "paper's plain weights, biased toward fast clients")


class FedFixParams(AsyncFedAvgParams):
    """The tick, in seconds or as a fraction of the slowest client's expected job time (give at most one)."""

    tick: float | None = Field(None, gt=0, description="simulated seconds between server steps")
    tick_fraction: float | None = Field(None, gt=0, description="the tick as a fraction of the slowest client's "
                                                                "expected job time (FedFix-X; 0.5 when no tick "
                                                                "is given)")


def check_full_participation(params: Params, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Every client trains all the time: no smaller concurrency (the registry's meta refuses stragglers,
    clients going offline and dropouts)."""
    name = components["protocol"].name
    if spec.clients_per_round is not None and spec.clients_per_round != spec.num_clients:
        raise ScenarioError(f"clients_per_round: protocol {name!r} keeps every client training; leave it unset or "
                            f"set it to num_clients ({spec.num_clients})")


def check_fedfix(params: FedFixParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Full participation, and one way of giving the tick."""
    check_full_participation(params, spec, components)
    if params.tick is not None and params.tick_fraction is not None:
        raise ScenarioError("protocol.tick: give tick (seconds) or tick_fraction (of the slowest client's job "
                            "time), not both")


class FraboniBase(ProtocolBase):
    """What both schedules share: the expected job times, jobs in flight from published versions, the weighted
    server step, staleness figures and the checkpointed state."""

    def __init__(self, params: AsyncFedAvgParams, sim, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        self.sizes = job_sizes(sim, self.template)
        down = sim.downlink.payload_bytes(sim.server.broadcast(self.state))
        self.tau = np.array([sim.systems.mean_job_seconds(c, int(self.sizes.work[c]), down, self.sizes.bytes_up)
                             for c in range(sim.data.num_clients)])
        """Each client's expected job time tau_i (what the weights and FedFix's default tick use)."""
        self.kind = self.weighting["delta"]
        self.total = int(np.sum(sim.data.train_sizes)) if self.kind == "samples" else sim.data.num_clients
        """W: the weight of every client together (p_i = w_i / W)."""
        self.book = JobBook(sim.runtime)
        self.step = 0
        self.recent = RecentStaleness()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": self.step, "book": self.book.state_dict(),
                "recent": self.recent.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step = state["step"]
        self.recent.load_state_dict(state["recent"])
        self.book.load_state_dict(state["book"])

    def weight(self, result: JobResult) -> int:
        """w_i: the client's weight in the server rule's mean (its samples, or 1)."""
        return int(result.num_samples) if self.kind == "samples" else 1

    def gain(self, result: JobResult) -> Fraction | float:
        """d_i / p_i for this result's client."""
        raise NotImplementedError

    def publish(self) -> None:
        """Make the current model the version new jobs start from (one downlink encoding per version)."""
        message, down = self.broadcast(self.step)
        self.book.publish(self.step, message, down, self.state["params"])

    def dispatch(self, job_id: int, client: int, now: float) -> tuple[Job, float, JobPhases]:
        """Start a job of `client` from the current version at `now`; its duration is known now, its result is
        computed on demand. Returns the job, its start and its phases."""
        job = Job(job_id, client, int(self.sizes.steps[client]), version=self.step)
        down = self.book.dispatch(job)
        self.traffic.down += down
        return job, now, self.sim.systems.job_phases(job_id, client, int(self.sizes.work[client]), down,
                                                     self.upload_bytes(self.sizes, client))

    def receive(self, job: Job, start: float, phases: JobPhases) -> JobResult:
        """An arrived job's result: uploaded, its client state committed, logged on the timeline as used."""
        result = self.book.result(job)
        self.traffic.up += result.message_bytes + SAMPLE_COUNT_BYTES
        self.commit(result)
        staleness = self.step - job.version
        self.recent.add(staleness)
        self.recorder.timeline.job(job, start, phases, "used", staleness)
        return result

    def server_step(self, results: list[JobResult], now: float, clock: Clock) -> bool:
        """Apply sum_i d_i Delta_i as a server step at `now`, evaluate when due; returns whether the budget is
        spent (the clock is then stopped)."""
        step_weight = sum(self.weight(r) for r in results)
        scaled = [scale_delta(r, float(self.gain(r) * Fraction(step_weight, self.total))) for r in results]
        self.apply(scaled, self.step, now)
        self.step += 1
        self.server_steps = self.step
        row = self.evaluate_if_due(self.step, now)
        self.recorder.progress.advance(self.step, row)
        if self.budget_spent(self.step, now):
            clock.stop()
            return True
        return False

    def extra_metrics(self) -> dict[str, float]:
        """Mean staleness of the jobs used since the previous row (0 where there are none) and the server steps."""
        return {"staleness": self.recent.take_mean(), "server_steps": self.step}


@PROTOCOLS.register("fedfix", params=FedFixParams, carries=("delta",), check=check_fedfix)
class FedFix(FraboniBase):
    """Server steps at ticks n * tick with the clients arrived by then (`tick` events carrying n); jobs are
    numbered by the tick they start at."""

    def __init__(self, params: FedFixParams, sim, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        fraction = params.tick_fraction if params.tick_fraction is not None else DEFAULT_TICK_FRACTION
        self.tick = params.tick if params.tick is not None else fraction * float(np.max(self.tau))
        self.periods = np.ceil(self.tau / self.tick - TICK_TOLERANCE).astype(np.int64)
        """ceil(tau_i / tick): the ticks a client's job spans (within the arrival tolerance)."""
        self.flight: dict[int, tuple[Job, float, JobPhases]] = {}
        """Per client, its job in flight: the job, its start and its phases."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "flight": self.flight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.flight = state["flight"]

    def gain(self, result: JobResult) -> Fraction | float:
        return Fraction(int(self.periods[result.client])) if self.params.weights == "unbiased" else Fraction(1)

    def start(self, clock: Clock) -> None:
        clock.schedule(0.0, "start")

    def handle(self, event: Event, clock: Clock) -> None:
        if event.kind == "start":
            self.evaluate_if_due(0, 0.0)
            self._restart(range(self.sim.data.num_clients), 0, clock)
        elif event.kind == "tick":
            self._tick(event.payload["tick"], clock)
        else:
            raise ValueError(f"fedfix got an unknown event {event.kind!r}")

    def _arrived(self, client: int, n: int) -> bool:
        job, start, phases = self.flight[client]
        return start + phases.total <= n * self.tick + TICK_TOLERANCE * self.tick

    def _tick(self, n: int, clock: Clock) -> None:
        arrived = [c for c in sorted(self.flight) if self._arrived(c, n)]
        if arrived:
            now = n * self.tick
            results = [self.receive(*self.flight.pop(c)) for c in arrived]
            if self.server_step(results, now, clock):
                return
            self._restart(arrived, n, clock)
        else:
            self._schedule_next(n, clock)

    def _restart(self, clients: Any, n: int, clock: Clock) -> None:
        """Publish the current model and start `clients`' next jobs at tick n, then wait for the next tick."""
        self.publish()
        for client in clients:
            self.flight[client] = self.dispatch(n, client, n * self.tick)
        self._schedule_next(n, clock)

    def _schedule_next(self, n: int, clock: Clock) -> None:
        """Schedule the first tick after n that someone may have arrived by (ticks before it would be empty)."""
        first = min(start + phases.total for _, start, phases in self.flight.values())
        m = max(n + 1, math.ceil(first / self.tick - TICK_TOLERANCE))
        clock.schedule(max(0.0, m * self.tick - clock.now), "tick", tick=m)


@PROTOCOLS.register("async_fedavg", params=AsyncFedAvgParams, carries=("delta",), check=check_full_participation)
class AsyncFedAvg(FraboniBase):
    """A server step at every arrival (`arrival` events carrying the job, its start and phases); jobs are numbered
    by dispatch."""

    def __init__(self, params: AsyncFedAvgParams, sim, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        self.dispatched = 0
        self.rates = float(np.sum(1.0 / self.tau))
        """sum_j 1 / tau_j."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "dispatched": self.dispatched}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.dispatched = state["dispatched"]

    def gain(self, result: JobResult) -> Fraction | float:
        if self.params.weights == "unbiased":
            return self.rates * float(self.tau[result.client])
        return Fraction(self.total, self.weight(result))

    def start(self, clock: Clock) -> None:
        clock.schedule(0.0, "start")

    def handle(self, event: Event, clock: Clock) -> None:
        if event.kind == "start":
            self.evaluate_if_due(0, clock.now)
            self.publish()
            for client in range(self.sim.data.num_clients):
                self._dispatch(client, clock)
        elif event.kind == "arrival":
            payload = event.payload
            result = self.receive(payload["job"], payload["start"], payload["phases"])
            if self.server_step([result], clock.now, clock):
                return
            self.publish()
            self._dispatch(result.client, clock)
        else:
            raise ValueError(f"async_fedavg got an unknown event {event.kind!r}")

    def _dispatch(self, client: int, clock: Clock) -> None:
        job, start, phases = self.dispatch(self.dispatched, client, clock.now)
        self.dispatched += 1
        clock.schedule(phases.total, "arrival", job=job, start=start, phases=phases)
