"""What every protocol shares: the server rule's state, the budget, evaluation, traffic, committing results'
client states on arrival, and turning results into the server rule's aggregate.

A protocol is an event handler on the virtual clock (`fedsim.clock`): `start(clock)` schedules its first events,
`handle(event, clock)` reacts to each. Its budget is the scenario's `rounds` (server steps: synchronous rounds,
asynchronous server updates, gossip rounds) and/or `time_budget` (simulated seconds), whichever is spent first;
a protocol stops the clock when it is spent. A queue that empties before that is an error (`fedsim.api`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedsim import keyed_random
from fedsim.aggregation import Aggregate, finish_means, total_weights
from fedsim.clock import Clock, Event
from fedsim.codecs import build_codec, transmit
from fedsim.errors import DivergenceError
from fedsim.params import Pytree, tree_is_finite
from fedsim.recording import Recorder, Row, Traffic
from fedsim.registry import Params
from fedsim.runtime import JobResult, StackedResults
from fedsim.runtime.local import message_template
from fedsim.seeding import Stream, derive_seed

if TYPE_CHECKING:
    from fedsim.async_jobs import JobSizes
    from fedsim.simulation import Simulation

SAMPLE_COUNT_BYTES = 8
"""Each client message carries its client's sample count (an int64) next to its tensors."""


