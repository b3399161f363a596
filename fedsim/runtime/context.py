"""What a runtime needs to run client rules: the rule, the objective (model and task), the clients' data, the seed
and the client state store."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedsim.clients import ClientRule
from fedsim.codecs import Codec, Identity
from fedsim.data.base import ClientDataSource, FederatedData
from fedsim.models import Model
from fedsim.params import Pytree, tree_map, tree_signature, tree_unstack
from fedsim.seeding import Stream, derive_seeds
from fedsim.tasks import Objective

if TYPE_CHECKING:
    from fedsim.runtime import Job


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

    def client_state(self, client: int, server_message: Pytree) -> Pytree | None:
        """The client's stored state, or the rule's initial state for a client seen for the first time."""
        state = self.states.get(client)
        return self.rule.initial_state(server_message) if state is None else state

    def codec_state(self, client: int, template: Pytree) -> Pytree:
        """The client's uplink codec state (error-feedback residuals ...), or a fresh one."""
        state = self.codec_states.get(client)
        return self.uplink.init(template) if state is None else state


def local_batches(num_samples: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of `steps` minibatches: consecutive slices of a fresh permutation each epoch (last may be
    short), as FedProx's `batch_data` does, drawn from the client's own generator."""
    taken = 0
    while taken < steps:
        perm = torch.randperm(num_samples, generator=generator)
        for start in range(0, num_samples, batch_size):
            if taken == steps:
                return
            yield perm[start : start + batch_size]
            taken += 1


def job_seeds(seed: int, stream: Stream, jobs: Sequence[Job]) -> list[int]:
    """`derive_seed(seed, stream, job.id, job.client)` for every job, derived for all jobs at once
    (`derive_seeds`, ids and clients varying): the seed of each job's own random stream, whichever runtime runs it."""
    return derive_seeds(seed, stream, [job.id for job in jobs], last=[job.client for job in jobs])


def local_generators(seed: int, jobs: Sequence[Job]) -> list[torch.Generator]:
    """Each job's minibatch generator, `torch_generator(seed, LOCAL, job.id, client)`."""
    return [torch.Generator().manual_seed(s) for s in job_seeds(seed, Stream.LOCAL, jobs)]


def padded_schedule(num_samples: int, batch_size: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """The same minibatches as `local_batches`, as one (steps, batch_size) index tensor padded with -1, for
    runtimes that run many clients' steps at once; draws the same permutations from the generator."""
    if steps == 0:
        return torch.empty((0, batch_size), dtype=torch.long)
    per_epoch = -(-num_samples // batch_size)
    padding = per_epoch * batch_size - num_samples
    perms = [torch.randperm(num_samples, generator=generator) for _ in range(-(-steps // per_epoch))]
    if padding:
        perms = [torch.nn.functional.pad(perm, (0, padding), value=-1) for perm in perms]
    return (perms[0] if len(perms) == 1 else torch.cat(perms)).view(-1, batch_size)[:steps]


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
