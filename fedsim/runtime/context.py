"""What a runtime needs to run client rules: the rule, the objective (model and task), the clients' data, the seed
and the client state store."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from fedsim import keyed_random
from fedsim.clients import ClientRule
from fedsim.codecs import Codec, Identity
from fedsim.data.base import ClientDataSource, FederatedData
from fedsim.models import Model
from fedsim.params import Pytree, tree_map, tree_signature, tree_unstack
from fedsim.runtime import Job, Jobs
from fedsim.seeding import Stream, derive_seeds
from fedsim.tasks import Objective

MASK32 = 0xFFFFFFFF


class StateStore(Protocol):
    """Where runtimes keep clients' persistent state between rounds."""

    def get(self, client: int) -> Pytree | None: ...

    def put(self, client: int, state: Pytree | None) -> None: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ClientStateStore:
    """Persistent per-client state, kept only for clients that have any (stateless rules store nothing)."""

    def __init__(self) -> None:
        self._states: dict[int, Pytree] = {}

    def get(self, client: int) -> Pytree | None:
        return self._states.get(client)

    def put(self, client: int, state: Pytree | None) -> None:
        if state is None:
            self._states.pop(client, None)
        else:
            self._states[client] = state

    def __len__(self) -> int:
        return len(self._states)

    def state_dict(self) -> dict[str, Any]:
        """Every client's state, the states of one structure stacked leaf by leaf (a few large tensors rather
        than one per client and leaf: checkpoints of many stateful clients stay fast)."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for client, tree in self._states.items():
            groups.setdefault(tree_signature(tree), []).append(client)
        return {"groups": [{"clients": clients, "stacked": tree_map(lambda *v: torch.stack(v),
                                                                    *(self._states[c] for c in clients))}
                           for clients in groups.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._states = {}
        for group in state["groups"]:
            self._states.update(zip(group["clients"], tree_unstack(group["stacked"], len(group["clients"])),
                                    strict=True))


@dataclass
class RuntimeContext:
    rule: ClientRule
    objective: Objective
    data: ClientDataSource
    seed: int
    states: StateStore = field(default_factory=ClientStateStore)
    uplink: Codec = field(default_factory=Identity)
    codec_states: StateStore = field(default_factory=ClientStateStore)
    on_device: dict[torch.device, FederatedData] = field(default_factory=dict, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def model(self) -> Model:
        return self.objective.model


def local_batches(num_samples: int, batch_size: int, steps: int,
                  generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Index tensors of `steps` minibatches: consecutive slices of a fresh permutation each epoch (last may be
    short), as FedProx's `batch_data` does, drawn from the client's own generator; with no generator (`sampling:
    ordered`), of the data in its stored order."""
    taken = 0
    while taken < steps:
        perm = torch.randperm(num_samples, generator=generator) if generator is not None else torch.arange(num_samples)
        for start in range(0, num_samples, batch_size):
            if taken == steps:
                return
            yield perm[start : start + batch_size]
            taken += 1


def job_seeds(seed: int, stream: Stream, jobs: Sequence[Job]) -> list[int]:
    """`derive_seed(seed, stream, job.id, job.client)` for every job, derived for all jobs at once
    (`derive_seeds`, ids and clients varying): the seed of each job's own random stream, whichever runtime runs it."""
    columns = Jobs.of(jobs)
    return derive_seeds(seed, stream, columns.ids, last=columns.clients)


