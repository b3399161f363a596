"""The vectorized runtime: many clients' local steps at once, under `torch.func.vmap` over a client axis.

Clients in a chunk share one step loop. Each step gathers every client's minibatch from the concatenated training
tensors (which sit on the device once) through a (clients, batch) index tensor; padding rows carry weight 0 in the
loss, so short last batches and small clients need no special case, and clients that have finished their steps
(stragglers, small data sets) leave the vmapped batch with their final state; once fewer than `min_batch` remain,
they finish one at a time, unbatched. Steps where every client has a full batch use the plain mean loss (fewer
ops). Chunks are sized from a memory budget. With `compile`, steps are torch.compile'd and a chunk keeps all its
clients (finished ones masked), as a compiled graph holds a fixed number of clients. Numbers equal the sequential
runtime's to float tolerance (a padded step's loss is a weighted sum instead of a mean, cross-entropy is
logsumexp minus the true logit).
"""

from __future__ import annotations

import math
import operator
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator
from torch.func import vmap

from fedsim.clients import Batch, ClientRule
from fedsim.data.base import FederatedData
from fedsim.errors import ScenarioError
from fedsim.models import Model
from fedsim.oracle import FuncOracle, local_oracle
from fedsim.params import Pytree, tree_leaves, tree_map, tree_nbytes, tree_to
from fedsim.resources import check_fits
from fedsim.runtime import RUNTIMES, Job, JobResult, Jobs, Stacked, StackedResults
from fedsim.runtime.base import PlacedRuntime, RuntimeParams
from fedsim.runtime.context import (
    RuntimeContext,
    client_tensors,
    device_data,
    padded_poisson_schedules,
    padded_schedules,
)
from fedsim.runtime.local import job_info, job_keys, local_steps, step_indices
from fedsim.seeding import Stream
from fedsim.sizes import parse_bytes
from fedsim.tasks import Objective


class VectorizedParams(RuntimeParams):
    memory_budget: int | float | str = Field("2GiB", validate_default=True,
                                     description="memory for one chunk of clients in flight, per device")
    chunk_size: int | None = Field(None, ge=1, description="clients per chunk; default: as many as the budget fits")
    compile: bool = Field(False, description="torch.compile the vmapped step: faster steps after a one-off "
                                             "compile of seconds (pays off over long runs; needs a C++ compiler)")
    min_batch: int = Field(8, ge=1, description="fewer clients than this still stepping in a chunk step one at a "
                                               "time, unbatched (a vmapped step costs several plain ones)")

    @field_validator("memory_budget")
    @classmethod
    def _memory_budget_size(cls, value: int | float | str) -> int:
        return parse_bytes(value)


SCHEDULE_BYTES = 32
"""Bytes per scheduled sample of a client's local steps (row index, weight, padding mask and their temporaries)."""


Step = Callable[[Pytree, Batch], Pytree]
"""A vmapped step of a chunk of clients: (stacked step state, stacked minibatch) -> new step state."""
MaskedStep = Callable[[Pytree, Batch, torch.Tensor], Pytree]
"""A vmapped step that only changes the state of clients whose entry in the boolean tensor is True."""


def batched_steps(rule: ClientRule, objective: Objective) -> tuple[Step, Step]:
    """The rule's step vmapped over a leading client axis, for full minibatches (the plain mean loss) and for
    padded ones (the weighted loss); Poisson-sampled batches take the sum over the expected size in both. The step
    number is the same for every client of a step, so it stays unbatched (one input fewer for vmap to wrap)."""
    vmapped = vmap(rule.step, in_dims=(0, Batch(0, 0, 0, 0, None), None))
    padded_oracle = local_oracle(objective, rule.hp) if rule.hp.sampling == "poisson" else \
        FuncOracle(objective, weighted=True)
    full_oracle = padded_oracle if rule.hp.sampling == "poisson" else FuncOracle(objective, weighted=False)

    def full(state: Pytree, batch: Batch) -> Pytree:
        return vmapped(state, batch, full_oracle)

    def padded(state: Pytree, batch: Batch) -> Pytree:
        return vmapped(state, batch, padded_oracle)

    return full, padded


def compiled_steps(full: Step, padded: Step) -> tuple[Step, MaskedStep]:
    """`batched_steps`' full-minibatch step, and its padded step with clients whose `going` is False keeping their
    state, compiled by torch.compile: fused kernels make steps 2-3x faster on CPU after a one-off compile of
    seconds. vmap fixes the number of clients in a compiled graph, so a chunk keeps all its clients to the end."""

    def masked(state: Pytree, batch: Batch, going: torch.Tensor) -> Pytree:
        new = padded(state, batch)
        return tree_map(lambda n, o: torch.where(going.view(-1, *[1] * (n.dim() - 1)), n, o), new, state)

    return torch.compile(full, dynamic=False), torch.compile(masked, dynamic=False)


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


