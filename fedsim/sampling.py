"""Per-round client selection and the two straggler models of synchronous rounds.

`stragglers: {fraction: d}` is the FedProx paper's protocol, reproducing the authors' code, drawn independently
of device speed (`plan_round`). FedProx (`flearn/trainers/fedprox.py`): sample K clients uniformly without
replacement; choose round(K (1 - d)) of them to be active; every other sampled client is a straggler that runs a
random number of epochs in {1..E-1} (numpy `randint(1, E)`). With E = 1 (where the paper's draw is undefined) a
straggler runs a random number of local steps in {1..S-1}, S being its steps per epoch; a client with a single step
per epoch runs it.

`stragglers: {deadline: S}` is what users of a device simulator expect, stragglers tied to speed: a round lasts at
most S simulated seconds, and a client whose full job (download, training, upload on its systems profile) would
end later runs only the local steps that fit (`steps_by_deadline`); the rule keeps or drops that partial work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.seeding import Stream, numpy_rng
from fedsim.systems import JobPhases


@dataclass(frozen=True)
class RoundPlan:
    """The sampled clients in draw order, their local step counts, and which of them are stragglers."""

    clients: np.ndarray
    steps: np.ndarray
    straggler: np.ndarray


def steps_per_epoch(train_sizes: np.ndarray, batch_size: int) -> np.ndarray:
    """ceil(n_k / B): the last minibatch of an epoch may be short, as in FedProx's `batch_data`."""
    return -(-train_sizes // batch_size)


def full_steps(train_sizes: np.ndarray, local_epochs: int, batch_size: int, local_steps: int | None) -> np.ndarray:
    """Each client's local steps in a full job: `local_steps` minibatches when set (as the pFedMe repo counts its
    local rounds), else `local_epochs` passes of ceil(n_k / B) minibatches."""
    if local_steps is not None:
        return np.full(len(train_sizes), local_steps, dtype=np.int64)
    return steps_per_epoch(np.asarray(train_sizes), batch_size) * local_epochs


def samples_processed(steps: np.ndarray, train_sizes: np.ndarray, batch_size: int) -> np.ndarray:
    """Samples `steps` minibatches visit: whole epochs of n_k, then full batches of the next (an epoch's short
    batch is its last, so a partial epoch never reaches it)."""
    per_epoch = steps_per_epoch(np.asarray(train_sizes), batch_size)
    return (steps // per_epoch) * train_sizes + (steps % per_epoch) * batch_size


def active_count(clients_per_round: int, straggler_fraction: float) -> int:
    """Clients per round that are not stragglers: round(K (1 - d)), not int(): K (1 - d) = 0.9999999999999998 for
    K = 10, d = 0.9 must give 1 (FedProx pitfall)."""
    return int(round(clients_per_round * (1.0 - straggler_fraction)))


def plan_round(seed: int, round_index: int, train_sizes: np.ndarray, clients_per_round: int,
               straggler_fraction: float, local_epochs: int, batch_size: int,
               local_steps: int | None = None, candidates: np.ndarray | None = None,
               poisson: bool = False) -> RoundPlan:
    """Draw one round's clients and work; depends only on the seed, the round, the data sizes and the clients
    that can be drawn (`candidates`: those available; every client by default; fewer than `clients_per_round`
    candidates are all drawn). With `poisson`, each candidate is drawn independently with probability
    clients_per_round / num_clients (in client order; possibly none). A straggler finishes a random number of whole
    epochs (of steps, with `local_steps`) short of a full job."""
    rng = numpy_rng(seed, Stream.SELECTION, round_index)
    pool = np.arange(len(train_sizes)) if candidates is None else np.asarray(candidates)
    if poisson:
        clients = pool[rng.random(len(pool)) < clients_per_round / len(train_sizes)]
        clients_per_round = len(clients)
    elif candidates is None:
        clients = rng.choice(len(train_sizes), clients_per_round, replace=False)
    else:
        clients_per_round = min(clients_per_round, len(candidates))
        clients = rng.choice(candidates, clients_per_round, replace=False)
    active = set(rng.choice(clients, active_count(clients_per_round, straggler_fraction), replace=False).tolist())
    straggler = np.array([c not in active for c in clients], dtype=bool)
    per_epoch = steps_per_epoch(train_sizes[clients], batch_size)
    steps = full_steps(train_sizes[clients], local_epochs, batch_size, local_steps)
    for i in np.flatnonzero(straggler):
        if local_steps is not None:
            if local_steps > 1:
                steps[i] = rng.integers(1, local_steps)
        elif local_epochs > 1:
            steps[i] = per_epoch[i] * rng.integers(1, local_epochs)
        elif per_epoch[i] > 1:
            steps[i] = rng.integers(1, per_epoch[i])
    return RoundPlan(clients, steps, straggler)


def steps_by_deadline(phases: JobPhases, deadline: float, full: int, train_size: int, batch_size: int,
                      step_cost: int) -> tuple[int, JobPhases]:
    """The most local steps s <= `full` that end by `deadline` given the full job's `phases`: download +
    work(s) / work(full) * compute + upload <= deadline (work(s) = samples processed times `step_cost`; the
    compute factor is the job's own), and the phases of those s steps. 0 steps: not even one fits."""
    if phases.total <= deadline:
        return full, phases
    whole = max(int(samples_processed(np.int64(full), np.int64(train_size), batch_size)) * step_cost, 1)

    def cut(steps: int) -> JobPhases:
        work = int(samples_processed(np.int64(steps), np.int64(train_size), batch_size)) * step_cost
        return JobPhases(phases.download, work / whole * phases.compute, phases.upload)

    low, high = 0, full  # cut(low) may fit, cut(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cut(middle).total <= deadline else (low, middle)
    return low, cut(low)
