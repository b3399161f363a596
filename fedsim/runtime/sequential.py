"""The sequential runtime: one client after another, gradients by autograd. The reference for all runtimes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsim.oracle import local_oracle
from fedsim.params import Pytree, tree_leaves, tree_to
from fedsim.runtime import RUNTIMES, Job, JobResult
from fedsim.runtime.base import PlacedRuntime, RuntimeParams
from fedsim.runtime.context import RuntimeContext, client_tensors, job_seeds
from fedsim.runtime.local import job_batches, job_info, job_keys, run_client, send
from fedsim.seeding import Stream


@RUNTIMES.register("sequential", params=RuntimeParams)
class SequentialRuntime(PlacedRuntime):
    """Runs each job's local steps in a plain Python loop (`run_client`); with several devices, one loop each."""

    def __init__(self, params: RuntimeParams, context: RuntimeContext) -> None:
        super().__init__(params, context)
        self.oracles = [local_oracle(objective, context.rule.hp) for objective in self.objectives]

    def run_on(self, slot: int, jobs: Sequence[Job], stored: list[Pytree | None],
               starts: Sequence[Pytree]) -> list[Sequence[JobResult]]:
        """One piece: the jobs' results one after another (a stacked start's rows taken one at a time)."""
        seed = self.ctx.seed
        keys, codec_keys = job_keys(seed, jobs), job_keys(seed, jobs, Stream.CODEC)
        return [[self._run(slot, job, state, starts[i], keys[i], codec_keys[i], local_seed)
                 for i, (job, state, local_seed) in enumerate(zip(jobs, stored, job_seeds(seed, Stream.LOCAL, jobs),
                                                                  strict=True))]]

    def _run(self, slot: int, job: Job, stored: Pytree | None, start: Pytree, key: torch.Tensor,
             codec_key: torch.Tensor, local_seed: int) -> JobResult:
        rule, device = self.ctx.rule, self.devices[slot]
        client_state = rule.initial_state(start) if stored is None else stored
        x, y = client_tensors(self.ctx, job.client, device)
        batches = job_batches(x, y, rule.hp, job.steps, local_seed, key)
        message, new_state, processed = run_client(rule, self.oracles[slot], start, client_state,
                                                   job_info(len(y), job.steps, job.client), batches)
        message, nbytes, codec_state = send(self.ctx.uplink, message, self._codec_state(job.client, message),
                                            codec_key.to(device))
        return JobResult(job, tree_to(message, "cpu"), len(y), processed * rule.step_cost, nbytes,
                         tree_to(new_state, "cpu"), tree_to(codec_state, "cpu"))

    def _codec_state(self, client: int, message: Pytree) -> Pytree | None:
        """The client's stored uplink codec state on the message's device (None: it has sent nothing yet)."""
        state = self.ctx.codec_states.get(client)
        return None if state is None else tree_to(state, next(iter(tree_leaves(message))).device)
