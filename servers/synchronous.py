"""Synchronous rounds on the virtual clock: the server samples clients, broadcasts its message to each, waits for
every client whose work it keeps, aggregates, and starts the next round (FedAvg and FedProx's protocol; the FedProx
paper's straggler model: a sampled fraction of clients runs fewer epochs, and the rule keeps or drops them)."""

from __future__ import annotations

from typing import Any

from fedsim.clock import Clock, Event
from fedsim.protocol import SAMPLE_COUNT_BYTES, ProtocolBase
from fedsim.recording import Recorder
from fedsim.registry import NoParams
from fedsim.runtime import Job, JobResult
from fedsim.sampling import plan_round
from fedsim.servers import PROTOCOLS


@PROTOCOLS.register("synchronous", params=NoParams, needs=("clients_per_round",))
class SynchronousRounds(ProtocolBase):
    """Synchronous rounds: sample clients, wait for every kept one, aggregate (`round_start`/`arrival` events;
    jobs are numbered by their round)."""

    def __init__(self, params: NoParams, sim, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        self.drop_stragglers = sim.scenario.straggler_handling == "drop"
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
        row = self.evaluate_if_due(t, clock.now)
        if self.budget_spent(t, clock.now):
            clock.stop()
            return
        hp = sim.rule.hp
        plan = plan_round(spec.seed, t, sim.data.train_sizes, spec.clients_per_round, spec.stragglers.fraction,
                          hp.local_epochs, hp.batch_size, hp.local_steps)
        message, down = self.broadcast(t)
        self.traffic.down += down * len(plan.clients)
        jobs = [Job(t, int(c), int(s), version=t) for c, s, late in zip(plan.clients, plan.steps, plan.straggler,
                                                                        strict=True)
                if not (late and self.drop_stragglers)]
        results = sim.runtime.run_jobs(jobs, message)
        self.round, self.awaiting, self.received = t, len(results), []
        for order, result in enumerate(results):
            up = result.message_bytes + SAMPLE_COUNT_BYTES
            phases = sim.systems.job_phases(result.job.id, result.client, result.work, down, up)
            clock.schedule(phases.total, "arrival", result=result, order=order, bytes_up=up, start=clock.now,
                           phases=phases)
        self.recorder.progress.advance(t, row)
        if not results:
            clock.schedule(0.0, "round_start", round=t + 1)

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
