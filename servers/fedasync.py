"""FedAsync (Xie, Koyejo, Gupta 2019, "Asynchronous Federated Optimization", arXiv 1903.03934, Algorithm 1) on the
virtual clock: `clients_per_round` clients train at once; each arrival is one server update
x_t = (1 - alpha_t) x_{t-1} + alpha_t x_new with alpha_t = alpha * s(staleness), and the freed slot goes to a client
drawn uniformly from those not training.

Staleness is the number of server updates applied since the job's start model x_tau (0 for a fresh update, so
every weighting gives s = 1 when one client trains at a time, as the polynomial's +1 and the hinge's "<= b" imply).

Jobs run batched: a job's start model is fixed when it is dispatched, so its result does not depend on when it is
computed. Dispatched jobs wait with their start message; the first arrival of a job not yet run runs every waiting
job in one `run_jobs` call (per-job starts of different versions; jobs of one version share the message object),
which the vectorized runtime stacks on its vmap axis. A result's client state is committed when it arrives.

Where x_new is formed: in the protocol, not in a server rule. The client sends its change Delta from x_tau; the
protocol keeps every version an in-flight job started from and hands the server rule the mixing step rebased on
the current model, alpha_t ((x_tau + Delta) - x_{t-1}), as the result's "delta". The default server rule of
fedavg (`server: {name: fedavg}`, lr 1) then gives x_{t-1} + alpha_t (x_new - x_{t-1}), the paper's update, and
stays a pure function of (state, aggregate): no version history in its state, no protocol parameters in it (alpha
and the weighting are the protocol's, as they depend on timing). A server lr other than 1 scales the step, and a
FedOpt rule (fedadam, fedavgm) runs its optimizer on the mixing steps. Under MPI only the rank holding a result
rebases it, so the server's sums still count it once. With a lossy downlink, Delta is added to the server's own
x_tau (as FedAvg adds it to the server's model), not to the decoded copy the client started from.

The paper's workers minimise f + rho/2 ||x - x_tau||^2: `algorithm: {name: fedprox, mu: rho}`; plain local SGD
(`fedavg`) is rho = 0.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field

from fedsim.clock import Clock, Event
from fedsim.codecs import build_codec
from fedsim.errors import ScenarioError
from fedsim.params import Pytree, tree_map
from fedsim.protocol import SAMPLE_COUNT_BYTES, ProtocolBase
from fedsim.recording import Recorder, Row
from fedsim.registry import Params
from fedsim.runtime import Job, JobResult
from fedsim.sampling import full_steps, samples_processed
from fedsim.seeding import Stream, numpy_rng
from fedsim.servers import PROTOCOLS

if TYPE_CHECKING:
    from fedsim.scenario import Component, ScenarioSchema

Weighting = Literal["constant", "polynomial", "hinge"]


class FedAsyncParams(Params):
    """FedAsync's mixing weight alpha and its staleness weighting s (the paper's constant, polynomial, hinge)."""

    alpha: float = Field(0.6, gt=0, le=1, description="mixing weight of a fresh update")
    staleness: Weighting = Field("polynomial", description="s(d) for staleness d: constant 1; polynomial "
                                                          "(d + 1)^-a; hinge 1 if d <= b else 1 / (a (d - b) + 1)")
    a: float | None = Field(None, ge=0, description="polynomial exponent (default 0.5), or hinge slope (default 10)")
    b: float = Field(4.0, ge=0, description="hinge: staleness up to which updates keep full weight")

    def slope(self) -> float:
        """`a`, or the value of the paper's experiments for the chosen weighting (Poly a = 0.5; Hinge a = 10,
        b = 4; FLGo's fedasync.py uses hinge b = 6)."""
        if self.a is not None:
            return self.a
        return 10.0 if self.staleness == "hinge" else 0.5


def staleness_weight(kind: Weighting, staleness: int, a: float, b: float) -> float:
    """The paper's s(t - tau): the factor a `staleness` updates old result's mixing weight is multiplied by."""
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1) ** -a)
    return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)


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


