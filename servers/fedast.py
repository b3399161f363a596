"""Several models trained at once on one client population: FedAST (Askin, Sharma, Joe-Wong, Joshi, "FedAST:
Federated Asynchronous Simultaneous Training", UAI 2024, arXiv 2406.00302, Algorithm 1; the authors' code
github.com/askinb/FedAST, `server.py`) and its synchronous baseline Sync-ST.

Tasks. The scenario is the base; `protocol.tasks` lists the models, each a `name` plus the base's `data`,
`partition`, `task`, `model`, `algorithm` and `server` it replaces (whole mappings, as a variant's overrides) and an
optional `target` test accuracy. Tasks share the clients (num_clients, seed, systems), the clock and the budget;
each has its own simulation (data, model, client rule and states, runtime), server rule and state. Without `tasks`
the base scenario is the one task. Rows: one per task evaluation, its `variant` `<variant>:<task>` (the variant
alone without `tasks`), with the task's `server_steps`, `client_updates` and `jobs_in_flight` (R_m, or Sync-ST's
share of clients). Budget: `rounds` counts server steps over all tasks; `time_budget` simulated seconds.

FedAST: task m keeps R_m jobs in flight (`initial_jobs`, default `clients_per_round` split evenly). A job goes to a
client drawn uniformly from all clients and trains on the task's model current at dispatch; a client runs its jobs
one after another (a job ends at max(now, the client's previous end) + its duration, as `utils/asyncEvent.py`).
Arrivals fill the task's buffer of b_m = max(1, ceil(R_m / buffer_ratio)) results (`buffer_size`: fixed); a full
buffer is one server step through the task's server rule (fedavg: w <- w + eta_g mean(deltas); no staleness
weighting), then new jobs restore R_m. The code starts at most two jobs per arrival; here a task is topped up to
R_m at once. The cap on distinct busy clients (the code's `partialNbofClients`) is not modelled.

Reallocation (`reallocation: variance`, the code's `varBasedR`; `none` is static FedAST): each task keeps its last
`window` client deltas; once full, every arrival adds v_m = eta_g / (eta_l K^2) sum_j ||D_j - mean D||^2 /
(n ||mean D||^2) over the window's non-bias tensors (the code's `calculateUpdVariance`: eta_l, eta_g the local and
server lr, K the task's mean local steps; the code computes it over window - 1 = 7 deltas, here over `window`;
0 where the mean delta is 0). Every `realloc_every` arrivals (default, as the code: floor(3/4 sum R) times the
active tasks), once every active task has more than `window` server steps and a new v_m, R_m is reset from each
task's mean v_m since the last reallocation (the code's `redistributeActiveWorks`): one chunk of `buffer_ratio`
jobs each, then chunks to the task furthest below its share sum(R) s_m / sum(s) (ties to the first task; the last
chunk is cut to what is left, so sum(R) is kept; the code rounds shares down and may overshoot). `rule: paper`:
s_m = sqrt(v_m), the standard deviation; `rule: code_precedence`: the code's `float(x)**1/2`, which is x / 2, so
R_m is proportional to the variance.

Retirement: a task evaluated (every `evaluation.every` of its server steps) at or above its target retires; its
jobs in flight are cancelled (logged as "dropped", cut at that moment; as in the code, the clients' queues are not
given the time back) and its R moves to the other tasks in proportion to theirs (largest remainders; the code
draws the remainder at random). The run ends when every task has retired or the budget is spent.

Sync-ST (`sync_st`, the code's `sync_run`): each round every active task gets a share of `clients_per_round`
(proportional to `initial_jobs`, at least one each) from one uniform permutation of the clients; every job starts
from the task's current model (a client still busy starts when free), `first: k` keeps the first k arrivals of
each task (the code's `firstC`; later ones are logged as "dropped" and not trained), the round ends when the last
kept job arrives, and each task takes one synchronous step. Tasks retire at their targets the same way.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field

from fedsim.async_jobs import JobBook, RecentStaleness, job_sizes
from fedsim.clock import Clock, Event
from fedsim.errors import FedsimError, ScenarioError
from fedsim.params import Pytree
from fedsim.protocol import SAMPLE_COUNT_BYTES, ProtocolBase
from fedsim.recording import Recorder, Row
from fedsim.registry import Params
from fedsim.runtime import Job, JobResult
from fedsim.seeding import Stream, numpy_rng
from fedsim.servers import PROTOCOLS
from fedsim.systems import JobPhases

if TYPE_CHECKING:
    from fedsim.scenario import Component, ResolvedScenario, ScenarioSchema
    from fedsim.simulation import Simulation

COMPONENT_FIELDS = ("data", "partition", "task", "model", "algorithm", "server")
"""The base scenario's components a task may replace."""