class ProtocolBase:
    """Base of protocol classes; subclasses implement `start` and `handle`."""

    def __init__(self, params: Params, sim: Simulation, recorder: Recorder) -> None:
        self.params, self.sim, self.recorder = params, sim, recorder
        self.spec = sim.scenario.spec
        self.state = sim.server.init(sim.model.init_params)
        self.template = message_template(sim.rule, sim.server.broadcast(self.state))
        self.weighting = sim.server.weighting(self.template)
        self.per_result = bool(sim.scenario.components["server"].entry.meta.get("per_result"))
        self.traffic = Traffic()
        self.downlink_state: Pytree | None = None
        self.server_steps = 0
        """Server steps taken so far (rounds, asynchronous updates, gossip rounds)."""
        self.client_updates = 0
        """Client results that went into server steps so far (a gossip round counts each node's local update)."""
        self.uploaded: set[int] = set()
        """Clients whose results have arrived, on every process (the first upload of an uplink codec that sends it
        differently is charged as such): kept only for such codecs."""
        uplink = build_codec(self.spec.compression.uplink, "compression.uplink")
        self.tracks_uploads = uplink.payload_bytes(self.template, first=True) != uplink.payload_bytes(self.template)

    def start(self, clock: Clock) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The protocol's run state (server state, traffic, downlink codec state, and what subclasses add: jobs in
        flight and their results), plain data for a checkpoint; `server_steps` tells checkpoints when to fall."""
        return {"server": self.state, "traffic": [self.traffic.down, self.traffic.up],
                "downlink": self.downlink_state, "server_steps": self.server_steps,
                "client_updates": self.client_updates, "uploaded": sorted(self.uploaded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state, self.downlink_state = state["server"], state["downlink"]
        self.traffic = Traffic(*state["traffic"])
        self.server_steps, self.client_updates = state["server_steps"], state["client_updates"]
        self.uploaded = set(state["uploaded"])

    def handle(self, event: Event, clock: Clock) -> None:
        raise NotImplementedError

    def budget_spent(self, steps: int, now: float) -> bool:
        """Whether `steps` server steps or `now` simulated seconds use up the budget, or one more server step could
        spend more than the privacy budget."""
        spec, privacy = self.spec, self.sim.privacy
        return (spec.rounds is not None and steps >= spec.rounds) or \
            (spec.time_budget is not None and now >= spec.time_budget) or \
            (privacy is not None and privacy.next_step_exceeds_budget())

    def evaluate_if_due(self, steps: int, now: float) -> Row | None:
        """Evaluate the global model every `evaluation.every` server steps and when the budget is spent, with the
        client updates so far, the protocol's own figures (`extra_metrics`) and, for rules with personal models,
        their figures."""
        if self.evaluation_due(steps, now):
            personal = self.sim.personal(self.sim.server.broadcast(self.state)) if self.sim.personal else {}
            privacy = {} if self.sim.privacy is None else self.sim.privacy.metrics()
            return self.recorder.evaluate(steps, now, self.state["params"], self.traffic,
                                          {"client_updates": self.client_updates, **self.extra_metrics(),
                                           **personal, **privacy})
        return None

    def evaluation_due(self, steps: int, now: float) -> bool:
        """Whether `steps` server steps at simulated time `now` get a metrics row: every `evaluation.every` steps,
        and when the budget is spent."""
        return steps % self.spec.evaluation.every == 0 or self.budget_spent(steps, now)

    def extra_metrics(self) -> dict[str, float]:
        """Figures a protocol adds to each metrics row (none here; gossip adds consensus error, async staleness)."""
        return {}

    def commit(self, result: JobResult) -> None:
        """File an arrived result's new client state and uplink codec state (results held by another MPI rank are
        that rank's; every rank notes that the client has uploaded and counts what its job spent of privacy)."""
        if self.sim.privacy is not None:
            self.sim.privacy.commit(result.client, result.job.steps)
        if self.tracks_uploads:
            self.uploaded.add(result.client)
        if result.here:
            self.sim.states.put(result.client, result.client_state)
            self.sim.codec_states.put(result.client, result.codec_state)

    def commit_all(self, results: Sequence[JobResult]) -> None:
        """`commit` every result, in order; stacked results of a stateless rule and codec, with no state stored,
        are skipped whole (committing them would change nothing), so their rows are never split per job."""
        stateless = isinstance(results, StackedResults) and not results.has_states
        if stateless and not len(self.sim.states) and not len(self.sim.codec_states) and not self.tracks_uploads:
            if self.sim.privacy is not None:
                for job in results.jobs:
                    self.sim.privacy.commit(job.client, job.steps)
            return
        for result in results:
            self.commit(result)

    def broadcast(self, steps: int) -> tuple[Pytree, int]:
        """The server rule's broadcast through the downlink codec (its state kept here, one per server): the
        message clients decode, and the payload's exact bytes on one link. Every client mirrors the server's shared
        codec state as if it heard every broadcast (one decode stands for all of them)."""
        message, codec = self.sim.server.broadcast(self.state), self.sim.downlink
        first = self.downlink_state is None
        state = codec.init(message) if first else self.downlink_state
        key = keyed_random.key_from_seed(derive_seed(self.spec.seed, Stream.SERVER, steps, 1))
        payload, decoded, nbytes, self.downlink_state = transmit(codec, message, state, key, first)
        self.sim.runtime.broadcast_payload(decoded, payload)
        return decoded, nbytes

    def upload_bytes(self, sizes: JobSizes, client: int) -> int:
        """The bytes a job of `client` will upload (with its sample count): its first message's when none of its
        results has arrived yet (two jobs of one client in flight at once are both charged as first)."""
        return sizes.bytes_first if self.tracks_uploads and client not in self.uploaded else sizes.bytes_up

    def aggregate(self, results: Sequence[JobResult], steps: int) -> Aggregate:
        """The server rule's view of `results`, reduced over devices and ranks in client order (then job id), so
        the sums do not depend on the order results arrived or were sampled in."""
        results = sorted(results, key=lambda r: (r.client, r.job.id))
        runtime = self.sim.runtime
        sums = runtime.reduce(results, self.weighting, self.template)
        totals = total_weights(results, self.weighting)
        mean = finish_means(sums, totals, self.template)
        messages = runtime.gather_messages(results) if self.per_result else None
        key = keyed_random.key_from_seed(derive_seed(self.spec.seed, Stream.SERVER, steps))
        return Aggregate(mean, self.weighting, totals, len(results), self.sim.data.num_clients, steps, results,
                         messages, key)

    def apply(self, results: Sequence[JobResult], steps: int, now: float) -> None:
        """Update the server state with `results` as server step `steps` at simulated time `now` (on the timeline);
        a non-finite model stops the run."""
        self.state = self.sim.server.update(self.state, self.aggregate(results, steps))
        self.client_updates += len(results)
        if self.sim.privacy is not None:
            self.sim.privacy.server_step()
        self.recorder.timeline.server_step(now)
        if not tree_is_finite(self.state["params"]):
            raise DivergenceError(
                f"variant {self.sim.scenario.variant}, round {steps}: the global model has NaN/inf parameters; "
                f"the run diverged; its metrics up to this round are kept; a smaller algorithm.lr may help"
            )


class LockstepProtocol(ProtocolBase):
    """Base of protocols whose server step is one event, taken whole when it fires (gossip rounds, DADAO's units of
    time, token hops): evaluate when due, stop when the budget is spent, else take the step and schedule the next
    after the step's simulated seconds. Subclasses name the event (`step_event`) and implement `take_step`."""

    step_event = "step"

    def start(self, clock: Clock) -> None:
        clock.schedule(0.0, self.step_event, step=0)

    def handle(self, event: Event, clock: Clock) -> None:
        if event.kind != self.step_event:
            raise ValueError(f"{type(self).__name__} got an unknown event {event.kind!r}")
        t = event.payload["step"]
        self.before_evaluation(t)
        row = self.evaluate_if_due(t, clock.now)
        if self.budget_spent(t, clock.now):
            clock.stop()
            return
        seconds = self.take_step(t)
        self.server_steps = t + 1
        self.recorder.progress.advance(t, row)
        clock.schedule(seconds, self.step_event, step=t + 1)

    def before_evaluation(self, t: int) -> None:
        """Bring the evaluated model to step t before its row (nothing here: the last step left it there)."""

    def take_step(self, t: int) -> float:
        """Server step t (counting its client updates); returns its simulated seconds."""
        raise NotImplementedError
