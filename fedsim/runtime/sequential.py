"""The sequential runtime: one client after another, gradients by autograd. The reference for all runtimes."""

from __future__ import annotations

from fedsim.oracle import AutogradOracle
from fedsim.params import Pytree, tree_nbytes, tree_to
from fedsim.runtime import RUNTIMES, Job, JobResult
from fedsim.runtime.base import PlacedRuntime, RuntimeParams
from fedsim.runtime.context import RuntimeContext, client_tensors, local_generators
from fedsim.runtime.local import client_batches, job_info, job_keys, run_client


@RUNTIMES.register("sequential", params=RuntimeParams)
class SequentialRuntime(PlacedRuntime):
    """Runs each job's local steps in a plain Python loop (`run_client`); with several devices, one loop each."""

    def __init__(self, params: RuntimeParams, context: RuntimeContext) -> None:
        super().__init__(params, context)
        self.oracles = [AutogradOracle(objective) for objective in self.objectives]

    def run_on(self, slot: int, jobs: list[Job], states: list[Pytree | None],
               starts: list[Pytree]) -> list[JobResult]:
        keys, generators = job_keys(self.ctx.seed, jobs), local_generators(self.ctx.seed, jobs)
        return [self._run(slot, *args) for args in zip(jobs, states, starts, keys, generators, strict=True)]

    def _run(self, slot: int, job: Job, client_state: Pytree | None, start: Pytree, key, generator) -> JobResult:
        rule, device = self.ctx.rule, self.devices[slot]
        x, y = client_tensors(self.ctx, job.client, device)
        batches = client_batches(x, y, rule.hp.batch_size, job.steps, generator, key)
        message, new_state, processed = run_client(rule, self.oracles[slot], start, client_state,
                                                   job_info(len(y), job.steps), batches)
        message = tree_to(message, "cpu")
        return JobResult(job, message, len(y), processed * rule.step_cost, tree_nbytes(message),
                         tree_to(new_state, "cpu"))