class TaskSpec(Params):
    """One model of a simultaneous run: its name, the base components it replaces, its target accuracy."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    data: dict[str, Any] | None = None
    partition: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    algorithm: dict[str, Any] | None = None
    server: dict[str, Any] | None = None
    target: float | None = Field(None, gt=0, le=1, description="test accuracy at which the task retires")
    initial_jobs: int | None = Field(None, ge=1, description="FedAST: jobs in flight at the start; Sync-ST: weight "
                                                             "of its share of clients_per_round")


class SimultaneousParams(Params):
    """The tasks trained at once (none: the base scenario alone)."""

    tasks: list[TaskSpec] | None = Field(None, description="models trained at once, each a name plus the base "
                                                           "components it replaces")


class FedASTParams(SimultaneousParams):
    """FedAST's buffers and its reallocation of jobs in flight between tasks."""

    buffer_ratio: int = Field(4, ge=1, description="R_m / b_m: a task's buffer is max(1, ceil(R_m / buffer_ratio)); "
                                                   "also the chunk reallocation moves (the code's R_bs_ratio, 32 "
                                                   "there for R_m = 96)")
    buffer_size: int | None = Field(None, ge=1, description="a fixed buffer for every task instead")
    reallocation: Literal["variance", "none"] = Field("variance", description="variance: dynamic FedAST; none: "
                                                                              "static")
    rule: Literal["paper", "code_precedence"] = Field("paper", description="R_m proportional to the update's "
                                                                           "standard deviation (paper) or variance "
                                                                           "(the authors' code)")
    window: int = Field(8, ge=2, description="client deltas per task the variance is estimated from")
    realloc_every: int | None = Field(None, ge=1, description="arrivals between reallocations (default: "
                                                              "floor(3/4 sum R) times the active tasks)")


class SyncSTParams(SimultaneousParams):
    """Sync-ST's first-k rule."""

    first: int | None = Field(None, ge=1, description="keep each task's first k arrivals of a round (default: all)")


def task_scenarios(tasks: list[TaskSpec], spec: ScenarioSchema) -> list[ResolvedScenario]:
    """Each task resolved as the base scenario with its components replaced (as a synchronous run, so a task is
    checked like any scenario); errors name `protocol.tasks[i]`."""
    from fedsim.scenario import apply_overrides, resolve

    base = spec.model_dump(mode="json")
    base["protocol"] = {"name": "synchronous"}
    out = []
    for i, task in enumerate(tasks):
        changes = {key: getattr(task, key) for key in COMPONENT_FIELDS if getattr(task, key) is not None}
        try:
            out.append(resolve(apply_overrides(base, changes), variant=None))
        except FedsimError as exc:
            raise type(exc)(f"protocol.tasks[{i}].{exc}") from None
    return out


def task_count(params: SimultaneousParams) -> int:
    return 1 if params.tasks is None else len(params.tasks)


def initial_weights(params: SimultaneousParams, clients_per_round: int) -> list[int]:
    """Each task's `initial_jobs`, or `clients_per_round` split evenly."""
    if params.tasks is not None and params.tasks[0].initial_jobs is not None:
        return [t.initial_jobs for t in params.tasks]
    return share_out(clients_per_round, [1.0] * task_count(params))


