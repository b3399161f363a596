"""Synchronous rounds on the virtual clock: the server samples clients, sends each the model, waits for every
client whose work it keeps, aggregates, and starts the next round. FedAvg and FedProx run on it; buffered and
asynchronous protocols will be other event handlers on the same clock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsim.clock import Clock, Event
from fedsim.errors import DivergenceError
from fedsim.params import tree_is_finite, tree_nbytes
from fedsim.recording import Recorder, Traffic
from fedsim.runtime import Job, JobResult
from fedsim.sampling import plan_round

if TYPE_CHECKING:
    from fedsim.simulation import Simulation

SAMPLE_COUNT_BYTES = 8
"""Each message carries its client's sample count (an int64) next to its tensors."""


class SynchronousRounds:
    """Event handler for `round_start` and `arrival` events."""

    def __init__(self, sim: Simulation, recorder: Recorder) -> None:
        self.sim, self.recorder = sim, recorder
        self.spec = sim.scenario.spec
        self.drop_stragglers = sim.scenario.straggler_handling == "drop"
        self.state = sim.server.init(sim.model.init_params)
        self.model_bytes = tree_nbytes(sim.model.init_params)
        self.traffic = Traffic()
        self.round = 0
        self.awaiting = 0
        self.received: list[tuple[int, JobResult]] = []

    def start(self, clock: Clock) -> None:
        clock.schedule(0.0, "round_start", round=0)

    def handle(self, event: Event, clock: Clock) -> None:
        if event.kind == "round_start":
            self._start_round(event.payload["round"], clock)
        elif event.kind == "arrival":
            self._arrive(event, clock)
        else:
            raise ValueError(f"synchronous rounds got an unknown event {event.kind!r}")

    def _start_round(self, t: int, clock: Clock) -> None:
        spec = self.spec
        row = None
        if t % spec.evaluation.every == 0 or t == spec.rounds:
            row = self.recorder.evaluate(t, clock.now, self.state["params"], self.traffic)
        if t == spec.rounds:
            clock.stop()
            return
        hp = self.sim.rule.hp
        plan = plan_round(spec.seed, t, self.sim.data.train_sizes, spec.clients_per_round,
                          spec.stragglers.fraction, hp.local_epochs, hp.batch_size)
        self.traffic.down += self.model_bytes * len(plan.clients)
        jobs = [Job(int(c), int(s), t) for c, s, late in zip(plan.clients, plan.steps, plan.straggler, strict=True)
                if not (late and self.drop_stragglers)]
        results = self.sim.runtime.run_jobs(jobs, self.state["params"])
        self.round, self.awaiting, self.received = t, len(results), []
        for order, result in enumerate(results):
            up = result.message_bytes + SAMPLE_COUNT_BYTES
            seconds = self.sim.systems.job_seconds(result.client, result.samples_processed, self.model_bytes, up)
            clock.schedule(seconds, "arrival", result=result, order=order, bytes_up=up)
        self.recorder.progress.advance(t, row)
        if not results:
            clock.schedule(0.0, "round_start", round=t + 1)

    def _arrive(self, event: Event, clock: Clock) -> None:
        self.traffic.up += event.payload["bytes_up"]
        self.received.append((event.payload["order"], event.payload["result"]))
        if len(self.received) < self.awaiting:
            return
        results = [r for _, r in sorted(self.received, key=lambda pair: pair[0])]
        mean = self.sim.runtime.aggregate(results, self.sim.server.hp.weighting)
        self.state = self.sim.server.update(self.state, mean)
        if not tree_is_finite(self.state["params"]):
            raise DivergenceError(
                f"variant {self.sim.scenario.variant}, round {self.round}: the global model has NaN/inf parameters; "
                f"the run diverged; its metrics up to this round are kept; a smaller algorithm.lr may help"
            )
        clock.schedule(0.0, "round_start", round=self.round + 1)