def retire(finished: Pytree, state: Pytree, ids: torch.Tensor, going: torch.Tensor) -> tuple[Pytree, torch.Tensor,
                                                                                             Pytree]:
    """Move the batch rows of clients that stop here (`~going`) into `finished` (indexed by chunk position `ids`);
    return it with the positions and states of the clients that go on."""
    done, kept = ids[~going], ids[going]
    finished = tree_map(lambda f, v: f.index_copy(0, done, v[~going]), finished, state)
    return finished, kept, tree_map(lambda v: v[going], state)


@RUNTIMES.register("vectorized", params=VectorizedParams, vectorized=True)
class VectorizedRuntime(PlacedRuntime):
    """Runs chunks of clients under torch.func.vmap; clients that take fewer steps leave the batch early."""

    def __init__(self, params: VectorizedParams, context: RuntimeContext) -> None:
        super().__init__(params, context)
        self.compiled = params.compile
        if params.compile and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
            raise ScenarioError("runtime.compile: torch.compile needs a C++ compiler (g++, c++ or clang++, or $CXX) "
                                "and none was found; install one or set compile: false")
        self.full_steps, self.padded_steps = zip(*(batched_steps(context.rule, o) for o in self.objectives),
                                                 strict=True)
        self.compiled_steps = [compiled_steps(full, padded) for full, padded in
                               zip(self.full_steps, self.padded_steps, strict=True)] if params.compile else []
        self.sizes_compiled: list[set[int]] = [set() for _ in self.objectives]
        self.alone_oracles = [local_oracle(objective, context.rule.hp) for objective in self.objectives]
        # A batch larger than every client's data is each client's full data: the same minibatches, less padding.
        largest = max(1, int(context.data.train_sizes.max()))
        self.batch_size = min(context.rule.hp.batch_size, largest)
        hp = context.rule.hp
        steps = hp.local_steps or hp.local_epochs * -(-largest // self.batch_size)
        check_fits("algorithm.local_steps" if hp.local_steps else "algorithm.local_epochs",
                   SCHEDULE_BYTES * steps * self.batch_size,
                   f"the minibatch schedule of one client ({steps} steps of {self.batch_size} samples)")
        self.per_client_bytes = self._client_bytes()
        budget = int(params.memory_budget)
        if budget < self.per_client_bytes:
            raise ScenarioError(
                f"runtime.memory_budget: {budget} bytes is less than one client needs (about "
                f"{self.per_client_bytes} bytes for this model and a batch of {self.batch_size})"
            )
        self.chunk_size = params.chunk_size or budget // self.per_client_bytes
        self.min_batch = params.min_batch

    def _client_bytes(self) -> int:
        """Estimated memory of one client in flight: step state, gradients and a new state (about six copies of
        the parameters), its minibatch, and three times its activations (forward, backward, vmap temporaries)."""
        model, batch, shape = self.ctx.model, self.batch_size, self.ctx.data.feature_shape
        params = tree_nbytes(model.init_params)
        sample = 4 * math.prod(shape)
        return 6 * params + batch * (sample + 3 * activation_bytes_per_sample(model, shape))

    def run_on(self, slot: int, jobs: Sequence[Job], stored: list[Pytree | None],
               starts: Sequence[Pytree]) -> list[Sequence[JobResult]]:
        """A piece per chunk of jobs, each with its messages and states still stacked."""
        pieces: list[Sequence[JobResult]] = []
        for a in range(0, len(jobs), self.chunk_size):
            chunk, chunk_starts = jobs[a : a + self.chunk_size], starts[a : a + self.chunk_size]
            states = self._stack_states(stored[a : a + self.chunk_size], chunk_starts, self.devices[slot])
            pieces.append(self._run_chunk(slot, chunk, states, chunk_starts))
        return pieces

    def _run_chunk(self, slot: int, jobs: Sequence[Job], states: Pytree | None,
                   starts: Sequence[Pytree]) -> StackedResults:
        """One chunk's jobs from their starts and their clients' states (stacked; None for stateless rules)."""
        rule, device, real = self.ctx.rule, self.devices[slot], len(jobs)
        # Under compile, copies of the first job fill the chunk up to a compiled size; dropped after the steps.
        extra = self._compiled_size(slot, real) - real if self.compiled else 0
        stacked_starts, stacked = self._stack_starts(starts, extra), _pad_rows(states, extra)
        if extra:
            jobs = [*jobs, *[jobs[0]] * extra]
        x, y, firsts, sizes = self._chunk_data(device, jobs)
        index, weight, active = self._schedule(jobs, firsts, sizes, device)
        keys = job_keys(self.ctx.seed, jobs).to(device)
        info = job_info(torch.from_numpy(sizes), torch.from_numpy(Jobs.of(jobs).steps),
                        torch.from_numpy(Jobs.of(jobs).clients))
        if stacked is None:
            state = vmap(lambda m, i: rule.init(m, None, i))(stacked_starts, info)
        else:
            state = vmap(rule.init)(stacked_starts, stacked, info)
        if self.compiled:
            state = tree_map(torch.Tensor.contiguous, state)
            state = self._masked_steps(slot, state, x, y, index, weight, active, keys)
            state = tree_map(lambda v: v[:real], state)
            jobs, sizes, weight = jobs[:real], sizes[:real], weight[:, :real]
        else:
            state = self._steps(slot, state, x, y, index, weight, active, keys)
        messages, client_states = vmap(self._final)(state)
        codec_keys = job_keys(self.ctx.seed, jobs, Stream.CODEC).to(keys.device)
        messages, message_bytes, codec_states = self._send(jobs, messages, codec_keys)
        messages, client_states = tree_to(messages, "cpu"), tree_to(client_states, "cpu")
        work = [p * rule.step_cost for p in weight.sum(dim=(0, 2)).long().tolist()]
        states_out, codec_out = _per_client(client_states, real), _per_client(codec_states, real)
        return StackedResults(jobs, messages, sizes.tolist(), work, message_bytes, states_out, codec_out,
                              isinstance(states_out, Stacked) or isinstance(codec_out, Stacked))

    def _send(self, jobs: Sequence[Job], messages: Pytree, keys: torch.Tensor) -> tuple[Pytree, list[int],
                                                                                          Pytree]:
        """The chunk's messages through the uplink codec, batched over the client axis: what the server decodes
        (with its mirrors of the senders' shared states), each payload's exact bytes, and the senders' new codec
        states (stacked; `{}` for stateless codecs, which look up no sender's state). Senders with no stored state
        send their first message, in a batch of their own (its payload's shapes may differ)."""
        codec = self.ctx.uplink
        template = tree_map(lambda v: v[0], messages)
        stateful = any(True for _ in tree_leaves(codec.init(template)))
        stored = [self.ctx.codec_states.get(j.client) for j in jobs] if stateful else [None] * len(jobs)
        firsts = np.array([s is None for s in stored])
        groups = [(first, np.flatnonzero(firsts == first)) for first in (True, False)]
        groups = [(first, rows) for first, rows in groups if len(rows)]
        device = next(iter(tree_leaves(messages))).device
        fresh = codec.init(tree_to(template, "cpu")) if stateful else {}
        parts = []
        for first, rows in groups:
            states = [fresh if stored[i] is None else stored[i] for i in rows]
            stacked = tree_map(lambda *vs: torch.stack(vs).to(device), *states) if stateful else {}
            part = _rows(messages, rows, len(jobs))
            _, decoded, new_states = vmap(lambda m, s, k, f=first: codec.round_trip(m, s, k, first=f))(
                part, stacked, keys[torch.from_numpy(rows).to(keys.device)] if len(rows) < len(jobs) else keys)
            parts.append((rows, decoded, tree_to(new_states, "cpu")))
        sizes = {first: codec.payload_bytes(template, first=first) for first, _ in groups}
        nbytes = [sizes[bool(first)] for first in firsts]
        if len(parts) == 1:
            return parts[0][1], nbytes, parts[0][2]
        return _merge_rows(parts, 1, len(jobs)), nbytes, _merge_rows(parts, 2, len(jobs))

    @staticmethod
    def _stack_starts(starts: Sequence[Pytree], extra: int = 0) -> Pytree:
        """The chunk's starts on a leading job axis, then `extra` copies of the first (a compiled chunk's filler):
        stacked starts as they are, one shared start expanded (no copy), else stacked."""
        if isinstance(starts, Stacked):
            return _pad_rows(starts.tree, extra)
        starts = [*starts, *[starts[0]] * extra]
        if all(s is starts[0] for s in starts):
            return tree_map(lambda v: v.expand(len(starts), *v.shape), starts[0])
        return tree_map(lambda *vs: torch.stack(vs), *starts)

    def _stack_states(self, stored: list[Pytree | None], starts: Sequence[Pytree],
                      device: torch.device) -> Pytree | None:
        """The clients' states (stored, else the rule's initial state from the job's start) on a leading job axis,
        or None when the rule keeps none (no stored state, and the initial state from the first start None: a rule's
        initial state is None for every start or for none)."""
        if all(s is None for s in stored) and self.ctx.rule.initial_state(starts[0]) is None:
            return None
        return tree_map(lambda *vs: torch.stack(vs).to(device), *self.initial_states(stored, starts))

    def _steps(self, slot: int, state: Pytree, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
               weight: torch.Tensor, active: torch.Tensor, keys: torch.Tensor) -> Pytree:
        """Run the chunk's local steps. Clients leave the vmapped batch when they finish (their state is final and
        set aside), so a chunk whose clients' work differs does not step finished clients along; once fewer than
        `min_batch` clients go on, they finish one at a time, unbatched."""
        n, batch = active.shape[1], weight.shape[2]
        counts = active.sum(dim=1).tolist()
        full = (weight.sum(dim=2) == batch).cpu()
        step_index = torch.arange(index.shape[0], device=index.device)
        finished = state
        live: torch.Tensor | None = None
        for s in range(index.shape[0]):
            if counts[s] < (n if live is None else len(live)):
                ids = torch.arange(n, device=index.device) if live is None else live
                finished, live, state = retire(finished, state, ids, active[s, ids])
                live_host = live.cpu()
            if counts[s] < self.min_batch:
                ids = torch.arange(n, device=index.device) if live is None else live
                state = self._one_by_one(slot, state, x, y, index[s:, ids], weight[s:, ids], active[s:, ids],
                                         keys[ids], s)
                live = ids
                break
            rows, w, k = (index[s], weight[s], keys) if live is None else (index[s, live], weight[s, live], keys[live])
            minibatch = Batch(x[rows], y[rows], w, k, step_index[s])
            if bool(full[s].all() if live is None else full[s, live_host].all()):
                state = self.full_steps[slot](state, minibatch)
            else:
                state = self.padded_steps[slot](state, minibatch)
        return state if live is None else tree_map(lambda f, v: f.index_copy(0, live, v), finished, state)

    def state_dict(self) -> dict[str, Any]:
        """The chunk sizes each worker has compiled: they decide how later chunks are padded."""
        return {"sizes_compiled": [sorted(sizes) for sizes in self.sizes_compiled]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sizes_compiled = [set(sizes) for sizes in state["sizes_compiled"]]

    def _compiled_size(self, slot: int, clients: int) -> int:
        """How many clients a chunk of `clients` runs as under compile: the smallest size this worker has compiled
        that is at most 25% larger, else its own (compiled on first use). This bounds recompiles when the number of
        clients varies from round to round (stragglers dropped) while a steady number runs unpadded."""
        fits = [size for size in self.sizes_compiled[slot] if clients <= size <= 1.25 * clients]
        size = min(fits, default=clients)
        self.sizes_compiled[slot].add(size)
        return size

    def _masked_steps(self, slot: int, state: Pytree, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                      weight: torch.Tensor, active: torch.Tensor, keys: torch.Tensor) -> Pytree:
        """Compiled steps: every client of the chunk takes every step, a finished client with an all-zero-weight
        batch and its state kept, so the compiled step always sees the same shapes (contiguous, no stride 0)."""
        full_step, masked_step = self.compiled_steps[slot]
        uniform = ((weight.sum(dim=2) == weight.shape[2]).all(dim=1) & active.all(dim=1)).tolist()
        steps = torch.arange(index.shape[0], device=index.device)
        for s in range(index.shape[0]):
            rows = index[s]
            minibatch = Batch(x[rows], y[rows], weight[s], keys, steps[s])
            if uniform[s]:
                state = full_step(state, minibatch)
            else:
                state = masked_step(state, minibatch, active[s])
        return state

    def _one_by_one(self, slot: int, state: Pytree, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                    weight: torch.Tensor, active: torch.Tensor, keys: torch.Tensor, first_step: int) -> Pytree:
        """The chunk's last few clients step on one after another, unbatched, with the sequential runtime's
        autograd oracle (`local_steps`): a vmapped step has a fixed cost of several plain ones, so with heavy-tailed
        work (e.g. FedProx's Synthetic data) a few busy clients would otherwise run many nearly empty vmapped
        steps. Their minibatches drop the padding rows, so every weight is 1; Poisson-sampled ones keep them (weight
        0), as a step may take no sample."""
        rule, oracle = self.ctx.rule, self.alone_oracles[slot]
        poisson = rule.hp.sampling == "poisson"
        valid = weight > 0
        full = valid.all(dim=2).cpu().tolist()
        ones = torch.ones(weight.shape[2], device=x.device)
        finals = []
        for c, steps in enumerate(active.sum(dim=0).tolist()):
            def batches(c: int = c, steps: int = steps) -> Iterator[Batch]:
                step_index, key = step_indices(first_step + steps, x.device), keys[c]
                for s in range(steps):
                    if poisson:
                        rows, w = index[s, c], weight[s, c]
                    elif full[s][c]:
                        rows, w = index[s, c], ones
                    else:
                        rows = index[s, c][valid[s, c]]
                        w = ones[: len(rows)]
                    yield Batch(x[rows], y[rows], w, key, step_index[first_step + s])

            finals.append(local_steps(rule, tree_map(operator.itemgetter(c), state), batches(), oracle)[0])
        return tree_map(lambda *leaves: torch.stack(leaves), *finals)

    def _final(self, state: Pytree) -> tuple[Pytree, Pytree]:
        message, client_state = self.ctx.rule.final(state)
        return message, ({} if client_state is None else client_state)

    def _chunk_data(self, device: torch.device, jobs: Sequence[Job]) -> tuple[torch.Tensor, torch.Tensor,
                                                                              np.ndarray, np.ndarray]:
        """Training rows for the chunk on `device`, with each client's first row and size (int64 arrays): the
        device's copy of in-memory data, or the chunk's clients made on demand and concatenated."""
        data = self.ctx.data
        if isinstance(data, FederatedData):
            on_device = device_data(self.ctx, device)
            clients = Jobs.of(jobs).clients
            return (on_device.x_train, on_device.y_train, np.asarray(data.train_starts, dtype=np.int64)[clients],
                    np.asarray(data.train_sizes, dtype=np.int64)[clients])
        parts = [client_tensors(self.ctx, j.client, torch.device("cpu")) for j in jobs]
        sizes = np.array([len(y) for _, y in parts], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        x = torch.cat([x for x, _ in parts]).to(device)
        return x, torch.cat([y for _, y in parts]).to(device), starts, sizes

    def _schedule(self, jobs: Sequence[Job], starts: np.ndarray, sizes: np.ndarray,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per step: (clients, batch) rows into the chunk's data, sample weights, and which clients step."""
        # (steps, clients, batch), -1 where a client has no sample: padding in short batches and after its last step.
        if self.ctx.rule.hp.sampling == "poisson":
            local = padded_poisson_schedules(self.ctx.seed, jobs, sizes, self.ctx.rule.hp.batch_size)
        else:
            local = padded_schedules(self.ctx.seed, jobs, sizes, self.batch_size,
                                     ordered=self.ctx.rule.hp.sampling == "ordered")
        valid = local >= 0
        first = torch.from_numpy(starts)[None, :, None]
        index = torch.where(valid, local + first, first)
        steps = torch.from_numpy(Jobs.of(jobs).steps)
        active = torch.arange(local.shape[0])[:, None] < steps[None, :]
        return index.to(device), valid.float().to(device), active.to(device)


def _pad_rows(stacked: Pytree | None, extra: int) -> Pytree | None:
    """`stacked` with `extra` copies of its first row appended (None and extra 0: as it is)."""
    if stacked is None or not extra:
        return stacked
    return tree_map(lambda v: torch.cat([v, v[:1].expand(extra, *v.shape[1:])]), stacked)


def _rows(stacked: Pytree, rows: np.ndarray, n: int) -> Pytree:
    """Rows `rows` of a stacked tree of n rows (the tree itself when they are all of them, in order)."""
    if len(rows) == n:
        return stacked
    index = torch.from_numpy(rows)
    return tree_map(lambda v: v.index_select(0, index.to(v.device)), stacked)


def _merge_rows(parts: Sequence[tuple[np.ndarray, ...]], field: int, n: int) -> Pytree:
    """One stacked tree of n rows from parts that each hold some rows (`part[0]`) of tree `part[field]`."""
    first = parts[0][field]
    merged = tree_map(lambda v: v.new_empty((n, *v.shape[1:])), first)
    for part in parts:
        index = torch.from_numpy(part[0])
        tree_map(lambda out, v, i=index: out.index_copy_(0, i.to(out.device), v), merged, part[field])
    return merged


def _per_client(stacked: Pytree, n: int) -> Sequence[Pytree | None]:
    """Stacked per-client states as one per client (None for all when there are none), each a copy made when it is
    taken, so a stored state does not keep its whole chunk's tensor alive."""
    if not any(True for _ in tree_leaves(stacked)):
        return [None] * n
    return Stacked(stacked, copies=True)
