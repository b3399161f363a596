"""One client's local work, shared by every runtime: the loop over its steps (`local_steps`, `run_client`), the
minibatches it takes (`client_batches`), and the facts and random key of its job.

The sequential runtime runs `run_client` per job, the vectorized runtime's unbatched tail runs `local_steps` per
client, and a Flower ClientApp runs `run_client`; so a rule's steps are the same code wherever they run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from fedsim.clients import Batch, BatchingParams, ClientRule, JobInfo, Oracle, StepState
from fedsim.codecs import Codec, transmit
from fedsim.params import Pytree, tree_leaves, tree_map
from fedsim.runtime import Job
from fedsim.runtime.context import MASK32, job_seeds, local_batches, poisson_schedule
from fedsim.seeding import Stream


def job_info(num_samples: int | torch.Tensor, steps: int | torch.Tensor, client: int | torch.Tensor) -> JobInfo:
    """The facts `init` may read about a job, as int64 tensors (one per job under vmap)."""
    return {"num_samples": torch.as_tensor(num_samples, dtype=torch.int64),
            "steps": torch.as_tensor(steps, dtype=torch.int64), "client": torch.as_tensor(client, dtype=torch.int64)}


def job_keys(seed: int, jobs: Sequence[Job], stream: Stream = Stream.ORACLE) -> torch.Tensor:
    """Each job's random key, (jobs, 2) int64 words of `derive_seed(seed, stream, job.id, job.client)`: what the
    oracle's draws (stream ORACLE) and the uplink codec's (stream CODEC) are keyed by, whichever runtime runs the
    job."""
    seeds = np.asarray(job_seeds(seed, stream, jobs), dtype=np.int64).reshape(len(jobs))
    return torch.from_numpy(np.stack([seeds & MASK32, seeds >> 32], axis=1))


def step_indices(steps: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """0-d int64 tensors 0, 1, ... (at least `steps` of them) on `device`, made once per power of two and shared
    (read only), so a step's index costs nothing."""
    return _step_indices(1 << max(0, steps - 1).bit_length(), device)


@functools.lru_cache(maxsize=32)
def _step_indices(size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.arange(size, device=device).unbind())


def client_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, generator: torch.Generator | None,
                   key: torch.Tensor) -> Iterator[Batch]:
    """A client's `steps` minibatches (`local_batches`' schedule) as Batches of weight 1, on x's device."""
    ones = torch.ones(min(batch_size, len(y)), device=x.device)
    key, index = key.to(x.device), step_indices(steps, x.device)
    for s, idx in enumerate(local_batches(len(y), batch_size, steps, generator)):
        idx = idx.to(x.device)
        w = ones if len(idx) == len(ones) else ones[: len(idx)]
        yield Batch(x[idx], y[idx], w, key, index[s])


def job_batches(x: torch.Tensor, y: torch.Tensor, hp: BatchingParams, steps: int, local_seed: int,
                key: torch.Tensor) -> Iterator[Batch]:
    """A job's `steps` minibatches as its rule's `sampling` draws them from the job's LOCAL-stream seed: shuffled
    epochs (`client_batches`), epochs in the stored order, or Poisson samples (`poisson_schedule`) padded to the
    job's largest batch with rows of weight 0, so an empty step is a batch of padding."""
    if hp.sampling in ("shuffle", "ordered"):
        generator = torch.Generator().manual_seed(local_seed) if hp.sampling == "shuffle" else None
        yield from client_batches(x, y, hp.batch_size, steps, generator, key)
        return
    schedule = poisson_schedule(local_seed, len(y), hp.batch_size, steps).to(x.device)
    key, index = key.to(x.device), step_indices(steps, x.device)
    for s, rows in enumerate(schedule):
        kept = rows >= 0
        rows = rows.clamp_min(0)
        yield Batch(x[rows], y[rows], kept.to(x.dtype if x.is_floating_point() else torch.float32), key, index[s])


def local_steps(rule: ClientRule, state: StepState, batches: Iterable[Batch], oracle: Oracle) -> tuple[StepState,
                                                                                                       int]:
    """Run the rule's step over the batches; returns the final step state and the samples processed (padding rows,
    of weight 0, excluded)."""
    kept = []
    for batch in batches:
        state = rule.step(state, batch, oracle)
        kept.append(batch.w.count_nonzero())
    return state, int(torch.stack(kept).sum()) if kept else 0


def run_client(rule: ClientRule, oracle: Oracle, server_message: Pytree, client_state: Pytree | None,
               info: JobInfo, batches: Iterable[Batch]) -> tuple[Pytree, Pytree | None, int]:
    """One client's whole job: init from the server's message, the local steps, final. Returns the message, the
    client's new state and the samples processed."""
    state, processed = local_steps(rule, rule.init(server_message, client_state, info), batches, oracle)
    message, new_state = rule.final(state)
    return message, new_state, processed


def message_template(rule: ClientRule, server_message: Pytree) -> Pytree:
    """The shape of the rule's messages (zeros, from a client that takes no step): what reductions add up into,
    on every process, even one that runs no job this round."""
    state = rule.init(server_message, rule.initial_state(server_message), job_info(1, 0, 0))
    return tree_map(torch.zeros_like, rule.final(state)[0])


def send(codec: Codec, message: Pytree, codec_state: Pytree | None, key: torch.Tensor) -> tuple[Pytree, int,
                                                                                             Pytree | None]:
    """A message through the uplink codec (`key`: the job's CODEC-stream key) from a sender whose stored state is
    `codec_state` (None: none yet, so this is its first message): what the server decodes, the payload's exact
    bytes, and the sender's new codec state (None when the codec keeps none)."""
    first = codec_state is None
    state = codec.init(message) if first else codec_state
    _, decoded, nbytes, new_state = transmit(codec, message, state, key, first)
    return decoded, nbytes, kept_state(new_state)


def kept_state(state: Pytree) -> Pytree | None:
    """A codec state worth storing: None for stateless codecs (an empty tree), so nothing is kept per client."""
    return state if any(True for _ in tree_leaves(state)) else None
