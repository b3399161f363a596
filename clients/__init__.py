"""Node-side rules: what a client or peer computes from its own data, as pure functions of tensors.

A rule is split the way FedJAX splits it (`fedjax/core/for_each_client.py`): `init` builds the step state from the
server's broadcast message, the client's persistent state and facts about its job; `step` consumes one minibatch
with the runtime's oracle; `final` returns the message for the server and the client's new persistent state. The
runtime owns the loops, so it can run clients one after another, batch them on a vmap axis, mask clients that
take fewer steps, and count their work for the clock. A rule declares what one step costs (`step_cost`, in
gradient evaluations of a minibatch) so the clock charges it.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Protocol

import torch
from pydantic import Field

from fedsim.params import Pytree
from fedsim.registry import Params, Registry, import_submodules

StepState = dict[str, Any]
JobInfo = dict[str, torch.Tensor]
"""Facts about a job a rule may read in `init`, as 0-d tensors (batched under vmap): `num_samples` (the client's
training samples), `steps` (the local steps it will take) and `client` (its index: a rule drawing per-record
randomness that must repeat across jobs keys it by the client and the record's position, `sampling: ordered`)."""


class Batch(NamedTuple):
    """One minibatch, the same type in every runtime: inputs, targets, per-sample weights (1 for a sample, 0 on
    padding), the job's random key (int64 words, see `fedsim.keyed_random`) and the step's index (0-d int64)."""

    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    key: torch.Tensor
    step: torch.Tensor


class Oracle(Protocol):
    """What a step may ask of the task, supplied by the runtime; it behaves the same in every runtime and under
    vmap. Losses are the task's weighted mean over the batch (padding excluded) plus its penalty."""

    def grad(self, params: Pytree, batch: Batch) -> Pytree: ...

    def value_and_grad(self, params: Pytree, batch: Batch) -> tuple[torch.Tensor, Pytree]: ...

    def per_sample_grads(self, params: Pytree, batch: Batch) -> Pytree:
        """Each sample's loss gradient, leaves with a leading batch axis (padding rows included: weight them by
        `batch.w`)."""
        ...

    def normal(self, batch: Batch, like: Pytree, stream: int = 0) -> Pytree:
        """Standard normals shaped like `like`, keyed by (seed, job, step, stream): the same draws in every
        runtime."""
        ...

    def uniform(self, batch: Batch, like: Pytree, stream: int = 0) -> Pytree:
        """Uniforms in (0, 1) shaped like `like`, keyed like `normal`."""
        ...


class BatchingParams(Params):
    """How a job's minibatches are drawn: what the runtime reads to build the batch schedule, shared by every rule."""

    batch_size: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, le=10**7, description="minibatch steps per job instead of "
                                                                      "local_epochs passes over the data")
    sampling: Literal["shuffle", "ordered", "poisson"] = Field(
        "shuffle", description="shuffle: each epoch a fresh permutation cut into batches of batch_size (FedProx's "
                               "batch_data); ordered: each epoch the data in its stored order, cut alike; poisson: "
                               "each step takes every one of a client's n samples with "
                               "probability batch_size / n and divides the sum of their losses by batch_size (the "
                               "unbiased estimate of the mean loss, and the subsampling DP accountants assume)")


class LocalTrainingParams(BatchingParams):
    """Hyperparameters every local-training rule shares: the batch schedule and the learning rate."""

    lr: float = Field(0.01, gt=0)


class ClientRule(Protocol):
    """The pure functions an algorithm's client side consists of, with its hyperparameters bound."""

    hp: BatchingParams
    step_cost: int
    """Minibatch gradient evaluations per step (SGD 1, SAM 2, pFedMe K + 1): the clock charges work by it."""

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        """A client's persistent state before its first job (control variates, personal model ...); None for
        stateless rules. Runtimes pass it to `init` for clients they have no state for."""
        ...

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState: ...

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState: ...

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]: ...


class RuleWrapper:
    """Base of client rules around another rule (privacy mechanisms): hyperparameters, cost, state, steps and
    messages are the wrapped rule's unless a subclass changes them, and so is what the rule has beyond the training
    contract (a `personalize`: a client scoring its own personal model releases nothing)."""

    def __init__(self, rule: ClientRule) -> None:
        self.rule = rule

    @property
    def hp(self) -> BatchingParams:
        return self.rule.hp

    @property
    def step_cost(self) -> int:
        return self.rule.step_cost

    def initial_state(self, server_message: Pytree) -> Pytree | None:
        return self.rule.initial_state(server_message)

    def init(self, server_message: Pytree, client_state: Pytree | None, info: JobInfo) -> StepState:
        return self.rule.init(server_message, client_state, info)

    def step(self, state: StepState, batch: Batch, oracle: Oracle) -> StepState:
        return self.rule.step(state, batch, oracle)

    def final(self, state: StepState) -> tuple[Pytree, Pytree | None]:
        return self.rule.final(state)

    def __getattr__(self, name: str) -> Any:
        if name == "rule":
            raise AttributeError(name)
        return getattr(self.rule, name)


ALGORITHMS: Registry = Registry("algorithm")
"""Entries: a ClientRule class constructed with its validated hyperparameters.

Metadata: `stragglers` ("drop": stragglers' work is discarded, as FedAvg in the FedProx paper; "keep": partial
work is aggregated), `server` (the default server rule's name, or a function of the validated parameters giving
it, for an algorithm whose forms need different servers), `check` (a function of (params, scenario, components)
raising ScenarioError for settings that do not fit together, such as a form paired with another form's server),
`protocol` (the default protocol's name, "synchronous" when not given), `vectorizable` (default True; a rule
whose step cannot run under `torch.func.vmap` sets it False and runs sequentially, with a notice) and
`no_dpsgd` (why DP-SGD cannot account the rule, for rules whose step is not one private gradient of the step's
batch: several gradients a step, per-sample gradients of their own, or steps weighted by the batch's size).
"""

import_submodules(__name__, __path__)
