"""FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022, arXiv
2106.06639) on the virtual clock: `clients_per_round` = C clients train at once, each arrival's change goes into a
buffer, and every K = `buffer_size` buffered changes make one server step.

Concurrency: a hard cap of C jobs in flight. An arrival frees its client, then a client drawn uniformly from the
idle ones (the one that arrived included) starts a job from the current model at once, so clients never wait for
the buffer to fill (unlike the JMLR "FedBuff-c" of Fraboni et al.); K changes may come from one client twice.

Staleness tau is the number of server steps since the job's start version. The client's change Delta (final local
model minus its start model; the paper and FLSim send its negative and subtract it) is scaled by s(tau):
"constant" 1; "polynomial" (1 + tau)^-exponent (the paper's, exponent 0.5); "threshold" 1 up to `cutoff` and
`value_after` beyond. FLSim divides every weight by s(1) so that s(1) = 1 (`normalize_at: 1`); by default
(`normalize_at: None`) weights are not normalized, as in the paper. A result staler than `max_staleness` is refused:
not buffered, logged as "stale", counted in `rejected`; the client did train, so its client state is still
committed, and its slot is refilled as for any arrival.

The step: `reduction: mean` (default) hands the server rule the K buffered s(tau_k) Delta_k, whose weighted mean
times the server lr is the paper's x <- x - eta_g Delta_bar / K (the paper's Delta is start minus final, hence its
minus). The paper's plain mean is `server: {name: fedavg, weighting: uniform}`; the server's default weighting by
samples gives sum_k n_k s(tau_k) Delta_k / sum_k n_k. `reduction: sum` multiplies each buffered change by K, so with
uniform weighting the step is the sum lr sum_k s(tau_k) Delta_k, as FLSim's FedBuff aggregator (HybridAggregator in
`flsim/optimizers/async_aggregators.py`, whose reducer defaults to WEIGHTED_SUM) computes; its lr then absorbs the
1/K. Any server rule applies: a FedOpt rule (fedavgm, fedadam) runs its optimizer on the buffered mean.

Jobs run batched (`fedsim.async_jobs`): jobs in flight from several versions run in one `run_jobs` call, which the
vectorized runtime stacks on its vmap axis. Budget: `rounds` server steps and/or `time_budget` simulated seconds,
checked at server steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from fedsim.async_jobs import AsyncProtocol, RecentStaleness, scale_delta
from fedsim.clock import Clock, Event
from fedsim.errors import ScenarioError
from fedsim.protocol import SAMPLE_COUNT_BYTES
from fedsim.recording import Recorder
from fedsim.registry import Params
from fedsim.runtime import JobResult
from fedsim.servers import PROTOCOLS

if TYPE_CHECKING:
    from fedsim.scenario import Component, ScenarioSchema

Weighting = Literal["constant", "polynomial", "threshold"]


class FedBuffParams(Params):
    """FedBuff's buffer size K, staleness weighting s(tau), refusal of stale results and buffer reduction."""

    buffer_size: int | None = Field(None, ge=1, description="K, changes per server step (default min(10, C))")
    staleness: Weighting = Field("polynomial", description="s(tau): constant 1; polynomial (1 + tau)^-exponent; "
                                                           "threshold 1 if tau <= cutoff else value_after")
    exponent: float = Field(0.5, ge=0, description="polynomial exponent (the paper's 0.5)")
    cutoff: int | None = Field(None, ge=0, description="threshold: staleness up to which changes keep weight 1")
    value_after: float | None = Field(None, ge=0, description="threshold: the weight beyond the cutoff")
    normalize_at: int | None = Field(None, ge=0, description="divide weights by s(normalize_at) (FLSim: 1)")
    max_staleness: int | None = Field(None, ge=0, description="refuse results staler than this (default: none)")
    reduction: Literal["mean", "sum"] = Field("mean", description="mean: the paper's step; sum: FLSim's")


