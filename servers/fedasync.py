"""FedAsync (Xie, Koyejo, Gupta 2019, "Asynchronous Federated Optimization", arXiv 1903.03934, Algorithm 1) on the
virtual clock: `clients_per_round` clients train at once; each arrival is one server update
x_t = (1 - alpha_t) x_{t-1} + alpha_t x_new with alpha_t = alpha * s(staleness), and the freed slot goes to a client
drawn uniformly from those not training.

Staleness is the number of server updates applied since the job's start model x_tau (0 for a fresh update, so
every weighting gives s = 1 when one client trains at a time, as the polynomial's +1 and the hinge's "<= b" imply).

Jobs run batched (`fedsim.async_jobs`): a job's start model is fixed when it is dispatched; the first arrival of a
job not yet run runs every waiting job in one `run_jobs` call, which the vectorized runtime stacks on its vmap
axis. A result's client state is committed when it arrives.

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

import torch
from pydantic import Field

from fedsim.async_jobs import AsyncProtocol, RecentStaleness
from fedsim.clock import Clock, Event
from fedsim.params import Pytree, tree_map
from fedsim.protocol import SAMPLE_COUNT_BYTES
from fedsim.recording import Recorder
from fedsim.registry import Params
from fedsim.runtime import JobResult
from fedsim.servers import PROTOCOLS

if TYPE_CHECKING:
    pass

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


@PROTOCOLS.register("fedasync", params=FedAsyncParams, needs=("clients_per_round",), carries=("delta",),
                    asynchronous=True, availability=True)
class FedAsync(AsyncProtocol):
    """Asynchronous updates; `clients_per_round` is the concurrency (clients training at once). Events: `start`,
    `arrival`, `dropout`; jobs are numbered by dispatch, server steps by update."""

    def __init__(self, params: FedAsyncParams, sim, recorder: Recorder) -> None:
        super().__init__(params, sim, recorder)
        self.recent = RecentStaleness()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "recent": self.recent.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.recent.load_state_dict(state["recent"])

    def _arrive(self, event: Event, clock: Clock) -> None:
        job = event.payload["job"]
        start = self.book.start_params(job.version)
        result = self.book.result(job)
        self.traffic.up += result.message_bytes + SAMPLE_COUNT_BYTES
        self.commit(result)
        staleness = self.step - job.version
        self.recent.add(staleness)
        self.recorder.timeline.job(job, event.payload["start"], event.payload["phases"], "used", staleness)
        weight = self.params.alpha * staleness_weight(self.params.staleness, staleness, self.params.slope(),
                                                      self.params.b)
        rebased = self._rebase(result, start, weight)
        self.step += 1
        self.server_steps = self.step
        self.apply([rebased], self.step, clock.now)
        row = self.evaluate_if_due(self.step, clock.now)
        self.recorder.progress.advance(self.step, row)
        if self.budget_spent(self.step, clock.now):
            clock.stop()
            return
        self._publish()
        self._refill(job, clock)

    def _rebase(self, result: JobResult, start: Pytree, weight: float) -> JobResult:
        """The result with message {"delta": weight ((x_tau + Delta) - x_{t-1})}: the paper's mixing step as a
        change of the current model (None stays None: another MPI rank holds the message)."""
        if not result.here:
            return result
        step = tree_map(lambda x0, d, x: torch.mul(torch.sub(torch.add(x0, d), x), weight),
                        start, result.message["delta"], self.state["params"])
        return replace(result, message={"delta": step})

    def extra_metrics(self) -> dict[str, float]:
        """Mean staleness of the updates since the previous row (0 where there are none) and the server steps so
        far (the row's `round`; rows may be `evaluation.every` steps apart)."""
        return {"staleness": self.recent.take_mean(), "server_steps": self.step}