def check_tasks(name: str, params: SimultaneousParams, spec: ScenarioSchema,
                components: dict[str, Component]) -> None:
    """What both protocols refuse: stragglers, availability and dropouts (not modelled yet), an empty or ambiguous
    task list, a task that does not resolve, a target on a task without accuracy, fewer clients per round than
    tasks."""
    tasks = params.tasks
    if tasks is not None:
        if not tasks:
            raise ScenarioError("protocol.tasks: give at least one task (a mapping with a name), or leave tasks out "
                                "to train the base scenario alone")
        names = [t.name for t in tasks]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise ScenarioError(f"protocol.tasks: two tasks are named {twice!r}; each task needs its own name")
        given = [t.initial_jobs is not None for t in tasks]
        if any(given) and not all(given):
            raise ScenarioError(f"protocol.tasks[{given.index(False)}].initial_jobs: give it for every task or for "
                                f"none (then clients_per_round is split evenly)")
        for i, (task, resolved) in enumerate(zip(tasks, task_scenarios(tasks, spec), strict=True)):
            metrics = resolved.components["task"].entry.obj.metrics
            if task.target is not None and "accuracy" not in metrics:
                raise ScenarioError(f"protocol.tasks[{i}].target: task {resolved.components['task'].name!r} reports "
                                    f"no accuracy to reach")
    count = task_count(params)
    if spec.clients_per_round < count:
        raise ScenarioError(f"clients_per_round: {spec.clients_per_round} cannot be shared among {count} tasks "
                            f"(one each at least)")