def raw_weight(params: FedBuffParams, staleness: int) -> float:
    """s(tau) before normalization."""
    if params.staleness == "constant":
        return 1.0
    if params.staleness == "polynomial":
        return float((1 + staleness) ** -params.exponent)
    return 1.0 if staleness <= params.cutoff else float(params.value_after)


def staleness_weight(params: FedBuffParams, staleness: int) -> float:
    """The factor a change `staleness` server steps old is scaled by (normalized to 1 at `normalize_at`)."""
    weight = raw_weight(params, staleness)
    return weight if params.normalize_at is None else weight / raw_weight(params, params.normalize_at)


def check_fedbuff(params: FedBuffParams, spec: ScenarioSchema, components: dict[str, Component]) -> None:
    """Refuse settings FedBuff cannot honour when the scenario is validated."""
    if params.buffer_size is not None and params.buffer_size > spec.clients_per_round:
        raise ScenarioError(f"protocol.buffer_size: {params.buffer_size} is more than the {spec.clients_per_round} "
                            f"clients in flight (clients_per_round); the buffer would never fill")
    if params.staleness == "threshold":
        missing = next((f for f in ("cutoff", "value_after") if getattr(params, f) is None), None)
        if missing is not None:
            raise ScenarioError(f"protocol.{missing}: the threshold staleness weighting needs it; set it")
    if params.normalize_at is not None and raw_weight(params, params.normalize_at) == 0:
        raise ScenarioError(f"protocol.normalize_at: the weight at staleness {params.normalize_at} is 0; "
                            f"choose a staleness with a positive weight")


@PROTOCOLS.register("fedbuff", params=FedBuffParams, needs=("clients_per_round",), carries=("delta",),
                    check=check_fedbuff, asynchronous=True, availability=True)
class FedBuff(AsyncProtocol):
    """Buffered asynchronous aggregation; `clients_per_round` is the concurrency. Events: `start`, `arrival`,
    `dropout`; jobs are numbered by dispatch, server steps by buffer."""

    def __init__(self, params: FedBuffParams, sim, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        self.buffer_size = params.buffer_size or min(10, self.spec.clients_per_round)
        self.scale = float(self.buffer_size) if params.reduction == "sum" else 1.0
        self.buffer: list[JobResult] = []
        """Weighted results waiting for the next server step."""
        self.rejected = 0
        self.recent = RecentStaleness()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buffer": self.buffer, "rejected": self.rejected,
                "recent": self.recent.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rejected, self.buffer = state["rejected"], list(state["buffer"])
        self.recent.load_state_dict(state["recent"])

    def _arrive(self, event: Event, clock: Clock) -> None:
        job = event.payload["job"]
        result = self.book.result(job)
        self.traffic.up += result.message_bytes + SAMPLE_COUNT_BYTES
        self.commit(result)
        staleness = self.step - job.version
        refused = self.params.max_staleness is not None and staleness > self.params.max_staleness
        self.recorder.timeline.job(job, event.payload["start"], event.payload["phases"],
                                   "stale" if refused else "used", staleness)
        if refused:
            self.rejected += 1
        else:
            self.buffer.append(scale_delta(result, staleness_weight(self.params, staleness) * self.scale))
            self.recent.add(staleness)
        if len(self.buffer) == self.buffer_size and self._server_step(clock):
            return
        self._refill(job, clock)

    def _server_step(self, clock: Clock) -> bool:
        """Apply the buffer as the next server step; returns whether that spent the budget (the clock stops)."""
        self.step += 1
        self.server_steps = self.step
        self.apply(self.buffer, self.step, clock.now)
        self.buffer = []
        row = self.evaluate_if_due(self.step, clock.now)
        self.recorder.progress.advance(self.step, row)
        if self.budget_spent(self.step, clock.now):
            clock.stop()
            return True
        self._publish()
        return False

    def extra_metrics(self) -> dict[str, float]:
        """Mean staleness of the changes buffered since the previous row (0 where there are none), results refused
        as too stale so far, and the server steps so far (rows may be `evaluation.every` steps apart)."""
        return {"staleness": self.recent.take_mean(), "rejected": self.rejected, "server_steps": self.step}
