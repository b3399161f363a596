"""The sequential runtime: one client after another, gradients by autograd. The reference for all runtimes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from fedsim.clients import GradFn
from fedsim.models import Model
from fedsim.params import Pytree
from fedsim.registry import Params
from fedsim.runtime import RUNTIMES, InProcess, Job, JobResult
from fedsim.runtime.context import RuntimeContext, local_batches
from fedsim.seeding import Stream, torch_generator


def autograd_grad(model: Model) -> GradFn:
    """Gradient of the mean minibatch loss via `torch.autograd.grad` (about 3x less per-step overhead than
    `torch.func.grad` on small models; the vectorized runtime uses torch.func instead)."""

    def grad(params: Pytree, x: torch.Tensor, y: torch.Tensor) -> Pytree:
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            loss = model.loss(leaves, x, y)
            grads = torch.autograd.grad(loss, tuple(leaves.values()))
        return dict(zip(leaves, grads, strict=True))

    return grad


class SequentialParams(Params):
    threads: int = Field(1, ge=1, description="torch intra-op threads; small models run fastest on one")


@RUNTIMES.register("sequential", params=SequentialParams)
class SequentialRuntime(InProcess):
    """Runs each job's local steps in a plain Python loop on the CPU."""

    def __init__(self, params: SequentialParams, context: RuntimeContext) -> None:
        self.ctx, self.threads = context, params.threads
        self.grad = autograd_grad(context.model)

    def run_jobs(self, jobs: Sequence[Job], global_params: Pytree) -> list[JobResult]:
        return [self._run(job, global_params) for job in jobs]

    def _run(self, job: Job, global_params: Pytree) -> JobResult:
        ctx, rule = self.ctx, self.ctx.rule
        x, y = ctx.data.client_train(job.client)
        n = len(y)
        generator = torch_generator(ctx.seed, Stream.LOCAL, job.round, job.client)
        state = rule.init(global_params, ctx.client_state(job.client, global_params))
        processed = 0
        for idx in local_batches(n, rule.hp.batch_size, job.steps, generator):
            state = rule.step(state, (x[idx], y[idx]), self.grad)
            processed += len(idx)
        message, client_state = rule.final(state)
        ctx.states.put(job.client, client_state)
        return JobResult.of(job.client, message, n, processed)
