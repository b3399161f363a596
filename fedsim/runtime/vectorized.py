"""The vectorized runtime: many clients' local steps at once, under `torch.func.vmap` over a client axis.

Clients in a chunk share one step loop. Each step gathers every client's minibatch from the concatenated training
tensors (which sit on the device once) through a (clients, batch) index tensor; padding rows carry weight 0 in the
loss, so short last batches and small clients need no special case, and clients that have finished their steps
(stragglers, small data sets) keep their state through a mask. Chunks are sized from a memory budget.
Numbers equal the sequential runtime's to float tolerance (the loss is a weighted sum instead of a mean).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from pydantic import Field, field_validator
from torch.func import grad as func_grad
from torch.func import vmap

from fedsim.clients import GradFn
from fedsim.errors import ScenarioError
from fedsim.models import Model
from fedsim.params import Pytree, tree_map, tree_nbytes
from fedsim.registry import Params
from fedsim.runtime import RUNTIMES, InProcess, Job, JobResult
from fedsim.runtime.context import RuntimeContext, padded_schedule
from fedsim.seeding import Stream, torch_generator

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str) -> int:
    """`2GiB`, `512MB`, `1e9` or an integer number of bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 512MB or 2GiB)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


class VectorizedParams(Params):
    memory_budget: int | str = Field("2GiB", validate_default=True,
                                     description="memory for one chunk of clients in flight")
    chunk_size: int | None = Field(None, ge=1, description="clients per chunk; default: as many as the budget fits")
    device: str = "cpu"
    threads: int = Field(1, ge=1, description="torch intra-op threads")

    @field_validator("memory_budget")
    @classmethod
    def _size(cls, value: int | str) -> int:
        size = parse_bytes(value)
        if size <= 0:
            raise ValueError("must be positive")
        return size