def check_fedasync(params: FedAsyncParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Refuse stragglers when the scenario is validated: FedAsync models slow clients by their systems speed."""
    if spec.stragglers.fraction > 0:
        raise ScenarioError("stragglers.fraction: protocol 'fedasync' models slow clients by their systems "
                            "speed, not by stragglers; set it to 0")


@PROTOCOLS.register("fedasync", params=FedAsyncParams, needs=("clients_per_round",), carries=("delta",),
                    check=check_fedasync)
class FedAsync(ProtocolBase):
    """Asynchronous updates; `clients_per_round` is the concurrency (clients training at once). Events: `start`
    and `arrival`; jobs are numbered by dispatch, server steps by update."""

    def __init__(self, params: FedAsyncParams, sim, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        hp = sim.rule.hp
        sizes = np.asarray(sim.data.train_sizes)
        self.job_steps = full_steps(sizes, hp.local_epochs, hp.batch_size, hp.local_steps)
        self.job_work = samples_processed(self.job_steps, sizes, hp.batch_size) * sim.rule.step_cost
        uplink = build_codec(self.spec.compression.uplink, "compression.uplink")
        self.bytes_up = uplink.payload_bytes(self.template) + SAMPLE_COUNT_BYTES
        self.step = 0
        self.dispatched = 0
        self.versions: dict[int, tuple[Pytree, int, Pytree]] = {}
        """Per version jobs in flight started from: the message they start from (the broadcast as clients decode
        it), its bytes on a link, and the server's model then (x_tau, what the client's change is added to)."""
        self.in_flight: dict[int, int] = {}
        """Jobs in flight per start version: a version is dropped when none are left."""
        self.pending: list[tuple[Job, Pytree]] = []
        self.done: dict[int, JobResult] = {}
        num_clients = sim.data.num_clients
        self.first = numpy_rng(self.spec.seed, Stream.PROTOCOL, 0).choice(num_clients, self.spec.clients_per_round,
                                                                          replace=False)
        self.idle = IdleClients(num_clients, self.first)
        self.staleness_log: list[int] = []
        """Each server update's staleness, in update order."""
        self.since_row = 0

    def start(self, clock: Clock) -> None:
        clock.schedule(0.0, "start")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": self.step, "dispatched": self.dispatched, "versions": self.versions,
                "in_flight": self.in_flight, "pending": self.pending, "done": self.done,
                "idle": [self.idle.clients, self.idle.count], "staleness_log": self.staleness_log,
                "since_row": self.since_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step, self.dispatched, self.since_row = state["step"], state["dispatched"], state["since_row"]
        self.versions, self.in_flight, self.done = state["versions"], state["in_flight"], state["done"]
        self.pending, self.staleness_log = state["pending"], state["staleness_log"]
        self.idle.clients, self.idle.count = state["idle"]

    def handle(self, event: Event, clock: Clock) -> None:
        if event.kind == "start":
            self._start(clock)
        elif event.kind == "arrival":
            self._arrive(event.payload["job"], clock)
        else:
            raise ValueError(f"fedasync got an unknown event {event.kind!r}")

    def _start(self, clock: Clock) -> None:
        self.evaluate_if_due(0, clock.now)
        self._publish()
        for client in self.first.tolist():
            self._dispatch(int(client), clock)

    def _publish(self) -> None:
        """Make the current model the version new jobs start from (one downlink encoding per version)."""
        message, down = self.broadcast(self.step)
        self.versions[self.step] = (message, down, self.state["params"])
        self.in_flight.setdefault(self.step, 0)

    def _dispatch(self, client: int, clock: Clock) -> None:
        """Start a job from the current version; its duration is known now, its result is computed on demand."""
        message, down, _ = self.versions[self.step]
        job = Job(self.dispatched, client, int(self.job_steps[client]), version=self.step)
        self.dispatched += 1
        self.in_flight[self.step] += 1
        self.pending.append((job, message))
        self.traffic.down += down
        seconds = self.sim.systems.job_seconds(job.id, client, int(self.job_work[client]), down, self.bytes_up)
        clock.schedule(seconds, "arrival", job=job)

    def _arrive(self, job: Job, clock: Clock) -> None:
        if job.id not in self.done:
            jobs, starts = zip(*self.pending, strict=True)
            self.done.update((r.job.id, r) for r in self.sim.runtime.run_jobs(list(jobs), list(starts)))
            self.pending = []
        result = self.done.pop(job.id)
        self.traffic.up += self.bytes_up
        self.commit(result)
        staleness = self.step - job.version
        self.staleness_log.append(staleness)
        weight = self.params.alpha * staleness_weight(self.params.staleness, staleness, self.params.slope(),
                                                      self.params.b)
        rebased = self._rebase(result, weight)
        self.step += 1
        self.server_steps = self.step
        self._release(job.version)
        self.apply([rebased], self.step)
        row = self.evaluate_if_due(self.step, clock.now)
        self.recorder.progress.advance(self.step, row)
        if self.budget_spent(self.step, clock.now):
            clock.stop()
            return
        self._publish()
        self.idle.free(job.client)
        self._dispatch(self.idle.draw(numpy_rng(self.spec.seed, Stream.PROTOCOL, self.step)), clock)

    def _rebase(self, result: JobResult, weight: float) -> JobResult:
        """The result with message {"delta": weight ((x_tau + Delta) - x_{t-1})}: the paper's mixing step as a
        change of the current model (None stays None: another MPI rank holds the message)."""
        if not result.here:
            return result
        start, current = self.versions[result.job.version][2], self.state["params"]
        step = tree_map(lambda x0, d, x: torch.mul(torch.sub(torch.add(x0, d), x), weight),
                        start, result.message["delta"], current)
        return replace(result, message={"delta": step})

    def _release(self, version: int) -> None:
        """One job from the past `version` arrived; forget the version once no job in flight started from it."""
        self.in_flight[version] -= 1
        if self.in_flight[version] == 0:
            del self.in_flight[version], self.versions[version]

    def evaluate_if_due(self, steps: int, now: float) -> Row | None:
        row = super().evaluate_if_due(steps, now)
        if row is not None:
            self.since_row = len(self.staleness_log)
        return row

    def extra_metrics(self) -> dict[str, float]:
        """Mean staleness of the updates since the previous row (0 where there are none) and the server steps so
        far (the row's `round`; rows may be `evaluation.every` steps apart)."""
        recent = self.staleness_log[self.since_row:]
        return {"staleness": float(np.mean(recent)) if recent else 0.0, "server_steps": self.step}