def padded_schedule(num_samples: int, batch_size: int, steps: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """The same minibatches as `local_batches`, as one (steps, batch_size) index tensor padded with -1, for
    runtimes that run many clients' steps at once; draws the same permutations from the generator (none: the
    stored order)."""
    if steps == 0:
        return torch.empty((0, batch_size), dtype=torch.long)
    per_epoch = -(-num_samples // batch_size)
    out = torch.full((-(-steps // per_epoch), per_epoch * batch_size), -1, dtype=torch.long)
    for epoch in out:
        if generator is None:
            torch.arange(num_samples, out=epoch[:num_samples])
        else:
            torch.randperm(num_samples, generator=generator, out=epoch[:num_samples])
    return out.view(-1, batch_size)[:steps]


BATCHED_POSITIONS = 64
"""Jobs whose minibatches take at most this many positions of their first permutation draw them batched
(`leading_positions`): a gossip node's step or two; longer schedules draw per job."""
BATCHED_MIN_JOBS = 256
"""Fewer such jobs than this draw per job (the batched draw has a fixed cost of about 250 per-job draws)."""


def padded_schedules(seed: int, jobs: Sequence[Job], sizes: Sequence[int], batch_size: int,
                     ordered: bool = False) -> torch.Tensor:
    """Every job's `padded_schedule` from its own generator (seeded by `job_seeds(seed, LOCAL, jobs)`; with
    `ordered`, of the stored order), as one (steps, jobs, batch_size) tensor, -1 also after a job's last step. Jobs
    that need only the first few positions of one permutation have them computed for all at once
    (`leading_positions`, the same numbers); the others draw their own."""
    n = len(jobs)
    steps = Jobs.of(jobs).steps
    size = np.asarray(sizes, dtype=np.int64).reshape(n)
    most = int(steps.max(initial=0))
    out = np.full((n, most * batch_size), -1, dtype=np.int64)
    if ordered:
        for j in np.flatnonzero(steps > 0).tolist():
            drawn = padded_schedule(int(size[j]), batch_size, int(steps[j]), None)
            out[j, : drawn.numel()] = drawn.reshape(-1).numpy()
        return torch.from_numpy(out).view(n, most, batch_size).transpose(0, 1)
    seeds = np.asarray(job_seeds(seed, Stream.LOCAL, jobs), dtype=np.int64).reshape(n)
    count = np.minimum(steps * batch_size, size)
    batched = (steps > 0) & (size > 0) & (steps * batch_size <= size + batch_size - 1) & (count <= BATCHED_POSITIONS)
    if batched.sum() < BATCHED_MIN_JOBS or not draws_like_torch():
        batched[:] = False
    rows = np.flatnonzero(batched)
    if len(rows):
        width = int(count[rows].max())
        out[rows, :width] = leading_positions(seeds[rows] & MASK32, size[rows], count[rows], width)
    for j in np.flatnonzero(~batched & (steps > 0)).tolist():
        drawn = padded_schedule(int(size[j]), batch_size, int(steps[j]), torch.Generator().manual_seed(int(seeds[j])))
        out[j, : drawn.numel()] = drawn.reshape(-1).numpy()
    return torch.from_numpy(out).view(n, most, batch_size).transpose(0, 1)


POISSON_DRAWS = 1 << 22
"""Uniform draws a Poisson schedule makes at once (32 MiB of float64): steps are drawn in blocks of this many."""


def poisson_schedule(local_seed: int, num_samples: int, batch_size: int, steps: int) -> torch.Tensor:
    """A job's Poisson-sampled minibatches as one (steps, width) index tensor padded with -1: step s takes sample j
    when its uniform draw is below q = batch_size / n, independently of every other (the subsampling DP accountants
    assume); width is the largest batch drawn, at least 1 (so an empty step is one padding row). Steps are drawn in
    blocks of k = POISSON_DRAWS // n, block i from `fast_uniform(fold_in(key_from_seed(local_seed), i), (k, n))`:
    the job's LOCAL-stream seed keys it, so every runtime draws the same, and memory stays bounded for big clients."""
    q, key = batch_size / num_samples, keyed_random.key_from_seed(local_seed)
    block = max(1, POISSON_DRAWS // num_samples)
    picks = [_poisson_block(keyed_random.fold_in(key, i), min(block, steps - start), num_samples, q)
             for i, start in enumerate(range(0, steps, block))]
    width = max((p.shape[1] for p in picks), default=1)
    out = torch.full((steps, width), -1, dtype=torch.long)
    for i, p in enumerate(picks):
        out[i * block: i * block + len(p), : p.shape[1]] = p
    return out


def _poisson_block(key: torch.Tensor, steps: int, num_samples: int, q: float) -> torch.Tensor:
    """One block of steps' picks, (steps, its largest batch or 1), ascending indices then -1."""
    taken = keyed_random.fast_uniform(key, (steps, num_samples), torch.float64) < q
    counts = taken.sum(dim=1, keepdim=True)
    width = max(1, int(counts.max()))
    order = torch.argsort((~taken).to(torch.int8), dim=1, stable=True)[:, :width]
    return torch.where(torch.arange(width) < counts, order, -1)


def padded_poisson_schedules(seed: int, jobs: Sequence[Job], sizes: Sequence[int], batch_size: int) -> torch.Tensor:
    """Every job's `poisson_schedule`, as one (steps, jobs, width) tensor padded with -1 (also after a job's last
    step), width the largest batch of any job's step."""
    steps = Jobs.of(jobs).steps
    schedules = [poisson_schedule(s, int(n), batch_size, int(t))
                 for s, n, t in zip(job_seeds(seed, Stream.LOCAL, jobs), sizes, steps.tolist(), strict=True)]
    width = max((s.shape[1] for s in schedules), default=1)
    out = torch.full((int(steps.max(initial=0)), len(jobs), width), -1, dtype=torch.long)
    for j, schedule in enumerate(schedules):
        out[: schedule.shape[0], j, : schedule.shape[1]] = schedule
    return out


_MT_SHIFT = 397
"""MT19937's middle word: output i < 227 of a freshly seeded generator twists words i, i + 1 and i + 397."""


def mt19937_outputs(seeds: np.ndarray, count: int) -> np.ndarray:
    """The first `count` (at most 227) 32-bit outputs of MT19937 generators seeded with `seeds` (uint32), as
    (count, seeds): the reference algorithm (Matsumoto & Nishimura 1998), its state seeded and twisted only as far
    as those outputs need, every generator at once. The seeding runs on one row of words in place (it stays in
    cache), keeping only the words the outputs read: 0..count and _MT_SHIFT.._MT_SHIFT + count - 1."""
    n = len(seeds)
    word = np.array(seeds, dtype=np.uint32).reshape(n)
    low, high = np.empty((count + 1, n), dtype=np.uint32), np.empty((count, n), dtype=np.uint32)
    low[0] = word
    tmp = np.empty(n, dtype=np.uint32)
    shift, multiplier = np.uint32(30), np.uint32(1812433253)
    for i in range(1, _MT_SHIFT + count if count else 1):
        np.right_shift(word, shift, out=tmp)
        np.bitwise_xor(word, tmp, out=tmp)
        np.multiply(tmp, multiplier, out=tmp)
        np.add(tmp, np.uint32(i), out=word)
        if i <= count:
            low[i] = word
        if i >= _MT_SHIFT:
            high[i - _MT_SHIFT] = word
    y = (low[:count] & np.uint32(0x80000000)) | (low[1:] & np.uint32(0x7FFFFFFF))
    u = high ^ (y >> np.uint32(1)) ^ np.where(y & np.uint32(1), np.uint32(0x9908B0DF), np.uint32(0))
    u ^= u >> np.uint32(11)
    u ^= (u << np.uint32(7)) & np.uint32(0x9D2C5680)
    u ^= (u << np.uint32(15)) & np.uint32(0xEFC60000)
    u ^= u >> np.uint32(18)
    return u


def leading_positions(seeds: np.ndarray, sizes: np.ndarray, count: np.ndarray, width: int) -> np.ndarray:
    """For every job j, the first count_j entries of `torch.randperm(sizes_j, generator=g)` with g freshly seeded
    by seeds_j (its low 32 bits: all a CPU generator keeps), then -1 up to `width` (at most 227), for all jobs at
    once. torch's CPU randperm is a Fisher-Yates shuffle: position i swapped with i + (u_i mod (n - i)), u_i the
    generator's i-th MT19937 output, so entry i is final after step i and the first k entries need k draws.
    The swap targets depend on the draws alone, so they are computed first; a job's positions that a swap reaches
    are the window of `width` and its distinct targets beyond it, one column each, and step i swaps two columns of
    every job at once. `draws_like_torch` checks this against torch before it is used."""
    n = len(seeds)
    draws = np.minimum(count, sizes - 1)
    d = int(draws.max(initial=0))
    step = np.arange(d)[:, None]
    u = mt19937_outputs(seeds, d).astype(np.int64)
    target = np.where(step < draws, step + u % np.maximum(sizes - step, 1), step)
    first = np.repeat(np.arange(d), n).reshape(d, n)
    for k in range(d - 1, -1, -1):
        np.copyto(first[k + 1 :], k, where=target[k + 1 :] == target[k])
    # Each step's target column: the window's own, else the one of the job's first step with that target.
    column = np.where(target < width, target, width + first)
    state = np.empty((n, width + d), dtype=np.int64)
    state[:, :width] = np.arange(width)
    state[:, width:] = target.T
    rows = np.arange(n)
    for i in range(d):
        here = state[:, i].copy()
        state[:, i] = state[rows, column[i]]
        state[rows, column[i]] = here
    window = state[:, :width]
    window[np.arange(width)[None, :] >= count[:, None]] = -1
    return window


@functools.cache
def draws_like_torch() -> bool:
    """Whether `leading_positions` gives torch's own permutations here (checked once per process on a few cases;
    if a torch version ever shuffled otherwise, every job would draw its own)."""
    cases = [(0, 1, 1), (1, 2, 2), (5, 7, 7), (2**40 + 3, 100, 10), (12345, 5000, 64), (2**62 + 99, 64, 64)]
    seeds, sizes, count = (np.array(c, dtype=np.int64) for c in zip(*cases, strict=True))
    mine = leading_positions(seeds & MASK32, sizes, count, int(count.max()))
    for row, (s, n, k) in zip(mine, cases, strict=True):
        theirs = torch.randperm(n, generator=torch.Generator().manual_seed(s))[:k].numpy()
        if not np.array_equal(row[:k], theirs):
            return False
    return True


def device_data(ctx: RuntimeContext, device: torch.device) -> FederatedData:
    """In-memory client data with its training tensors on `device`, copied there once."""
    assert isinstance(ctx.data, FederatedData)
    if device.type == "cpu":
        return ctx.data
    with ctx.lock:
        if device not in ctx.on_device:
            d = ctx.data
            ctx.on_device[device] = replace(d, x_train=d.x_train.to(device), y_train=d.y_train.to(device))
        return ctx.on_device[device]


def client_tensors(ctx: RuntimeContext, client: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's training tensors on `device`: sliced from the device's copy of in-memory data, or made on
    demand by a generated population (under a lock: several devices' workers may ask at once)."""
    if isinstance(ctx.data, FederatedData):
        return device_data(ctx, device).client_train(client)
    with ctx.lock:
        x, y = ctx.data.client_train(client)
    return x.to(device), y.to(device)