def resolve_device(name: str) -> torch.device:
    """The torch device named, or a ScenarioError: never a silent fallback to another device."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ScenarioError(f"runtime.device: {name!r} is not a device name (use cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise ScenarioError(f"runtime.device: {name} does not exist here ({count} CUDA devices)")
    elif device.type != "cpu":
        raise ScenarioError(f"runtime.device: {name!r} is not supported; use cpu or cuda[:N]")
    return device


def weighted_loss_grad(model: Model) -> GradFn:
    """Gradient of sum_i w_i loss_i / sum_i w_i over a padded minibatch (weights 0 on padding), by torch.func."""

    def loss(params: Pytree, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        per_sample = torch.nn.functional.cross_entropy(model.forward(params, x), y, reduction="none")
        return (per_sample * w).sum() / w.sum().clamp_min(1.0)

    return func_grad(loss)


def activation_bytes_per_sample(model: Model, feature_shape: tuple[int, ...]) -> int:
    """Bytes of every module output for one sample (a forward pass with hooks), to size chunks."""
    total = 0

    def count(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(count) for m in model.template.modules()]
    with torch.no_grad():
        model.forward(model.init_params, torch.zeros(1, *feature_shape))
    for h in handles:
        h.remove()
    return total


def keep_where(mask: torch.Tensor, new: Pytree, old: Pytree) -> Pytree:
    """Leaf-wise: client i takes `new` where mask[i], else keeps `old` (clients that have finished their steps)."""
    return tree_map(lambda a, b: torch.where(mask.view(-1, *[1] * (a.dim() - 1)), a, b), new, old)


@RUNTIMES.register("vectorized", params=VectorizedParams, vectorized=True)
class VectorizedRuntime(InProcess):
    """Runs chunks of clients under vmap; the default for rules that allow it."""

    def __init__(self, params: VectorizedParams, context: RuntimeContext) -> None:
        self.ctx, self.threads = context, params.threads
        self.device = resolve_device(params.device)
        data = context.data
        self.x = data.x_train.to(self.device)
        self.y = data.y_train.to(self.device)
        self.offsets = torch.as_tensor(data.train_offsets, dtype=torch.long)
        rule = context.rule
        self.grad = weighted_loss_grad(context.model)
        self.step = vmap(rule.step, in_dims=(0, 0, None))
        self.per_client_bytes = self._client_bytes()
        budget = int(params.memory_budget)
        if budget < self.per_client_bytes:
            raise ScenarioError(
                f"runtime.memory_budget: {budget} bytes is less than one client needs (about "
                f"{self.per_client_bytes} bytes for this model and batch size)"
            )
        self.chunk_size = params.chunk_size or budget // self.per_client_bytes

    def _client_bytes(self) -> int:
        """Estimated memory of one client in flight: step state, gradients and a new state (about six copies of
        the parameters), its minibatch, and three times its activations (forward, backward, vmap temporaries)."""
        model, batch = self.ctx.model, self.ctx.rule.hp.batch_size
        params = tree_nbytes(model.init_params)
        sample = self.x[:1].numel() * self.x.element_size()
        return 6 * params + batch * (sample + 3 * activation_bytes_per_sample(model, tuple(self.x.shape[1:])))

    def run_jobs(self, jobs: Sequence[Job], global_params: Pytree) -> list[JobResult]:
        results: list[JobResult] = []
        on_device = tree_map(lambda v: v.to(self.device), global_params)
        for start in range(0, len(jobs), self.chunk_size):
            results += self._run_chunk(jobs[start : start + self.chunk_size], on_device)
        return results

    def _run_chunk(self, jobs: Sequence[Job], global_params: Pytree) -> list[JobResult]:
        ctx, rule = self.ctx, self.ctx.rule
        index, weight, active, sizes = self._schedule(jobs)
        n = len(jobs)
        states = [ctx.client_state(j.client, global_params) for j in jobs]
        expanded = tree_map(lambda v: v.expand(n, *v.shape), global_params)
        if all(s is None for s in states):
            state = vmap(lambda p: rule.init(p, None))(expanded)
        else:
            stacked = tree_map(lambda *vs: torch.stack(vs).to(self.device), *states)
            state = vmap(rule.init)(expanded, stacked)
        everyone = (active.all(dim=1)).tolist()
        for s in range(index.shape[0]):
            rows = index[s]
            new = self.step(state, (self.x[rows], self.y[rows], weight[s]), self.grad)
            state = new if everyone[s] else keep_where(active[s], new, state)
        messages, client_states = vmap(self._final)(state)
        messages = tree_map(lambda v: v.cpu(), messages)
        processed = weight.sum(dim=(0, 2)).long().tolist()
        results = []
        for i, job in enumerate(jobs):
            ctx.states.put(job.client, tree_map(lambda v, i=i: v[i].cpu(), client_states) if client_states else None)
            results.append(JobResult.of(job.client, tree_map(lambda v, i=i: v[i], messages), sizes[i], processed[i]))
        return results

    def _final(self, state: Pytree) -> tuple[Pytree, Pytree]:
        message, client_state = self.ctx.rule.final(state)
        return message, ({} if client_state is None else client_state)

    def _schedule(self, jobs: Sequence[Job]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Per step: (clients, batch) rows into the concatenated data, sample weights, and which clients step."""
        batch, steps = self.ctx.rule.hp.batch_size, max(j.steps for j in jobs)
        index = torch.zeros(steps, len(jobs), batch, dtype=torch.long)
        weight = torch.zeros(steps, len(jobs), batch)
        sizes = []
        for i, job in enumerate(jobs):
            start, stop = int(self.offsets[job.client]), int(self.offsets[job.client + 1])
            generator = torch_generator(self.ctx.seed, Stream.LOCAL, job.round, job.client)
            rows = padded_schedule(stop - start, batch, job.steps, generator)
            valid = rows >= 0
            index[: job.steps, i] = torch.where(valid, rows + start, start)
            weight[: job.steps, i] = valid.float()
            sizes.append(stop - start)
        active = torch.arange(steps)[:, None] < torch.tensor([j.steps for j in jobs])[None, :]
        return index.to(self.device), weight.to(self.device), active.to(self.device), sizes