def check_fedast(params: FedASTParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """The shared checks, and reallocation's minimum of one chunk per task within the jobs in flight."""
    check_tasks("fedast", params, spec, components)
    total, count = sum(initial_weights(params, spec.clients_per_round)), task_count(params)
    if params.reallocation == "variance" and count > 1 and params.buffer_ratio * count > total:
        raise ScenarioError(f"protocol.buffer_ratio: reallocation gives each of the {count} tasks at least "
                            f"{params.buffer_ratio} jobs, more than the {total} in flight; lower it, raise "
                            f"clients_per_round (or initial_jobs), or set reallocation: none")


def check_sync_st(params: SyncSTParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    check_tasks("sync_st", params, spec, components)


def share_out(amount: int, weights: list[float]) -> list[int]:
    """`amount` split in proportion to `weights` in whole units: rounded down, the rest one each to the largest
    remainders (ties to the first)."""
    total = sum(weights)
    exact = [amount * w / total for w in weights]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:amount - sum(out)]:
        out[i] += 1
    return out


def allocate(scores: list[float], total: int, chunk: int) -> list[int]:
    """Jobs in flight per task from its score: one `chunk` each, then chunks to the task furthest below its share
    total * s_m / sum(s), the last one cut to what is left (all scores 0: equal shares)."""
    if sum(scores) <= 0:
        scores = [1.0] * len(scores)
    out = [chunk] * len(scores)
    gap = [total * s / sum(scores) - chunk for s in scores]
    left = total - chunk * len(scores)
    while left > 0:
        i = max(range(len(scores)), key=lambda k: (gap[k], -k))
        give = min(chunk, left)
        out[i] += give
        gap[i] -= give
        left -= give
    return out


def score(variance: float, rule: str) -> float:
    """A task's claim on jobs: the standard deviation (the paper), or the code's `variance ** 1 / 2`."""
    return math.sqrt(variance) if rule == "paper" else variance / 2


def normalized_variance(deltas: list[torch.Tensor]) -> float:
    """sum_j ||d_j - mean||^2 / (n ||mean||^2) of flat deltas, in float64 (0 when the mean is 0)."""
    stacked = torch.stack(deltas).double()
    mean = stacked.mean(0)
    norm = float(mean.square().sum())
    return float((stacked - mean).square().sum()) / (len(deltas) * norm) if norm > 0 else 0.0


def weights_only(delta: Pytree) -> torch.Tensor:
    """A delta's non-bias tensors as one flat CPU vector (the code skips bias layers)."""
    return torch.cat([v.detach().reshape(-1).cpu() for k, v in delta.items() if "bias" not in k])


class Task(ProtocolBase):
    """One model of a simultaneous run: its simulation and server state (ProtocolBase's broadcast, aggregation and
    step), jobs in flight, buffer, variance window and row name."""

    def __init__(self, params: Params, sim: Simulation, recorder: Recorder, variant: str, target: float | None,
                 weight: int, own: bool) -> None:
        super().__init__(params, sim, recorder)
        self.variant, self.target, self.weight, self.own = variant, target, weight, own
        self.sizes = job_sizes(sim, self.template)
        hp = sim.rule.hp
        self.variance_scale = sim.server.hp.lr / (hp.lr * float(np.mean(self.sizes.steps)) ** 2)
        """The code's eta_l eta_g / (eta_l K)^2 in front of the normalized variance."""
        self.book = JobBook(sim.runtime)
        self.jobs = weight
        """R_m (FedAST), or this round's share of clients (Sync-ST); 0 once retired."""
        self.flying: dict[int, tuple[Job, float, JobPhases]] = {}
        """Jobs in flight by id: the job, when its client starts it, its phases."""
        self.buffer: list[JobResult] = []
        self.window: list[torch.Tensor] = []
        self.variances: list[float] = []
        """v_m estimates since the last reallocation."""
        self.retired = False
        self.evaluated = -1
        """The server step of the latest row."""
        self.recent = RecentStaleness()

    def publish(self) -> None:
        """Make the current model the version new jobs start from."""
        message, down = self.broadcast(self.server_steps)
        self.book.publish(self.server_steps, message, down, self.state["params"])

    def evaluate(self, now: float) -> Row:
        """Record a row for this task's current model under its own name."""
        personal = self.sim.personal(self.sim.server.broadcast(self.state)) if self.sim.personal else {}
        extra = {"client_updates": self.client_updates, "server_steps": self.server_steps,
                 "jobs_in_flight": self.jobs, "staleness": self.recent.take_mean(), **personal}
        row = self.recorder.evaluate(self.server_steps, now, self.state["params"], self.traffic, extra,
                                     evaluator=self.sim.evaluator, variant=self.variant)
        self.evaluated = self.server_steps
        return row

    def state_dict(self) -> dict[str, Any]:
        own = {"client_states": self.sim.states.state_dict(), "codec_states": self.sim.codec_states.state_dict(),
               "runtime": self.sim.runtime.state_dict()} if self.own else {}
        return {**super().state_dict(), "jobs": self.jobs, "flying": self.flying, "buffer": self.buffer,
                "book": self.book.state_dict(), "window": self.window, "variances": self.variances,
                "retired": self.retired, "evaluated": self.evaluated, "recent": self.recent.state_dict(), **own}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.jobs, self.flying, self.buffer = state["jobs"], dict(state["flying"]), list(state["buffer"])
        self.book.load_state_dict(state["book"])
        self.window, self.variances = list(state["window"]), list(state["variances"])
        self.retired, self.evaluated = state["retired"], state["evaluated"]
        self.recent.load_state_dict(state["recent"])
        if self.own:
            self.sim.states.load_state_dict(state["client_states"])
            self.sim.codec_states.load_state_dict(state["codec_states"])
            self.sim.runtime.load_state_dict(state["runtime"])


def build_tasks(params: SimultaneousParams, sim: Simulation, recorder: Recorder) -> list[Task]:
    """One Task per declared task (or the base alone): a task that replaces nothing of the base, listed first,
    runs on the given simulation; tasks with the base's (or an earlier task's) data and partition share it."""
    from fedsim.simulation import build_simulation

    spec, variant = sim.scenario.spec, sim.scenario.variant
    weights = initial_weights(params, spec.clients_per_round)
    if params.tasks is None:
        return [Task(params, sim, recorder, variant, None, weights[0], own=False)]
    tasks, built = [], [sim]
    for i, (task, scenario) in enumerate(zip(params.tasks, task_scenarios(params.tasks, spec), strict=True)):
        named = replace(scenario, variant=f"{variant}:{task.name}")
        if i == 0 and all(getattr(task, key) is None for key in COMPONENT_FIELDS):
            tasks.append(Task(params, sim, recorder, named.variant, task.target, weights[i], own=False))
            continue
        same = next((s for s in built if _data_key(s.scenario) == _data_key(scenario)), None)
        task_sim = build_simulation(named, data=same.data if same is not None else None)
        built.append(task_sim)
        tasks.append(Task(params, task_sim, recorder, named.variant, task.target, weights[i], own=True))
    return tasks


def _data_key(scenario: ResolvedScenario) -> tuple[Any, ...]:
    c = scenario.components
    return c["data"].as_dict(), c["partition"].as_dict()


class Simultaneous:
    """What FedAST and Sync-ST share: the tasks, the clients' job queues, server steps with evaluation and
    retirement, the budget over all tasks, and the run state. Subclasses handle the events."""

    name = "simultaneous"

    def __init__(self, params: SimultaneousParams, sim: Simulation, recorder: Recorder) -> None:
        self.params, self.sim, self.recorder, self.spec = params, sim, recorder, sim.scenario.spec
        self.tasks = build_tasks(params, sim, recorder)
        self.server_steps = 0
        """Server steps over all tasks (what `rounds` and checkpoints count)."""
        self.dispatched = 0
        """Jobs started so far over all tasks (job ids are unique in the run)."""
        self.free_at = np.zeros(sim.data.num_clients)
        """When each client finishes the jobs it has queued."""

    @property
    def active(self) -> list[Task]:
        return [t for t in self.tasks if not t.retired]

    def start(self, clock: Clock) -> None:
        clock.schedule(0.0, "start")

    def state_dict(self) -> dict[str, Any]:
        return {"server_steps": self.server_steps, "dispatched": self.dispatched, "free_at": self.free_at,
                "tasks": [t.state_dict() for t in self.tasks]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server_steps, self.dispatched = state["server_steps"], state["dispatched"]
        self.free_at = np.array(state["free_at"])
        for task, task_state in zip(self.tasks, state["tasks"], strict=True):
            task.load_state_dict(task_state)

    def handle(self, event: Event, clock: Clock) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is None:
            raise ValueError(f"{self.name} got an unknown event {event.kind!r}")
        handler(event, clock)

    def budget_spent(self, now: float) -> bool:
        spec = self.spec
        return (spec.rounds is not None and self.server_steps >= spec.rounds) or \
            (spec.time_budget is not None and now >= spec.time_budget)

    def _evaluate_all(self, now: float) -> None:
        """The first row of every task (which retires a task whose initial model already meets its target)."""
        for task in self.tasks:
            self._evaluate(task, now)

    def _evaluate(self, task: Task, now: float) -> Row:
        row = task.evaluate(now)
        if task.target is not None and row.get("accuracy", -math.inf) >= task.target:
            self._retire(task, now)
        return row

    def _retire(self, task: Task, now: float) -> None:
        task.retired, task.buffer = True, []

    def _step(self, task: Task, results: list[JobResult], now: float) -> None:
        """One server step of `task` (evaluated when due, retired at its target)."""
        task.server_steps += 1
        self.server_steps += 1
        task.apply(results, task.server_steps, now)
        due = task.server_steps % self.spec.evaluation.every == 0
        self.recorder.progress.advance(self.server_steps, self._evaluate(task, now) if due else None)

    def _over(self, clock: Clock) -> bool:
        """Stop the run when every task has retired or the budget is spent, after a last row of each task still
        training whose latest row is older than its model."""
        if self.active and not self.budget_spent(clock.now):
            return False
        for task in self.active:
            if task.evaluated != task.server_steps:
                task.evaluate(clock.now)
        clock.stop()
        return True

    def _place(self, task: Task, job: Job, down: int, now: float) -> tuple[float, JobPhases]:
        """Queue `job` on its client: it starts when the client is free (or now) and ends after its phases."""
        phases = self.sim.systems.job_phases(job.id, job.client, int(task.sizes.work[job.client]), down,
                                             task.upload_bytes(task.sizes, job.client))
        begin = max(now, float(self.free_at[job.client]))
        self.free_at[job.client] = begin + phases.total
        return begin, phases


@PROTOCOLS.register("fedast", params=FedASTParams, needs=("clients_per_round",), check=check_fedast,
                    no_privacy="its tasks train on the same clients' data, and their spends are not composed")
class FedAST(Simultaneous):
    """Buffered asynchronous training of several models with jobs in flight reallocated by update variance
    (`start` and `arrival` events; see the module docstring)."""

    name = "fedast"

    def __init__(self, params: FedASTParams, sim: Simulation, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        self.dynamic = params.reallocation == "variance" and len(self.tasks) > 1
        self.total_jobs = sum(t.jobs for t in self.tasks)
        self.since_realloc = 0
        """Arrivals since the last reallocation."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "since_realloc": self.since_realloc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.since_realloc = state["since_realloc"]

    def buffer_size(self, task: Task) -> int:
        return self.params.buffer_size or max(1, math.ceil(task.jobs / self.params.buffer_ratio))

    def _on_start(self, event: Event, clock: Clock) -> None:
        self._evaluate_all(clock.now)
        if self._over(clock):
            return
        for task in self.active:
            task.publish()
        self._fill(clock)

    def _fill(self, clock: Clock) -> None:
        """Start jobs until every active task has R_m in flight, each on a client drawn uniformly from all."""
        for index, task in enumerate(self.tasks):
            while not task.retired and len(task.flying) < task.jobs:
                job_id = self.dispatched
                self.dispatched += 1
                client = int(numpy_rng(self.spec.seed, Stream.PROTOCOL, job_id).integers(self.sim.data.num_clients))
                job = Job(job_id, client, int(task.sizes.steps[client]), version=task.server_steps)
                down = task.book.dispatch(job)
                task.traffic.down += down
                begin, phases = self._place(task, job, down, clock.now)
                task.flying[job_id] = (job, begin, phases)
                clock.schedule(begin + phases.total - clock.now, "arrival", task=index, job=job)

    def _on_arrival(self, event: Event, clock: Clock) -> None:
        task, job = self.tasks[event.payload["task"]], event.payload["job"]
        if task.retired:  # cancelled (and logged) when the task retired
            return
        _, begin, phases = task.flying.pop(job.id)
        result = task.book.result(job)
        task.traffic.up += result.message_bytes + SAMPLE_COUNT_BYTES
        task.commit(result)
        staleness = task.server_steps - job.version
        self.recorder.timeline.job(job, begin, phases, "used", staleness)
        task.recent.add(staleness)
        task.buffer.append(result)
        if self.dynamic and len(self.active) > 1:
            self._observe(task, result)
        if len(task.buffer) >= self.buffer_size(task):
            results, task.buffer = task.buffer, []
            self._step(task, results, clock.now)
            if self._over(clock):
                return
            if not task.retired:
                task.publish()
        if self.dynamic and len(self.active) > 1 and self._realloc_due():
            self._reallocate()
        self._fill(clock)

    def _observe(self, task: Task, result: JobResult) -> None:
        """Add the result's delta to the task's window and, once the window is full, a variance estimate."""
        message = task.sim.runtime.gather_messages([result])[0]
        task.window = [*task.window, weights_only(message["delta"])][-self.params.window:]
        if len(task.window) == self.params.window:
            task.variances.append(task.variance_scale * normalized_variance(task.window))
        self.since_realloc += 1

    def _realloc_due(self) -> bool:
        active = self.active
        period = self.params.realloc_every or (3 * self.total_jobs // 4) * len(active)
        return self.since_realloc >= period and all(t.variances for t in active) and \
            min(t.server_steps for t in active) > self.params.window

    def _reallocate(self) -> None:
        """R_m from each active task's mean variance since the last reallocation."""
        active = self.active
        scores = [score(float(np.mean(t.variances)), self.params.rule) for t in active]
        for task, jobs in zip(active, allocate(scores, self.total_jobs, self.params.buffer_ratio), strict=True):
            task.jobs, task.variances = jobs, []
        self.since_realloc = 0

    def _retire(self, task: Task, now: float) -> None:
        """Cancel the task's jobs (logged as dropped, cut now) and give its R to the others in proportion."""
        super()._retire(task, now)
        for job, begin, phases in task.flying.values():
            self.recorder.timeline.job(job, min(begin, now), phases.until(max(0.0, now - begin)), "dropped")
        task.flying, task.book = {}, JobBook(task.sim.runtime)
        others = self.active
        if others:
            for other, extra in zip(others, share_out(task.jobs, [float(t.jobs) for t in others]), strict=True):
                other.jobs += extra
        task.jobs = 0


@PROTOCOLS.register("sync_st", params=SyncSTParams, needs=("clients_per_round",), check=check_sync_st,
                    no_privacy="its tasks train on the same clients' data, and their spends are not composed")
class SyncST(Simultaneous):
    """Synchronous simultaneous training: each round every active task trains on its share of the clients and
    takes one step when its kept jobs have arrived (`start`, `round_start` and `arrival` events)."""

    name = "sync_st"

    def __init__(self, params: SyncSTParams, sim: Simulation, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        self.round = 0
        self.awaiting = 0
        """Kept jobs of this round not yet arrived."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "round": self.round, "awaiting": self.awaiting}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.round, self.awaiting = state["round"], state["awaiting"]

    def _on_start(self, event: Event, clock: Clock) -> None:
        self._evaluate_all(clock.now)
        if not self._over(clock):
            self._on_round_start(event, clock)

    def shares(self) -> list[int]:
        """Each active task's clients this round: `clients_per_round` in proportion to the tasks' weights, at
        least one each."""
        active = self.active
        out = share_out(self.spec.clients_per_round, [float(t.weight) for t in active])
        for i in [i for i, n in enumerate(out) if n == 0]:
            out[out.index(max(out))] -= 1
            out[i] = 1
        return out

    def _on_round_start(self, event: Event, clock: Clock) -> None:
        clients = numpy_rng(self.spec.seed, Stream.PROTOCOL, self.round).permutation(self.sim.data.num_clients)
        taken = 0
        for task, share in zip(self.active, self.shares(), strict=True):
            index = self.tasks.index(task)
            task.jobs = share
            message, down = task.broadcast(task.server_steps)
            placed = []
            for client in clients[taken:taken + share].tolist():
                job = Job(self.dispatched, client, int(task.sizes.steps[client]), version=task.server_steps)
                self.dispatched += 1
                task.traffic.down += down
                placed.append((job, *self._place(task, job, down, clock.now)))
            taken += share
            placed.sort(key=lambda p: (p[1] + p[2].total, p[0].client))
            keep = len(placed) if self.params.first is None else min(self.params.first, len(placed))
            results = task.sim.runtime.run_jobs([job for job, _, _ in placed[:keep]], message)
            for (_, begin, phases), result in zip(placed[:keep], results, strict=True):
                clock.schedule(begin + phases.total - clock.now, "arrival", task=index, result=result, start=begin,
                               phases=phases)
            for job, begin, phases in placed[keep:]:
                clock.schedule(begin + phases.total - clock.now, "late", job=job, start=begin, phases=phases)
            self.awaiting += keep

    def _on_late(self, event: Event, clock: Clock) -> None:
        """A job past the task's first k: it ran, and the server drops its result."""
        self.recorder.timeline.job(event.payload["job"], event.payload["start"], event.payload["phases"], "dropped")

    def _on_arrival(self, event: Event, clock: Clock) -> None:
        task, result = self.tasks[event.payload["task"]], event.payload["result"]
        task.traffic.up += result.message_bytes + SAMPLE_COUNT_BYTES
        task.commit(result)
        self.recorder.timeline.job(result.job, event.payload["start"], event.payload["phases"], "used")
        task.buffer.append(result)
        self.awaiting -= 1
        if self.awaiting > 0:
            return
        for task in [t for t in self.active if t.buffer]:
            results, task.buffer = task.buffer, []
            self._step(task, results, clock.now)
        self.round += 1
        if not self._over(clock):
            clock.schedule(0.0, "round_start")
