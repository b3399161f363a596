"""Synchronous rounds on the virtual clock: the server samples clients, broadcasts its message to each, waits for
every client whose work it keeps, aggregates, and starts the next round (FedAvg and FedProx's protocol).

Two straggler models (`stragglers` in the scenario; the rule keeps a straggler's partial work or drops it):
`fraction`, the FedProx paper's protocol as the authors' code runs it (a sampled share of clients runs fewer
epochs, drawn apart from device speed); `deadline`, stragglers tied to speed as users of a device simulator expect
(a client whose full job would end after the deadline runs the local steps that fit, or is dropped; a client that
fits no step is dropped either way; the round ends when every kept client has arrived, at most the deadline).

With an availability model in the systems profile, a round samples among the clients available when it starts
(all of them when fewer than `clients_per_round` are; when none is, the round waits for the first to come
online); a client that drops out during its job (the profile's `dropout`, or its availability ending) is lost to
the round, its work and client state discarded.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from fedsim.async_jobs import job_sizes
from fedsim.clock import Clock, Event
from fedsim.protocol import SAMPLE_COUNT_BYTES, ProtocolBase
from fedsim.recording import Recorder
from fedsim.registry import Params
from fedsim.runtime import Job, JobResult
from fedsim.sampling import RoundPlan, plan_round, steps_by_deadline
from fedsim.servers import PROTOCOLS
from fedsim.systems import JobPhases


class SynchronousParams(Params):
    """How a round samples its clients."""

    client_sampling: Literal["fixed", "poisson"] = Field(
        "fixed", description="fixed: clients_per_round clients without replacement; poisson: each client "
                             "independently with probability clients_per_round / num_clients (a round may draw none; "
                             "user-level DP accountants assume it)")


def poisson_client_rate(params: SynchronousParams, clients_per_round: int | None, num_clients: int) -> float | None:
    """The probability each client is drawn with per round under Poisson sampling (None under fixed sampling)."""
    if params.client_sampling != "poisson" or clients_per_round is None:
        return None
    return clients_per_round / num_clients


@PROTOCOLS.register("synchronous", params=SynchronousParams, needs=("clients_per_round",),
                    stragglers=("fraction", "deadline"), availability=True, client_rate=poisson_client_rate)
class SynchronousRounds(ProtocolBase):
    """Synchronous rounds: sample clients, wait for every kept one, aggregate (`round_start`/`arrival` events;
    jobs are numbered by their round)."""

    def __init__(self, params: SynchronousParams, sim, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        self.drop_stragglers = sim.scenario.straggler_handling == "drop"
        self.deadline = self.spec.stragglers.deadline
        self.sizes = job_sizes(sim, self.template) if self.deadline is not None else None
        self.round = 0
        self.awaiting = 0
        self.received: list[tuple[int, JobResult]] = []

    def start(self, clock: Clock) -> None:
        clock.schedule(0.0, "round_start", round=0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "round": self.round, "awaiting": self.awaiting, "received": self.received}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.round, self.awaiting, self.received = state["round"], state["awaiting"], state["received"]

    def handle(self, event: Event, clock: Clock) -> None:
        if event.kind == "round_start":
            self._start_round(event.payload["round"], clock)
        elif event.kind == "arrival":
            self._arrive(event, clock)
        else:
            raise ValueError(f"synchronous rounds got an unknown event {event.kind!r}")

    def _start_round(self, t: int, clock: Clock) -> None:
        spec, sim = self.spec, self.sim
        candidates = self._available(clock.now)
        if candidates is not None and len(candidates) == 0:
            soonest = float(np.min(sim.systems.available_times(np.arange(sim.data.num_clients), clock.now)))
            if np.isfinite(soonest):
                clock.schedule(soonest - clock.now, "round_start", round=t)
            return
        row = self.evaluate_if_due(t, clock.now)
        if self.budget_spent(t, clock.now):
            clock.stop()
            return
        hp = sim.rule.hp
        plan = plan_round(spec.seed, t, sim.data.train_sizes, spec.clients_per_round, spec.stragglers.fraction,
                          hp.local_epochs, hp.batch_size, hp.local_steps, candidates,
                          self.params.client_sampling == "poisson")
        message, down = self.broadcast(t)
        self.traffic.down += down * len(plan.clients)
        if self.deadline is None:
            jobs = [Job(t, int(c), int(s), version=t) for c, s, late in zip(plan.clients, plan.steps, plan.straggler,
                                                                            strict=True)
                    if not (late and self.drop_stragglers)]
            results = sim.runtime.run_jobs(jobs, message)
            timing = [sim.systems.job_phases(r.job.id, r.client, r.work, down, r.message_bytes + SAMPLE_COUNT_BYTES)
                      for r in results]
        else:
            jobs, timing = self._within_deadline(t, plan, down, clock.now)
            results = sim.runtime.run_jobs(jobs, message) if jobs else []
        results, timing, dropped_until = self._dropouts(results, timing, clock.now)
        self.round, self.awaiting, self.received = t, len(results), []
        for order, (result, phases) in enumerate(zip(results, timing, strict=True)):
            clock.schedule(phases.total, "arrival", result=result, order=order,
                           bytes_up=result.message_bytes + SAMPLE_COUNT_BYTES, start=clock.now, phases=phases)
        self.recorder.progress.advance(t, row)
        if not results:
            wait = max(dropped_until, 0.0 if self.deadline is None else self.deadline)
            if getattr(sim.server, "steps_without_results", False):  # ServerBase's default, for any plugin
                self.apply([], t, clock.now + wait)
                self.server_steps = t + 1
            clock.schedule(wait, "round_start", round=t + 1)

    def _available(self, now: float) -> np.ndarray | None:
        """The clients available at `now`, or None when every client always is."""
        systems = self.sim.systems
        if systems.always_available:
            return None
        everyone = np.arange(self.sim.data.num_clients)
        return everyone[systems.available_mask(everyone, now)]

    def _dropouts(self, results: list[JobResult], timing: list[JobPhases],
                  now: float) -> tuple[list[JobResult], list[JobPhases], float]:
        """The results whose clients stay to the end of their jobs, and their phases; the others are logged as
        dropped where they dropped out (their work is lost, their client state not kept). Also returns the seconds
        until the last drop."""
        kept, kept_timing, last = [], [], 0.0
        for result, phases in zip(results, timing, strict=True):
            drop = self.sim.systems.drop_time(result.job.id, result.client, now, phases)
            if drop is None:
                kept.append(result)
                kept_timing.append(phases)
            else:
                self.recorder.timeline.job(result.job, now, phases.until(drop), "dropped")
                last = max(last, drop)
        return kept, kept_timing, last

    def _within_deadline(self, t: int, plan: RoundPlan, down: int, now: float) -> tuple[list[Job], list[JobPhases]]:
        """The round's jobs cut to the deadline and their phases: a full job that fits runs whole; one that does
        not runs the steps that fit where the rule keeps partial work, else it is dropped (logged as ending at the
        deadline), as is one that fits no step."""
        sim, hp, sizes = self.sim, self.sim.rule.hp, self.sizes
        jobs, timing = [], []
        for client in plan.clients.tolist():
            full = int(sizes.steps[client])
            phases = sim.systems.job_phases(t, client, int(sizes.work[client]), down, self.upload_bytes(sizes, client))
            steps, cut = steps_by_deadline(phases, self.deadline, full, int(sim.data.train_sizes[client]),
                                           hp.batch_size, sim.rule.step_cost)
            if steps == full or (steps > 0 and not self.drop_stragglers):
                jobs.append(Job(t, client, steps, version=t))
                timing.append(cut)
            else:
                self.recorder.timeline.job(Job(t, client, full, version=t), now, phases.until(self.deadline),
                                           "dropped")
        return jobs, timing

    def _arrive(self, event: Event, clock: Clock) -> None:
        self.traffic.up += event.payload["bytes_up"]
        self.commit(event.payload["result"])
        payload = event.payload
        self.recorder.timeline.job(payload["result"].job, payload["start"], payload["phases"], "used")
        self.received.append((event.payload["order"], event.payload["result"]))
        if len(self.received) < self.awaiting:
            return
        self.apply([r for _, r in sorted(self.received, key=lambda pair: pair[0])], self.round, clock.now)
        self.server_steps, self.received = self.round + 1, []
        clock.schedule(0.0, "round_start", round=self.round + 1)

