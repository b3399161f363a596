"""What asynchronous protocols (FedAsync, FedBuff, FedFix, asynchronous FedAvg) share: jobs dispatched from the
model version current at dispatch, run batched when the first of them is needed, the clients not training, and
(`AsyncProtocol`) keeping a number of jobs in flight.

A job's start model is fixed when it is dispatched, so its result does not depend on when it is computed.
Dispatched jobs wait with their start message; the first arrival of a job not yet run runs every waiting job in
one `run_jobs` call (per-job starts of different versions; jobs of one version share the message object), which
the vectorized runtime stacks on its vmap axis. A runtime on real devices (`FlowerRuntime`: `submit`, `take`)
gets each job when it is dispatched instead, and hands its result over when it has arrived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedsim.clock import Clock, Event
from fedsim.codecs import build_codec
from fedsim.params import Pytree, tree_map
from fedsim.protocol import SAMPLE_COUNT_BYTES, ProtocolBase
from fedsim.runtime import Job, JobResult
from fedsim.sampling import full_steps, samples_processed
from fedsim.seeding import Stream, numpy_rng


@dataclass(frozen=True)
class JobSizes:
    """Per client: local steps and work (sample-gradient evaluations) of a full job; bytes of one upload (a
    sender's first upload may differ: EF21 and EControl send it uncompressed)."""

    steps: np.ndarray
    work: np.ndarray
    bytes_up: int
    bytes_first: int
    """Bytes of a client's first upload (`ProtocolBase.upload_bytes` picks between the two)."""


def job_sizes(sim: Any, template: Pytree) -> JobSizes:
    """A full job's steps and work per client, and the uplink payload's exact bytes (with the sample count)."""
    hp = sim.rule.hp
    sizes = np.asarray(sim.data.train_sizes)
    steps = full_steps(sizes, hp.local_epochs, hp.batch_size, hp.local_steps)
    work = samples_processed(steps, sizes, hp.batch_size) * sim.rule.step_cost
    uplink = build_codec(sim.scenario.spec.compression.uplink, "compression.uplink")
    return JobSizes(steps, work, uplink.payload_bytes(template) + SAMPLE_COUNT_BYTES,
                    uplink.payload_bytes(template, first=True) + SAMPLE_COUNT_BYTES)


class JobBook:
    """Jobs in flight: the model versions they start from, jobs dispatched but not yet run, and results computed
    but not yet arrived."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.submits = hasattr(runtime, "submit")
        """Whether jobs go to real devices as they are dispatched."""
        self.versions: dict[int, tuple[Pytree, int, Pytree]] = {}
        """Per version jobs in flight started from: the message they start from (the broadcast as clients decode
        it), its bytes on a link, and the server's model then (x_tau, what a client's change is added to)."""
        self.in_flight: dict[int, int] = {}
        """Jobs in flight per start version: a version is dropped when none are left."""
        self.pending: list[tuple[Job, Pytree]] = []
        self.done: dict[tuple[int, int], JobResult] = {}
        """Results computed and not yet taken, by (job id, client): job ids are unique per client only (FedFix
        numbers jobs by the tick they start at)."""
        self.latest = -1
        """The version new jobs start from (kept while no job uses it)."""

    def publish(self, version: int, message: Pytree, down: int, params: Pytree) -> None:
        """Make `message` (its bytes `down`, the server model `params`) what new jobs start from, as `version`."""
        previous, self.latest = self.latest, version
        self._forget_if_unused(previous)
        self.versions[version] = (message, down, params)
        self.in_flight[version] = 0

    def dispatch(self, job: Job) -> int:
        """Queue `job` from its version's message; returns the download's bytes."""
        message, down, _ = self.versions[job.version]
        self.in_flight[job.version] += 1
        if self.submits:
            self.runtime.submit(job, message)
        else:
            self.pending.append((job, message))
        return down

    def result(self, job: Job) -> JobResult:
        """`job`'s result, running every waiting job in one batched call if it has not run yet; the job leaves the
        book (its version is forgotten once no job in flight started from it)."""
        key = (job.id, job.client)
        if self.submits:
            self.done[key] = self.runtime.take(job)
        elif key not in self.done:
            jobs, starts = zip(*self.pending, strict=True)
            self.done.update(((r.job.id, r.client), r) for r in self.runtime.run_jobs(list(jobs), list(starts)))
            self.pending = []
        result = self.done.pop(key)
        self.in_flight[job.version] -= 1
        self._forget_if_unused(job.version)
        return result

    def download_bytes(self, version: int) -> int:
        """The bytes of `version`'s message on one link."""
        return self.versions[version][1]

    def start_params(self, version: int) -> Pytree:
        """The server's model when `version` was published (x_tau)."""
        return self.versions[version][2]

    def _forget_if_unused(self, version: int) -> None:
        if version != self.latest and self.in_flight.get(version) == 0:
            del self.in_flight[version], self.versions[version]

    def state_dict(self) -> dict[str, Any]:
        return {"versions": self.versions, "in_flight": self.in_flight, "pending": self.pending, "done": self.done,
                "latest": self.latest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.versions, self.in_flight = state["versions"], state["in_flight"]
        self.pending, self.done, self.latest = state["pending"], state["done"], state["latest"]


class RecentStaleness:
    """The staleness of the updates used since the previous metrics row, whose mean goes into the next row (a
    protocol's `extra_metrics` is asked only when a row is recorded)."""

    def __init__(self) -> None:
        self.total, self.count = 0, 0

    def add(self, staleness: int) -> None:
        self.total += staleness
        self.count += 1

    def take_mean(self) -> float:
        """The mean since the previous row (0 where there is none), starting a new window."""
        mean = self.total / self.count if self.count else 0.0
        self.total, self.count = 0, 0
        return mean

    def state_dict(self) -> list[int]:
        return [self.total, self.count]

    def load_state_dict(self, state: list[int]) -> None:
        self.total, self.count = state


def scale_delta(result: JobResult, factor: float) -> JobResult:
    """The result with its change ("delta") times `factor` (as it is at 1, and where another MPI rank holds it)."""
    if factor == 1.0 or not result.here:
        return result
    delta = tree_map(lambda d: torch.mul(d, factor), result.message["delta"])
    return replace(result, message={**result.message, "delta": delta})


class IdleClients:
    """Clients not training, drawn uniformly in O(1): a swap-remove array, its order a function of the history."""

    def __init__(self, num_clients: int, busy: np.ndarray) -> None:
        self.clients = np.setdiff1d(np.arange(num_clients), busy)
        self.clients = np.concatenate([self.clients, np.zeros(len(busy), dtype=self.clients.dtype)])
        self.count = num_clients - len(busy)

    def free(self, client: int) -> None:
        """Put a client whose job arrived back among the idle."""
        self.clients[self.count] = client
        self.count += 1

    def draw(self, rng: np.random.Generator) -> int:
        """Remove and return a uniformly drawn idle client."""
        i = int(rng.integers(self.count))
        client = int(self.clients[i])
        self.count -= 1
        self.clients[i] = self.clients[self.count]
        return client

    def state_dict(self) -> list[Any]:
        return [self.clients, self.count]

    def load_state_dict(self, state: list[Any]) -> None:
        self.clients, self.count = state


class AsyncProtocol(ProtocolBase):
    """A protocol keeping C = `clients_per_round` jobs in flight (FedAsync, FedBuff): C clients drawn at time 0,
    and, whenever a job ends (its result arrives, or its client drops out), a client drawn uniformly from the idle
    ones (the one just freed included) starts a job from the current model at once. Jobs are numbered by dispatch.

    With an availability model in the systems profile the draw prefers clients available now (up to
    `AVAILABLE_TRIES` uniform draws; failing that, the one that comes online first, whose job waits for it), and a
    job whose client drops out (`ClientSystems.drop_time`) is never run: it ends with a `dropout` event, logged as
    dropped. Subclasses implement `_arrive(event, clock)` (the result's server step, ending with `_refill`)."""

    AVAILABLE_TRIES = 16

    def __init__(self, params: Any, sim: Any, recorder: Any) -> None:
        super().__init__(params, sim, recorder)
        self.sizes = job_sizes(sim, self.template)
        self.step = 0
        self.dispatched = 0
        self.book = JobBook(sim.runtime)
        num_clients = sim.data.num_clients
        self.first = numpy_rng(self.spec.seed, Stream.PROTOCOL, 0).choice(num_clients, self.spec.clients_per_round,
                                                                          replace=False)
        self.idle = IdleClients(num_clients, self.first)

    def start(self, clock: Clock) -> None:
        clock.schedule(0.0, "start")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": self.step, "dispatched": self.dispatched,
                "book": self.book.state_dict(), "idle": self.idle.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step, self.dispatched = state["step"], state["dispatched"]
        self.book.load_state_dict(state["book"])
        self.idle.load_state_dict(state["idle"])

    def handle(self, event: Event, clock: Clock) -> None:
        if event.kind == "start":
            self.evaluate_if_due(0, clock.now)
            self._publish()
            for client in self.first.tolist():
                self._dispatch(int(client), clock)
        elif event.kind == "arrival":
            self._arrive(event, clock)
        elif event.kind == "dropout":
            self.recorder.timeline.job(event.payload["job"], event.payload["start"], event.payload["phases"],
                                       "dropped")
            self._refill(event.payload["job"], clock)
        else:
            raise ValueError(f"{type(self).__name__} got an unknown event {event.kind!r}")

    def _arrive(self, event: Event, clock: Clock) -> None:
        raise NotImplementedError

    def _publish(self) -> None:
        """Make the current model the version new jobs start from (one downlink encoding per version)."""
        message, down = self.broadcast(self.step)
        self.book.publish(self.step, message, down, self.state["params"])

    def _dispatch(self, client: int, clock: Clock) -> None:
        """Start a job from the current version once its client is available; its duration is known now, its
        result is computed on demand (or never, when its client drops out first)."""
        systems = self.sim.systems
        job = Job(self.dispatched, client, int(self.sizes.steps[client]), version=self.step)
        self.dispatched += 1
        start = clock.now if systems.always_available else systems.available_from(client, clock.now)
        if not math.isfinite(start):
            return  # the client never comes online: its slot stays empty
        down = self.book.download_bytes(self.step)
        self.traffic.down += down
        phases = systems.job_phases(job.id, client, int(self.sizes.work[client]), down,
                                    self.upload_bytes(self.sizes, client))
        drop = systems.drop_time(job.id, client, start, phases)
        if drop is not None:
            clock.schedule(start - clock.now + drop, "dropout", job=job, start=start, phases=phases.until(drop))
            return
        self.book.dispatch(job)
        clock.schedule(start - clock.now + phases.total, "arrival", job=job, start=start, phases=phases)

    def _refill(self, job: Job, clock: Clock) -> None:
        """Free the ended job's client and start a job for a drawn idle client."""
        self.idle.free(job.client)
        self._dispatch(self._draw(clock.now), clock)

    def _draw(self, now: float) -> int:
        """A uniformly drawn idle client, preferring one available at `now` (keyed by the dispatch count)."""
        rng = numpy_rng(self.spec.seed, Stream.PROTOCOL, self.dispatched)
        systems = self.sim.systems
        if systems.always_available:
            return self.idle.draw(rng)
        tried = [self.idle.draw(rng) for _ in range(min(self.AVAILABLE_TRIES, self.idle.count))]
        times = systems.available_times(tried, now)
        chosen = int(np.argmin(times))
        for i, client in enumerate(tried):
            if i != chosen:
                self.idle.free(client)
        return tried[chosen]
